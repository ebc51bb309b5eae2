#!/usr/bin/env bash
# Installs the system packages the vault needs (Debian 12): SoftHSM 2, Python 3.11 venv, and
# PostgreSQL (its server binaries: the PostgreSQL store's tests start a real one).
# Idempotent: does nothing when they are present. Uses sudo when not root.
set -euo pipefail
need=()
dpkg -s softhsm2 >/dev/null 2>&1 || need+=(softhsm2)
dpkg -s postgresql >/dev/null 2>&1 || need+=(postgresql)
command -v python3.11 >/dev/null 2>&1 || need+=(python3.11 python3.11-venv)
if python3.11 -c 'import ensurepip' >/dev/null 2>&1; then :; else need+=(python3.11-venv); fi
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
