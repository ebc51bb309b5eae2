"""Shared fixtures: one real SoftHSM token store for in-process tests, real servers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# SoftHSM reads SOFTHSM2_CONF once per process: point it at a test token store before
# anything loads the PKCS#11 module.
_HSM_ROOT = Path(tempfile.mkdtemp(prefix="vault-test-hsm-"))

from vault import he, logs  # noqa: E402
from vault.keys import softhsm  # noqa: E402
from vault.keys.hsm import Hsm, HsmConfig  # noqa: E402
from vault.service import Vault  # noqa: E402
from vault.testing import PostgresServer, ServerProcess  # noqa: E402

DATA = Path(__file__).parent / "data" / "lfw-dlib128.npz"


# Both tokens are made before anything loads the PKCS#11 module: SoftHSM lists the tokens
# of its store when it initialises. The second one is for tests that destroy keys.
_MAIN_TOKEN = softhsm.provision(_HSM_ROOT, token_label="vault-test")
_SPARE_TOKEN = softhsm.provision(_HSM_ROOT, token_label="vault-test-spare")


@pytest.fixture(scope="session")
def hsm_config() -> HsmConfig:
    return _MAIN_TOKEN


@pytest.fixture(scope="session")
def spare_hsm_config() -> HsmConfig:
    """A token of its own, for tests that create and destroy master key versions."""
    return _SPARE_TOKEN


@pytest.fixture(scope="session")
def hsm(hsm_config: HsmConfig) -> Iterator[Hsm]:
    h = Hsm(hsm_config)
    h.ensure_keys()
    yield h
    h.close()


@pytest.fixture
def vault(tmp_path: Path, hsm_config: HsmConfig) -> Iterator[Vault]:
    logs.configure()
    v = Vault.open(tmp_path / "data", hsm_config)
    yield v
    v.close()


@pytest.fixture(scope="session")
def lfw() -> dict[str, np.ndarray]:
    with np.load(DATA) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server shared by the API tests (each test uses its own collection)."""
    root = tmp_path_factory.mktemp("server")
    with ServerProcess(root / "data") as s:
        yield s


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (a fresh database per test: pg_url)."""
    server = PostgresServer().start()
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL of a new, empty PostgreSQL database."""
    return postgres.create_database()


@pytest.fixture(scope="session")
def keypair() -> tuple[bytes, bytes]:
    """One CKKS key pair for the HE unit tests: (secret context, public context)."""
    return he.generate(he.DEFAULT_PARAMS)


@pytest.fixture(scope="session")
def public(keypair: tuple[bytes, bytes]) -> he.PublicContext:
    return he.PublicContext(keypair[1], he.DEFAULT_PARAMS)


@pytest.fixture(scope="session")
def secret(keypair: tuple[bytes, bytes]) -> he.SecretContext:
    return he.SecretContext(keypair[0], he.DEFAULT_PARAMS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    os.environ.pop("SOFTHSM2_CONF", None)
