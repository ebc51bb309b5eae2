"""``vault`` command line: ``serve`` runs the service, ``demo`` exercises a running one."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

from vault import logs
from vault.errors import VaultError

log = logs.get("vault.cli")


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    from vault.api.server import build_server
    from vault.keys import softhsm
    from vault.keys.hsm import HsmConfig
    from vault.service import Vault

    logs.configure()
    data_dir = Path(args.data_dir)
    if not _is_loopback(args.listen) and not args.allow_insecure_remote:
        log.error("refusing to serve without TLS on a non-loopback address", listen=args.listen)
        return 2
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if args.hsm_module:
            pin = os.environ.get("VAULT_HSM_PIN")
            if not pin:
                log.error("VAULT_HSM_PIN must be set with --hsm-module")
                return 2
            hsm_config = HsmConfig(args.hsm_module, args.hsm_token, pin)
        else:
            hsm_config = softhsm.provision(data_dir / "hsm", args.hsm_token)
        vault = Vault.open(data_dir, hsm_config)
    except VaultError as exc:
        log.error("cannot start: " + exc.message, error_type=type(exc).__name__)
        return 1
    server, port, _health = build_server(vault, args.listen)
    server.start()
    log.warning("serving without TLS: loopback only (embedded default)", listen=args.listen)
    log.info("serving", listen=args.listen, data_dir=str(data_dir), tls=False)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    server.stop(grace=5).wait()
    vault.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vault", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC service")
    p.add_argument("--data-dir", default=os.environ.get("VAULT_DATA_DIR", "./data"),
                   help="database and embedded SoftHSM token (env VAULT_DATA_DIR)")
    p.add_argument("--listen", default=os.environ.get("VAULT_LISTEN", "127.0.0.1:50051"),
                   help="HOST:PORT (env VAULT_LISTEN)")
    p.add_argument("--hsm-module", default=os.environ.get("VAULT_HSM_MODULE"),
                   help="PKCS#11 module of an external HSM (PIN in VAULT_HSM_PIN); "
                        "default: SoftHSM token under DATA_DIR/hsm")
    p.add_argument("--hsm-token", default=os.environ.get("VAULT_HSM_TOKEN", "vault"),
                   help="token label")
    p.add_argument("--allow-insecure-remote", action="store_true",
                   help="serve plaintext gRPC on a non-loopback address (containers behind a "
                        "private network only)")
    p.set_defaults(func=serve)

    d = sub.add_parser("demo", help="enroll, verify, identify and delete against a server")
    d.add_argument("--target", default=os.environ.get("VAULT_LISTEN", "127.0.0.1:50051"))
    d.set_defaults(func=lambda a: __import__("vault.demo", fromlist=["run"]).run(a.target))

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
