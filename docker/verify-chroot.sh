#!/bin/sh
# Run a built image's file system with its own ENTRYPOINT, user and environment, where no
# OCI runtime can (a VM with hybrid cgroups: crun refuses them), and check what the image
# promises: mutual TLS by default on any port, the loopback health listener (what the
# HEALTHCHECK runs), a root-owned /data refused in one line, numba kernels already cached.
#   sudo docker/verify-chroot.sh localhost/template-vault:dev     (podman, as root)
# It uses the host's network (chroot), throwaway certificates, and removes what it made.
set -eu
image=${1:?image}
py=${PYTHON:-python3}  # with the vault package importable (for the test CA and the client)
work=$(mktemp -d)
ctr=$(podman create "$image")
root=$(podman mount "$ctr")
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  umount "$root/dev/shm" "$root/proc" "$root/dev" 2>/dev/null || true
  podman umount "$ctr" >/dev/null; podman rm "$ctr" >/dev/null; rm -rf "$work"
}
trap cleanup EXIT
port=$("$py" -c 'from vault.testing import free_port; print(free_port())')
health=$("$py" -c 'from vault.testing import free_port; print(free_port())')
"$py" - "$work" <<'PY'
import sys
from pathlib import Path
from vault.testing import CertificateAuthority
pki = CertificateAuthority(Path(sys.argv[1]))
pki.issue("server", server=True)
pki.issue("admin", ("admin",))
PY
mkdir -p "$root/tls"
cp "$work/server.crt" "$root/tls/server.crt"; cp "$work/server.key" "$root/tls/server.key"
cp "$work/ca.pem" "$root/tls/client-ca.crt"; chown -R 10001 "$root/tls"
mount --bind /proc "$root/proc"; mount --bind /dev "$root/dev"
mount -t tmpfs -o mode=1777 shm "$root/dev/shm"  # a runtime's /dev/shm (multiprocessing)
# The image's environment, with the two listeners moved to free ports ("any port").
env_args=$(podman inspect "$image" --format '{{range .Config.Env}}{{.}} {{end}}')
in_image() {  # $1: user; the rest: the command, with the image's environment. exec: in a
  user=$1; shift  # subshell, its pid is the server's (chroot and env exec in turn)
  # shellcheck disable=SC2086
  exec chroot --userspec="$user" "$root" /usr/bin/env -i $env_args HOME=/data \
    VAULT_LISTEN="0.0.0.0:$port" VAULT_HEALTH_LISTEN="127.0.0.1:$health" "$@"
}
echo "== numba kernels cached in the image: $(find "$root/opt/vault/numba-cache" -name '*.nbi' | wc -l)"
echo "== a root-owned /data:"
chown 0 "$root/data"
(in_image 10001:10001 vault serve) 2>&1 | tail -"${TAIL:-1}" || true
chown 10001 "$root/data"
echo "== ENTRYPOINT (vault serve) as uid 10001, mutual TLS from /tls:"
(in_image 10001:10001 vault serve) > "$work/server.log" 2>&1 &
pid=$!
(in_image 10001:10001 vault health --wait 180) || { tail -20 "$work/server.log"; exit 1; }
echo "== a client with the admin certificate, over mutual TLS on port $port:"
"$py" -m vault collections create --collection image-check --dimension 8 --threshold 0.9 \
  --target "localhost:$port" --tls-ca "$work/ca.pem" --tls-cert "$work/admin.crt" \
  --tls-key "$work/admin.key"
echo "== a plaintext client is refused:"
if "$py" -m vault collections list --target "localhost:$port" 2>&1; then
  echo "FAIL: plaintext accepted"; exit 1
fi
echo "== server log:"; grep -o '"event": "[^"]*"' "$work/server.log" | head -5
echo "OK"
