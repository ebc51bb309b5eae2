"""Privacy-preserving biometric template vault.

Roles (see docs/ARCHITECTURE.md): ``api`` (gRPC), ``protector`` (validation and cancellable
transform), ``gallery`` (encrypted templates, public HE context only), ``decider`` (holds
the CKKS secret key, decrypts score ciphertexts only), ``keys`` (PKCS#11 HSM), ``store``
(SQLite). ``service`` wires them together.
"""

__version__ = "0.1.0"
