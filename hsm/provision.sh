#!/usr/bin/env bash
# Provision the embedded SoftHSM token under DATA_DIR/hsm and run the key ceremony.
# Usage: hsm/provision.sh [DATA_DIR]   (default ./data)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${1:-./data}"
bash hsm/install-system-deps.sh
exec .venv/bin/python - "$DATA_DIR" <<'PY'
import sys
from pathlib import Path
from vault.keys import softhsm
from vault.keys.hsm import Hsm
config = softhsm.provision(Path(sys.argv[1]) / "hsm")
created = Hsm(config).ensure_keys()
print("token ready; keys created:", ", ".join(created) or "none (already provisioned)")
PY
