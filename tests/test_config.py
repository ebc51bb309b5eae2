"""``vault --config FILE.toml``: the file's values are defaults under the flags and the
environment (flag > env > file > default), for serve, the client commands and the
data-directory commands; unknown keys and bad values are one line naming the key, and
variables read outside the option parser are checked naming the variable. Subprocesses
against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vault.testing import ServerProcess, free_port


def _vault(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
    return subprocess.run([sys.executable, "-m", "vault", *args], check=False,
                          capture_output=True, text=True, timeout=120,
                          env={**environ, **(env or {})})


def _one_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return json.loads(lines[0])["event"] if lines[0].startswith("{") else lines[0]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_config_file_under_flags_and_env(tmp_path: Path) -> None:
    unused = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    file_metrics, env_metrics, health = free_port(), free_port(), free_port()
    cfg = tmp_path / "vault.toml"
    cfg.write_text(f"""
[serve]
listen = "{unused[0]}"            # the flag ServerProcess gives wins
data-dir = "{tmp_path / 'from-file'}"
metrics_listen = "127.0.0.1:{file_metrics}"   # VAULT_METRICS_LISTEN wins
health-listen = "127.0.0.1:{health}"          # only here: used
rate-limit = 500

[client]
target = "{unused[1]}"
""")
    server = ServerProcess(tmp_path / "data", args=["--config", str(cfg)],
                           env={"VAULT_METRICS_LISTEN": f"127.0.0.1:{env_metrics}"})
    with server:
        assert (tmp_path / "data" / "vault.db").exists()
        assert not (tmp_path / "from-file").exists()
        assert "vault_rpc" in _scrape(env_metrics)
        with pytest.raises(urllib.error.URLError):
            _scrape(file_metrics)
        # vault health asks [serve] health-listen; the client commands ask [client] target.
        out = _vault("--config", str(cfg), "health")
        assert out.returncode == 0 and out.stdout.strip() == "SERVING", out.stderr
        out = _vault("collections", "list", "--config", str(cfg))
        assert out.returncode == 3 and f"cannot reach the vault at {unused[1]}" in _one_line(out)
        out = _vault("collections", "list", env={"VAULT_CONFIG": str(cfg),
                                                 "VAULT_TARGET": server.target})
        assert out.returncode == 0, out.stderr
        out = _vault("collections", "list", "--config", str(cfg), "--target", server.target,
                     env={"VAULT_TARGET": unused[0]})
        assert out.returncode == 0, out.stderr
    # The data-directory commands read [serve]'s data-dir and hsm-dir.
    offline = tmp_path / "offline.toml"
    offline.write_text(f'[serve]\ndata-dir = "{server.data_dir}"\nhsm-dir = "{server.hsm_dir}"\n')
    out = _vault("audit", "verify", "--config", str(offline))
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("[serve]\nrate-limit = 'fast'\n",
     "argument --rate-limit: --config {cfg} [serve] rate-limit='fast' is not a number"),
    ("[serve]\nworkers = 0\n", "[serve] workers='0' must be an integer >= 1"),
    ("[serve]\nlisten = 'localhost'\n", "[serve] listen='localhost' has no port"),
    ("[serve]\nrate-limt = 3\n", "--config {cfg}: unknown key 'rate-limt' in [serve]"),
    ("[server]\nlisten = '127.0.0.1:1'\n", "--config {cfg}: unknown section 'server'"),
    ("listen = '127.0.0.1:1'\n", "--config {cfg}: unknown key 'listen': options go under"),
    ("[serve]\ndata-dir = 3\n", "--config {cfg}: [serve] data-dir must be a string"),
    ("[serve]\nrate-limit = true\n", "[serve] rate-limit must be a number or a string"),
    ("[serve]\nallow-insecure-remote = 1\n", "[serve] allow-insecure-remote must be true or false"),
    ("[client]\nlisten = '127.0.0.1:1'\n", "unknown key 'listen' in [client]"),
    ("[serve\n", "--config {cfg}: not valid TOML"),
    ("[serve]\nhsm-pin-file = '/nonexistent/pin'\n",
     "--config {cfg} [serve] hsm-pin-file /nonexistent/pin: no such file"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    cfg = tmp_path / "vault.toml"
    cfg.write_text(text)
    out = _vault("serve", "--config", str(cfg), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2
    assert expected.format(cfg=cfg) in _one_line(out)
    assert not (tmp_path / "d").exists()  # nothing done


def test_missing_config_file(tmp_path: Path) -> None:
    out = _vault("keys", "list", env={"VAULT_CONFIG": str(tmp_path / "none.toml")})
    assert out.returncode == 2
    assert _one_line(out) == f"vault: --config {tmp_path / 'none.toml'}: no such file"


@pytest.mark.parametrize(("env", "expected"), [
    ({"VAULT_ALLOW_INSECURE_REMOTE": "maybe"}, "VAULT_ALLOW_INSECURE_REMOTE='maybe': give 1 or 0"),
    ({"VAULT_HSM_PIN_FILE": "/nonexistent/pin", "VAULT_ALLOW_INSECURE_REMOTE": "1"},
     "VAULT_HSM_PIN_FILE /nonexistent/pin: no such file"),
    ({"VAULT_AUDIT_REFUSED_INTERVAL": "soon"}, "VAULT_AUDIT_REFUSED_INTERVAL='soon' is not a number"),
    ({"VAULT_TLS_CERT": "/nonexistent/c.pem", "VAULT_TLS_KEY": "/nonexistent/k.pem",
      "VAULT_TLS_CLIENT_CA": "/nonexistent/ca.pem"}, "VAULT_TLS_CERT /nonexistent/c.pem: no such file"),
])
def test_environment_values_name_the_variable(tmp_path: Path, env: dict[str, str],
                                              expected: str) -> None:
    out = _vault("serve", "--listen", f"0.0.0.0:{free_port()}",
                 "--data-dir", str(tmp_path / "d"), env=env)
    assert out.returncode == 2
    assert expected in _one_line(out)
    assert not (tmp_path / "d").exists()
