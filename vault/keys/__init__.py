"""Keys role: the PKCS#11 client (:mod:`vault.keys.hsm`), envelope encryption
(:mod:`vault.keys.envelope`), record MACs (:mod:`vault.keys.integrity`) and the embedded
SoftHSM token (:mod:`vault.keys.softhsm`)."""
