# The vault on its embedded default: SQLite database on the /data volume, SoftHSM token store
# on a separate /hsm volume (a copy or backup of /data must hold no key; back the two up apart).
#   docker build -t template-vault .
#   docker run -p 127.0.0.1:50051:50051 -v vault-data:/data -v vault-hsm:/hsm template-vault
# The token's user PIN: from a secret file, e.g. with Compose
#   secrets: {vault_hsm_pin: {file: ./vault_hsm_pin.txt}}   (service: secrets: [vault_hsm_pin])
#   environment: {VAULT_HSM_PIN_FILE: /run/secrets/vault_hsm_pin}
# Without VAULT_HSM_PIN_FILE (or VAULT_HSM_PIN) the first start generates it into /hsm/pin (0600).
# The server refuses to start when the token store or the PIN file is inside /data.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data --uid 10001 vault \
 && mkdir -p /data /hsm && chown vault /data /hsm && chmod 700 /data /hsm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vault ./vault
RUN pip install --no-cache-dir . \
 && python -c "import vault.he.kernels, vault.gallery, faiss"

USER vault
VOLUME ["/data", "/hsm"]
EXPOSE 50051
# numba caches compiled kernels where it may write (the package directory is read-only).
ENV VAULT_DATA_DIR=/data VAULT_HSM_DIR=/hsm VAULT_LISTEN=0.0.0.0:50051 NUMBA_CACHE_DIR=/tmp/numba-cache
# Plaintext gRPC inside the container network only: publish the port on loopback (above).
# For anything else mount certificates and pass --tls-cert, --tls-key, --tls-client-ca
# (mutual TLS, roles from the client certificates' OU values; see docs/SECURITY.md).
# Other commands: docker run ... --entrypoint vault template-vault audit verify
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:50051'); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3).status==1 else 1)"
ENTRYPOINT ["vault", "serve"]
CMD ["--allow-insecure-remote"]
