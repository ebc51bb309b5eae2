"""Each failure a new user trips over is one line naming what was wrong and what to do,
with a documented exit code, and no traceback (``python -m vault ...`` as a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vault.testing import ServerProcess, free_port


def _vault(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
           timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "vault", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _one_line(out: subprocess.CompletedProcess) -> str:
    """The single line of stderr (a serve error is one JSON log line: its event)."""
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    return json.loads(line)["event"] if line.startswith("{") else line


def test_bad_number_in_env_names_the_variable_and_spares_help(tmp_path: Path) -> None:
    env = {"VAULT_RATE_LIMIT": "fast"}
    assert _vault("--help", env=env).returncode == 0
    assert _vault("serve", "--help", env=env).returncode == 0
    out = _vault("serve", "--data-dir", str(tmp_path / "d"), env=env)
    assert out.returncode == 2
    assert "VAULT_RATE_LIMIT='fast' is not a number" in _one_line(out)
    out = _vault("serve", "--data-dir", str(tmp_path / "d"), env={"VAULT_WORKERS": "0"})
    assert out.returncode == 2 and "VAULT_WORKERS='0' must be an integer >= 1" in _one_line(out)
    assert not (tmp_path / "d").exists()  # nothing done


def test_listen_without_port_is_refused(tmp_path: Path) -> None:
    out = _vault("serve", "--data-dir", str(tmp_path / "d"), "--listen", "localhost")
    assert out.returncode == 2
    assert "'localhost' has no port: give HOST:PORT" in _one_line(out)
    out = _vault("demo", env={"VAULT_TARGET": "vault.example"})
    assert out.returncode == 2 and "VAULT_TARGET='vault.example' has no port" in _one_line(out)


def test_demo_without_a_server() -> None:
    target = f"127.0.0.1:{free_port()}"
    out = _vault("demo", "--target", target)
    assert out.returncode == 3
    line = _one_line(out)
    assert f"cannot reach the vault at {target}" in line and "make run" in line


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _vault("serve", "--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 2
    assert f"--listen 127.0.0.1:{port}: the address is in use" in _one_line(out)
    assert not (tmp_path / "d").exists()


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "certs" / "server.pem"
    out = _vault("serve", "--data-dir", str(tmp_path / "d"), "--tls-cert", str(missing),
                 "--tls-key", str(missing), "--tls-client-ca", str(missing))
    assert out.returncode == 2
    assert _one_line(out) == f"--tls-cert {missing}: no such file"
    out = _vault("keys", "list", "--tls-ca", str(missing))
    assert out.returncode == 2 and f"--tls-ca {missing}: no such file" in _one_line(out)


_UNSHARE = shutil.which("unshare")
needs_userns = pytest.mark.skipif(
    _UNSHARE is None or subprocess.run([_UNSHARE or "unshare", "-rm", "true"], check=False).returncode != 0,
    reason="needs user and mount namespaces (unshare -rm)")


@needs_userns
@pytest.mark.parametrize("mode", [0o755, 0o700])  # 0700: the image's own /data, root-owned
def test_data_directory_owned_by_another_user(tmp_path: Path, mode: int) -> None:
    # A volume owned by someone else (the root-owned Docker volume): in a user namespace,
    # root has no power over a directory whose owner is not mapped into it.
    data = tmp_path / "volume"
    data.mkdir(mode=mode)
    data.chmod(mode)
    os.chown(data, 12345, 12345)
    out = _vault("serve", "--data-dir", str(data), "--hsm-dir", str(tmp_path / "hsm"),
                 prefix=("unshare", "-r"))
    assert out.returncode == 2
    line = _one_line(out)
    assert f"--data-dir {data} is not writable by this process" in line and "chown" in line


@needs_userns
def test_read_only_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "ro"
    data.mkdir()
    command = (f"mount --bind {data} {data} && mount -o remount,bind,ro {data} && "
               f"exec {sys.executable} -m vault serve --data-dir {data} --hsm-dir {tmp_path}/hsm")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", command], check=False, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert f"--data-dir {data} is on a read-only file system" in _one_line(out)


def test_audit_verify_on_a_missing_directory(tmp_path: Path) -> None:
    out = _vault("audit", "verify", "--data-dir", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert f"--data-dir {tmp_path / 'nowhere'}: no such directory" in _one_line(out)


def test_version_help_defaults_and_env_vars() -> None:
    from vault import __version__

    assert _vault("--version").stdout.strip() == f"vault {__version__}"
    text = re.sub(r"\s+", " ", _vault("serve", "--help").stdout)
    for shown in ("(env VAULT_RATE_LIMIT) (default: 1000)", "VAULT_HSM_TOKEN", "VAULT_HSM_MODULE",
                  "VAULT_ROUTE_MIN_BLOCKS", "VAULT_WORKERS", "VAULT_METRICS_LISTEN",
                  "exit codes: 0 done; 1 the operation failed"):
        assert shown in text
    assert "VAULT_TLS_CLIENT_CERT" in re.sub(r"\s+", " ", _vault("keys", "list", "--help").stdout)


def test_options_after_subcommands_and_rpc_failure_exit_code(server: ServerProcess) -> None:
    out = _vault("keys", "list", "--target", server.target)
    assert out.returncode == 0, out.stderr
    assert "master key versions in the token" in out.stdout
    out = _vault("keys", "--target", server.target, "list", "--collection", "absent")
    assert out.returncode == 1  # the RPC failed: 1, not the usage code
    assert _one_line(out) == "vault keys: NOT_FOUND: collection not found"


def test_demo_prints_scores_as_the_contract_rounds_them(server: ServerProcess) -> None:
    out = _vault("demo", "--target", server.target)
    assert out.returncode == 0, out.stderr
    scores = next(line for line in out.stdout.splitlines() if "analyst" in line)
    assert re.search(r"person-\d \d\.\d\d\b", scores)
    assert not re.search(r"\d\.\d{3,}", out.stdout)


def test_missing_hsm_module_is_named(tmp_path: Path) -> None:
    module = tmp_path / "lib" / "libsofthsm2.so"
    server = ServerProcess(tmp_path / "d", env={"VAULT_HSM_PIN": "1234"},
                           args=["--hsm-module", str(module)])
    server.start(serving=False)  # waits for the module (tests/reliability: then serves)
    try:
        expected = f"listening but NOT_SERVING until the HSM answers at module {module}"
        for _ in range(100):  # health answers a moment before that line is written
            log = server.log_path.read_text()
            if expected in log:
                break
            time.sleep(0.1)
        assert f"--hsm-module {module}: no such file; not serving until it appears" in log
        assert expected in log
        assert "Traceback" not in log
    finally:
        server.stop()
