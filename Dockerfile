# The vault on its embedded default: SQLite database on the /data volume, SoftHSM token store
# on a separate /hsm volume (a copy or backup of /data must hold no key; back the two up apart).
#   docker build -t template-vault .
#   docker run -p 50051:50051 -v vault-data:/data -v vault-hsm:/hsm -v ./tls:/tls:ro template-vault
# Mutual TLS by default: /tls holds server.crt, server.key and client-ca.crt (client
# certificates signed by that CA carry their roles as OU values; docs/SECURITY.md). Without
# them the server refuses to start, naming the missing file. Plaintext, for a private
# network only, is an explicit choice:
#   docker run ... -e VAULT_TLS_CERT= -e VAULT_TLS_KEY= -e VAULT_TLS_CLIENT_CA= \
#                  -e VAULT_ALLOW_INSECURE_REMOTE=1 template-vault
#   docker run ... template-vault --rate-limit 200    (flags are appended to vault serve)
#   docker run ... --entrypoint vault template-vault audit verify     (any other command)
# The token's user PIN: from a secret file, e.g. with Compose
#   secrets: {vault_hsm_pin: {file: ./vault_hsm_pin.txt}}   (service: secrets: [vault_hsm_pin])
#   environment: {VAULT_HSM_PIN_FILE: /run/secrets/vault_hsm_pin}
# Without VAULT_HSM_PIN_FILE (or VAULT_HSM_PIN) the first start generates it into /hsm/pin (0600).
# The server refuses to start when the token store or the PIN file is inside /data.
# Volumes: the server runs as uid 10001 and checks at start that it can write /data and /hsm;
# a bind mount owned by someone else gets one line saying so (fix: chown 10001 DIR).
#
# Pin the base by digest for a reproducible build (the digest of the tag you verified):
#   docker build --build-arg BASE=python:3.11-slim-bookworm@sha256:<digest> .
# Not pinned here: the machine that built and checked this image reaches no registry, so it
# could not read the digest. Without a registry: docker/local-base.sh builds a Debian 12
# base from the apt mirror; podman build --format docker --isolation chroot
# --build-arg BASE=localhost/debian12-python:3.11 .; docker/verify-chroot.sh IMAGE checks it.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data --uid 10001 vault \
 && mkdir -p /data /hsm /opt/vault/numba-cache \
 && chown vault /data /hsm /opt/vault/numba-cache && chmod 700 /data /hsm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vault ./vault
COPY docker/warm-numba.sh /usr/local/bin/vault-warm-numba
# VAULT_EXTRAS="[ray]": the image of docker-compose.yml, for the vault and the Ray nodes.
ARG VAULT_EXTRAS=""
RUN pip install --no-cache-dir ".${VAULT_EXTRAS}"

USER vault
# numba compiles the matching kernels here, at build time, into a cache the image keeps
# (the package directory is read-only): the first Match of a container does not compile.
ENV NUMBA_CACHE_DIR=/opt/vault/numba-cache
RUN vault-warm-numba

VOLUME ["/data", "/hsm"]
EXPOSE 50051
ENV VAULT_DATA_DIR=/data VAULT_HSM_DIR=/hsm VAULT_LISTEN=0.0.0.0:50051 \
    VAULT_TLS_CERT=/tls/server.crt VAULT_TLS_KEY=/tls/server.key \
    VAULT_TLS_CLIENT_CA=/tls/client-ca.crt VAULT_HEALTH_LISTEN=127.0.0.1:50052
STOPSIGNAL SIGTERM
# grpc.health on its own plaintext loopback listener: works under mutual TLS and any port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["vault", "health"]
# No CMD: flags given to `docker run` are appended to `vault serve`, none replaced.
ENTRYPOINT ["vault", "serve"]
