#!/usr/bin/env bash
# Provision the embedded SoftHSM token in HSM_DIR and run the key ceremony. HSM_DIR must be
# outside the data directory (`vault serve` refuses a token inside it); `make run` uses ./hsm
# beside ./data. The PIN comes from VAULT_HSM_PIN or VAULT_HSM_PIN_FILE, else it is generated
# once into HSM_DIR/pin (0600).
# Usage: hsm/provision.sh [HSM_DIR]   (default ./hsm)
set -euo pipefail
cd "$(dirname "$0")/.."
HSM_DIR="${1:-./hsm}"
bash hsm/install-system-deps.sh
exec .venv/bin/python - "$HSM_DIR" <<'PY'
import sys
from pathlib import Path
from vault.keys import softhsm
from vault.keys.hsm import Hsm
config = softhsm.provision(Path(sys.argv[1]))
created = Hsm(config).ensure_keys()
print("token ready; keys created:", ", ".join(created) or "none (already provisioned)")
PY
