#!/bin/sh
# A Debian 12 base with Python 3.11 and pip, built from the Debian mirror with debootstrap,
# for machines that reach apt and PyPI but no container registry (as root):
#   docker/local-base.sh localhost/debian12-python:3.11
#   podman build --format docker --isolation chroot \
#     --build-arg BASE=localhost/debian12-python:3.11 -t localhost/template-vault:dev .
# (--format docker keeps the HEALTHCHECK, which the OCI format drops.) The image's Python is
# Debian's python3.11 in /usr, where the official python image has its own in /usr/local.
# CA certificates this machine added (a TLS-inspecting proxy in front of PyPI) are copied
# in, so that pip inside the build trusts what pip outside it trusts.
set -eu
tag=${1:-localhost/debian12-python:3.11}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
  bookworm "$root" http://deb.debian.org/debian
rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED  # the image is this one program's
ln -sf python3 "$root/usr/bin/python"; ln -sf pip3 "$root/usr/bin/pip"
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'CMD ["python3"]' - "$tag"
