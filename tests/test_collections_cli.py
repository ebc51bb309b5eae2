"""``vault collections create|list|get|update|delete`` as subprocesses against a real
server: output, exit codes (docs: 0 done, 1 the RPC failed, 2 bad usage, 3 unreachable)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vault.testing import ServerProcess, free_port


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with ServerProcess(tmp_path_factory.mktemp("cli") / "data",
                       env={"VAULT_RATE_LIMIT": "0"}) as server:
        yield server.target


def _vault(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vault", "collections", *args], check=False,
                          capture_output=True, text=True, timeout=300)


def test_create_list_get_update_delete(target: str) -> None:
    for cid in ("zeta", "alpha"):
        out = _vault("create", "--collection", cid, "--dimension", "8", "--threshold", "0.9",
                     "--target", target)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"{cid}\tdimension=8 threshold=0.9 ")
    out = _vault("--target", target, "list", "--page-size", "1")  # options before or after
    assert out.returncode == 0, out.stderr
    assert [row.split("\t")[0] for row in out.stdout.splitlines()] == ["alpha", "zeta"]
    out = _vault("get", "--collection", "alpha", "--target", target)
    assert out.returncode == 0 and "templates=0 require_purpose=no" in out.stdout
    out = _vault("update", "--collection", "alpha", "--threshold", "-0.25",
                 "--require-purpose", "yes", "--target", target)
    assert out.returncode == 0, out.stderr
    assert "threshold=-0.25 " in out.stdout and "require_purpose=yes" in out.stdout
    out = _vault("delete", "--collection", "alpha", "--target", target)
    assert out.returncode == 2 and "--yes" in out.stderr  # nothing deleted without it
    assert _vault("get", "--collection", "alpha", "--target", target).returncode == 0
    out = _vault("delete", "--collection", "alpha", "--yes", "--target", target)
    assert out.returncode == 0 and "rotate-master" in out.stdout, out.stderr
    out = _vault("get", "--collection", "alpha", "--target", target)
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    out = _vault("list", "--target", target)
    assert [row.split("\t")[0] for row in out.stdout.splitlines()] == ["zeta"]


def test_failures_are_one_line_with_their_exit_code(target: str, tmp_path: Path) -> None:
    out = _vault("create", "--collection", "zeta", "--dimension", "8", "--threshold", "0.9",
                 "--target", target)
    assert out.returncode == 1 and "ALREADY_EXISTS" in out.stderr
    out = _vault("update", "--collection", "zeta", "--target", target)
    assert out.returncode == 1 and "INVALID_ARGUMENT: nothing to update" in out.stderr
    out = _vault("create", "--collection", "x", "--dimension", "eight", "--threshold", "0.9")
    assert out.returncode == 2 and "eight" in out.stderr and "Traceback" not in out.stderr
    out = _vault("list", "--target", f"127.0.0.1:{free_port()}")
    assert out.returncode == 3 and "cannot reach" in out.stderr


def test_the_client_package_lists_and_deletes(target: str) -> None:
    """vault_client's list_collections (every page) and delete_collection, from its own
    source directory (tests/test_client_package.py installs it alone in a fresh venv)."""
    script = (
        "import sys\nfrom vault_client import VaultClient\n"
        "with VaultClient(sys.argv[1]) as c:\n"
        "    for cid in ('p1', 'p2', 'p3'):\n"
        "        c.create_collection(cid, 8, 0.9)\n"
        "    print(','.join(x.collection_id for x in c.list_collections(page_size=2)))\n"
        "    print(c.delete_collection('p2'))\n"
        "    print(','.join(x.collection_id for x in c.list_collections()))\n")
    client_dir = Path(__file__).resolve().parents[1] / "client"
    out = subprocess.run([sys.executable, "-c", script, target], check=False, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(client_dir)})
    assert out.returncode == 0, out.stderr
    before, deleted, after = out.stdout.split()
    assert [c for c in before.split(",") if c.startswith("p")] == ["p1", "p2", "p3"]
    assert deleted == "0" and [c for c in after.split(",") if c.startswith("p")] == ["p1", "p3"]
