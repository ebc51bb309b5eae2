# The vault on its embedded default: SoftHSM token and SQLite database on the /data volume.
#   docker build -t template-vault .
#   docker run -p 127.0.0.1:50051:50051 -v vault-data:/data template-vault
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data --uid 10001 vault \
 && mkdir -p /data && chown vault /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vault ./vault
RUN pip install --no-cache-dir . \
 && python -c "import vault.he.kernels, vault.gallery, faiss"

USER vault
VOLUME ["/data"]
EXPOSE 50051
# numba caches compiled kernels where it may write (the package directory is read-only).
ENV VAULT_DATA_DIR=/data VAULT_LISTEN=0.0.0.0:50051 NUMBA_CACHE_DIR=/tmp/numba-cache
# Plaintext gRPC inside the container network only: publish the port on loopback (above).
# For anything else mount certificates and pass --tls-cert, --tls-key, --tls-client-ca
# (mutual TLS, roles from the client certificates' OU values; see docs/SECURITY.md).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:50051'); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=3).status==1 else 1)"
CMD ["vault", "serve", "--allow-insecure-remote"]
