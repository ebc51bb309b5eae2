#!/bin/sh
# Build-time warm-up of the image: a real vault in throwaway directories runs the demo
# (enroll, 1:1, 1:N, scores, delete) and a small import (clustered blocks), so that numba
# compiles every kernel into NUMBA_CACHE_DIR now, not on the first Match of each container.
# The token, PIN and data made here are deleted before the layer is committed.
set -eu
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
port=${WARM_PORT:-50999}
vault serve --data-dir "$work/data" --hsm-dir "$work/hsm" --listen "127.0.0.1:$port" \
  > "$work/server.log" 2>&1 &
pid=$!
vault health --target "127.0.0.1:$port" --wait 300 >/dev/null || { cat "$work/server.log"; exit 1; }
vault demo --target "127.0.0.1:$port" >/dev/null
python - "$work/faces.npz" <<'PY'
import sys
import numpy as np
rng = np.random.default_rng(0)
np.savez(sys.argv[1], embeddings=rng.standard_normal((600, 128)).astype(np.float32),
         subject_ids=np.array([f"warm-{k}" for k in range(600)]))
PY
python - "$port" <<'PY'
import sys, grpc
from vault.v1 import vault_pb2 as pb, vault_pb2_grpc
stub = vault_pb2_grpc.TemplateVaultStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}"))
stub.CreateCollection(pb.CreateCollectionRequest(collection_id="warm", dimension=128, threshold=0.8))
PY
vault import "$work/faces.npz" --collection warm --target "127.0.0.1:$port" >/dev/null 2>&1
python - "$port" <<'PY'
import sys, grpc, numpy as np
from vault.v1 import vault_pb2 as pb, vault_pb2_grpc
stub = vault_pb2_grpc.TemplateVaultStub(grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}"))
probe = np.random.default_rng(1).standard_normal(128).astype(np.float32).tolist()
stub.Match(pb.MatchRequest(collection_id="warm", embedding=probe, top_k=3))
stub.Match(pb.MatchRequest(collection_id="warm", subject_id="warm-3", embedding=probe))
PY
kill "$pid"
wait "$pid" || true
echo "numba cache: $(find "${NUMBA_CACHE_DIR:?}" -name '*.nbi' | wc -l) kernels in $NUMBA_CACHE_DIR"
