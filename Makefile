# Two commands: `make run` serves the vault on 127.0.0.1:50051 (SQLite in ./data, SoftHSM token
# in ./hsm: apart, so that a copy of the data holds no key),
# `make test` runs ruff, mypy and the whole test suite. Both install what is missing first.
PYTHON ?= python3.11
VENV ?= .venv
DATA_DIR ?= ./data
HSM_DIR ?= ./hsm
LISTEN ?= 127.0.0.1:50051

.PHONY: setup run test stress demo bench proto lint typecheck clean client

$(VENV)/.installed: pyproject.toml
	bash hsm/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench,faces]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/vault serve --data-dir $(DATA_DIR) --hsm-dir $(HSM_DIR) --listen $(LISTEN)

# Lint and types first (ruff; mypy strict on vault/, configured in pyproject.toml), then tests.
test: setup lint typecheck
	$(VENV)/bin/python -m pytest -q

# Long versions of the fault, fuzz and load tests (bounded, under 30 minutes on 2 cores);
# their figures land in bench/results/reliability/ for docs/RELIABILITY.md.
stress: setup
	VAULT_STRESS=1 VAULT_FIGURES_DIR=bench/results/reliability \
	  $(VENV)/bin/python -m pytest -q tests/reliability tests/api/test_fuzz.py tests/test_load.py

demo: setup
	$(VENV)/bin/vault demo --target $(LISTEN)

bench: setup
	$(VENV)/bin/python bench/match_latency.py

# Regenerate the committed gRPC code after editing proto/ (needs the dev extra): the
# server's stubs in vault/v1, and the client package's own copy in client/vault_client/v1.
proto:
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/vault/v1/vault.proto
	rm -rf build/stubs && mkdir -p build/stubs
	$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=build/stubs --pyi_out=build/stubs --grpc_python_out=build/stubs proto/vault/v1/vault.proto
	sed -i 's/^from vault\.v1 import/from vault_client.v1 import/' build/stubs/vault/v1/vault_pb2_grpc.py
	cp build/stubs/vault/v1/vault_pb2.py build/stubs/vault/v1/vault_pb2.pyi build/stubs/vault/v1/vault_pb2_grpc.py client/vault_client/v1/

# The client package alone (grpcio and protobuf only) into the current environment.
client:
	pip install ./client

lint: setup
	$(VENV)/bin/ruff check vault tests bench client

typecheck: setup
	$(VENV)/bin/python -m mypy

clean:
	rm -rf $(VENV) *.egg-info
