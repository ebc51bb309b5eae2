"""``vault`` command line: ``serve`` runs the service; ``demo``, ``import`` and ``keys``
call a running one; ``audit``, ``hsm`` and ``restore`` work on its data directory.

Every option can also be set by the environment variable its help names; an option given
on the command line wins over the variable, which wins over the default."""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from vault import client, config, logs, preflight
from vault.domain.errors import HsmPinRejected, Refused, VaultError
from vault.keys.hsm import HsmConfig
from vault.lockfile import DataDirLock
from vault.preflight import EXIT_CODES, USAGE, CliError, env, host_port, number, readable_file

log = logs.get("vault.cli")


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _arm_signals(*signals: signal.Signals) -> Callable[[], None]:
    """Catch ``signals`` from now on; returns a function that blocks until one arrives.

    The kernel may deliver a process signal to any thread (gRPC's, the pools'), and then
    CPython never wakes a main thread asleep in an untimed lock wait: ``Event.wait()``
    hung on SIGTERM now and then. The C-level handler writes to the wakeup fd from
    whichever thread caught the signal, so a read on that pipe always returns. Armed
    before the server starts, so that a refusal found by the watcher (which signals the
    process) cannot arrive before the handler.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)
    for sig in signals:
        signal.signal(sig, lambda *_: None)  # a Python handler is what arms the wakeup fd

    def wait() -> None:
        try:
            os.read(read_fd, 1)
        finally:
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)

    return wait


def _hsm_dir(args: argparse.Namespace, data_dir: Path) -> Path | None:
    """The embedded SoftHSM directory (None with an external --hsm-module)."""
    from vault import custody

    if args.hsm_module:
        return None
    return Path(args.hsm_dir) if args.hsm_dir else custody.default_hsm_dir(data_dir)


def _hsm_config(args: argparse.Namespace, data_dir: Path, create: bool) -> HsmConfig:
    """How to reach the token: an external module, or the embedded SoftHSM store."""
    from vault.keys import softhsm

    hsm_dir = _hsm_dir(args, data_dir)
    if hsm_dir is None:
        return HsmConfig(args.hsm_module, args.hsm_token, softhsm.read_pin(None))
    return softhsm.provision(hsm_dir, args.hsm_token, create=create)


def _checked_layout(args: argparse.Namespace, data_dir: Path) -> Path | None:
    """The HSM directory, after refusing a token or PIN inside the data directory (exit 2)."""
    from vault import custody

    hsm_dir = _hsm_dir(args, data_dir)
    try:
        custody.check_layout(data_dir, hsm_dir)
    except Refused as exc:
        log.error("refusing to start: " + exc.message)
        raise SystemExit(2) from None
    return hsm_dir


def serve(args: argparse.Namespace) -> int:
    preflight.environment()  # before the imports below read any of it
    from vault.api.lifecycle import VaultHolder
    from vault.api.server import TlsFiles, build_server
    from vault.gallery import Routing
    from vault.service import AttemptLimits, Tuning, Vault

    logs.configure()
    import faiss

    # faiss parallelises with OpenMP on its own; the server's threads already share the
    # cores. Set here, at server start, not at import: a benchmark's plaintext baseline in
    # the same interpreter keeps every core (the honest comparison).
    faiss.omp_set_num_threads(1)
    data_dir = Path(args.data_dir)
    tls_files = [args.tls_cert, args.tls_key, args.tls_client_ca]
    if any(tls_files) and not all(tls_files):
        raise CliError("mutual TLS needs --tls-cert, --tls-key and --tls-client-ca together")
    tls = None
    if all(tls_files):
        tls = TlsFiles(*(readable_file(f, flag) for f, flag in
                         zip(tls_files, ("--tls-cert", "--tls-key", "--tls-client-ca"))))
    insecure = preflight.boolean(args.allow_insecure_remote, "--allow-insecure-remote")
    if tls is None and not _is_loopback(args.listen) and not insecure:
        raise CliError(f"refusing to serve without TLS on the non-loopback address "
                       f"{args.listen}: give --tls-cert, --tls-key and --tls-client-ca, or "
                       "listen on 127.0.0.1")
    if args.hsm_module and not any(map(os.environ.get, ("VAULT_HSM_PIN", "VAULT_HSM_PIN_FILE"))):
        raise CliError("VAULT_HSM_PIN or VAULT_HSM_PIN_FILE must be set with --hsm-module")
    ray_settings = _ray_settings(args)
    if args.hsm_module and not Path(args.hsm_module).is_file():
        # Not a refusal: the server waits NOT_SERVING for the module (a mount, a package
        # being installed), but says which file it waits for.
        log.warning(f"--hsm-module {args.hsm_module}: no such file; not serving until it "
                    "appears (check the path of your HSM's PKCS#11 library)")
    if args.health_listen and not _is_loopback(args.health_listen):
        raise CliError(f"--health-listen {args.health_listen}: the health listener is plaintext "
                       "and unauthenticated: give a loopback address such as 127.0.0.1:50052")
    preflight.bindable(args.listen, "--listen")
    for flag, listen in (("--metrics-listen", args.metrics_listen),
                         ("--health-listen", args.health_listen)):
        if listen:
            preflight.bindable(listen, flag)
    _store_url(args)  # a malformed --store is refused before anything starts
    if data_dir.exists():  # the layout check looks inside: a root-owned 0700 volume first
        preflight.writable_dir(data_dir, preflight.source(args.data_dir, "--data-dir"))
    hsm_dir = _checked_layout(args, data_dir)
    readable_file(env("VAULT_HSM_PIN_FILE", None), "VAULT_HSM_PIN_FILE")
    preflight.writable_dir(data_dir, preflight.source(args.data_dir, "--data-dir"))
    if hsm_dir is not None:
        preflight.writable_dir(hsm_dir, preflight.source(args.hsm_dir, "--hsm-dir"))
    try:
        dir_lock = DataDirLock(data_dir).acquire()
    except VaultError as exc:
        raise CliError(exc.message, preflight.FAILED) from None
    if hsm_dir is not None:
        log.info("embedded SoftHSM token store, outside the data directory; back it up apart "
                 "from the data", hsm_dir=str(hsm_dir.resolve()))

    def open_vault() -> Vault:
        # A database without its token must not get a fresh, empty token.
        hsm_config = _hsm_config(args, data_dir, create=_new_store(args, data_dir))
        limits = AttemptLimits(args.max_failed_verifications, args.lockout_seconds)
        tuning = Tuning(routing=Routing(args.route_fraction, args.route_min_blocks),
                        journal_pages=args.journal_pages, erase_after=args.erase_after,
                        workers=args.workers, maintenance_interval=args.maintenance_interval,
                        journal_quiet=args.journal_quiet, ray=ray_settings,
                        lease_ttl=args.lease_ttl, refresh_interval=args.refresh_interval,
                        memory_reserve=int(args.memory_reserve_mb * (1 << 20)))
        decider = None
        if args.decider == "process":  # the keys live in a child process, not here
            from vault.decider.process import ProcessDecider

            decider = ProcessDecider(hsm_config, workers=args.workers)
        try:
            vault = Vault.open(data_dir, hsm_config, store_url=_store_url(args), limits=limits,
                               tuning=tuning, decider=decider)
        except BaseException:
            if decider is not None:
                decider.close()
            raise
        vault.encryption.warm()
        if collected is not None:
            collected.instrument_vault(vault)
        return vault

    # The server starts even when the HSM is out: NOT_SERVING until the watcher opens it.
    # A refusal (wrong token, older copy) ends the process instead.
    wait = _arm_signals(signal.SIGTERM, signal.SIGINT)
    holder = VaultHolder(open_vault, interval=args.hsm_check_interval,
                         on_refused=lambda: os.kill(os.getpid(), signal.SIGTERM))
    interceptors = []
    collected = None  # read by open_vault when the holder opens the vault
    if args.metrics_listen:
        from vault.api import metrics
        from vault.keys.hsm import Hsm

        collected = metrics.Metrics()
        metrics.instrument_hsm(Hsm, collected)
        collected.instrument_maintenance()
        collected.watch(lambda: holder.vault)
        interceptors.append(collected.interceptor())
        collected.serve(args.metrics_listen)
        log.info("metrics", listen=args.metrics_listen)
    traced = None
    from vault.api import tracing

    if tracing.wanted(args.otel_endpoint):
        try:
            traced = tracing.provider(args.otel_endpoint)
        except tracing.TracingUnavailable as exc:
            raise CliError(f"--otel-endpoint: {exc}") from None
        interceptors.append(tracing.interceptor(traced))
        log.info("tracing: a span per RPC over OTLP")
    try:
        server, _port, _health = build_server(holder, args.listen, tls=tls,
                                             rate_limit=args.rate_limit,
                                             budgets=_budget_config(args),
                                             budget_clock=_budget_clock(),
                                             interceptors=interceptors)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CliError(f"--listen {args.listen}: cannot listen ({type(exc).__name__}); "
                       "choose another address", preflight.FAILED) from None
    health_server = None
    if args.health_listen:
        from vault.api.server import build_health_server

        health_server = build_health_server(_health, args.health_listen)
        health_server.start()
    holder.start()
    if holder.refused is not None:
        return 2  # said why in the log; not a NOT_SERVING limbo
    server.start()
    if tls is None:
        log.warning("serving without TLS: every caller has every role; loopback only "
                    "(embedded default)", listen=args.listen)
    if holder.vault is None:  # listening; every RPC answers UNAVAILABLE with the reason,
        try:                  # which the holder logged once (the line above)
            holder()
        except HsmPinRejected:
            log.warning("listening but NOT_SERVING: wrong PIN for the token; fix "
                        "VAULT_HSM_PIN or VAULT_HSM_PIN_FILE and restart (a PIN is never "
                        "retried: real HSMs lock users out)", listen=args.listen)
        except VaultError:
            where = f" at module {args.hsm_module}" if args.hsm_module else ""
            log.warning(f"listening but NOT_SERVING until the HSM answers{where}; checked "
                        f"every {args.hsm_check_interval:g} s", listen=args.listen)
    else:
        log.info("serving", listen=args.listen, data_dir=str(data_dir), tls=tls is not None)

    wait()
    log.info("shutting down")
    server.stop(grace=5).wait()
    if traced is not None:
        traced.shutdown()  # the spans still batched
    if health_server is not None:
        health_server.stop(grace=1).wait()
    holder.close()
    dir_lock.release()
    log.info("stopped")
    return 2 if holder.refused is not None else 0


def _ray_settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The Ray shard settings of ``vault serve`` (None: blocks scored in process)."""
    if not args.ray_address:
        return None
    from vault.gallery.shards import RaySettings

    mode = os.environ.get("RAY_AUTH_MODE", "token" if args.ray_address == "local" else "")
    if mode != "token":
        raise CliError(f"--ray-address {args.ray_address}: the Ray cluster must use token "
                       "authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or "
                       "RAY_AUTH_TOKEN_PATH, the same on every Ray node (docs/SCALING.md)")
    return RaySettings(address=str(args.ray_address), per_node=args.ray_shards_per_node,
                       cpus=args.ray_shard_cpus, timeout=args.ray_timeout)


def audit_verify(args: argparse.Namespace) -> int:
    """Check the audit log's chain and signatures; exit 1 naming the first bad entry."""
    from vault import audit
    from vault.keys.hsm import Hsm

    data_dir = Path(args.data_dir)
    if not (data_dir / "audit.db").is_file():
        what = "no such directory" if not data_dir.is_dir() else "no audit.db in it"
        raise CliError(f"--data-dir {data_dir}: {what}; give the data directory of a vault "
                       "(the one `vault serve --data-dir` used)")
    if args.public_key:
        try:
            public_key = bytes.fromhex(args.public_key)
        except ValueError:
            raise CliError("--public-key must be the hex Ed25519 key `vault audit verify` "
                           "printed") from None
    else:
        try:
            _checked_layout(args, data_dir)
            hsm = Hsm(_hsm_config(args, data_dir, create=False))
            public_key = hsm.audit_public_key()
            hsm.close()
        except VaultError as exc:
            raise CliError(f"cannot read the audit public key from the token: {exc.message}",
                           preflight.UNREACHABLE) from None
    report = audit.verify(data_dir / "audit.db", public_key)
    print(f"entries: {report.entries}, checkpoints: {report.checkpoints}, "
          f"last signed entry: {report.last_signed_seq}, unsigned tail: {report.unsigned_tail}")
    print(f"audit public key: {public_key.hex()}")
    for problem in report.problems:
        print(f"BAD: {problem}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


def _budget_clock():  # type: ignore[no-untyped-def]
    from vault.api.budget import file_clock

    path = os.environ.get("VAULT_BUDGET_CLOCK_FILE")
    return file_clock(path) if path else None


def _budget_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from vault.api.budget import BudgetConfig

    return BudgetConfig(verify_per_hour=args.verify_budget, identify_per_hour=args.identify_budget,
                        scores_per_day=args.score_budget, probe_radius=args.probe_radius,
                        probe_cluster=args.probe_cluster, probe_window=args.probe_window,
                        probe_cooldown=args.probe_cooldown)


def audit_searches(args: argparse.Namespace) -> int:
    """Who searched a collection (1:N), when, why, and with what outcome."""
    from vault.audit import searches

    rows, counts = searches(Path(args.data_dir) / "audit.db", args.collection, args.purpose)
    for row in rows:
        print(f"{row.when}  {row.actor}  purpose={row.purpose or '-'}  {row.outcome}  "
              f"named={row.named}  threshold={row.threshold}")
    print(f"searches: {len(rows)}")
    for (actor, purpose), by_outcome in sorted(counts.items()):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(by_outcome.items()))
        print(f"  {actor}  purpose={purpose or '-'}: {shown}")
    return 0


def hsm_move(args: argparse.Namespace) -> int:
    """Move an old layout's token store (DATA/hsm) out of the data directory."""
    from vault import custody
    from vault.keys import softhsm

    data_dir, target = Path(args.data_dir), Path(args.to)
    source = data_dir / custody.OLD_LAYOUT
    if not (source / "tokens").is_dir():
        print(f"no token store at {source}: nothing to move", file=sys.stderr)
        return 2
    if custody._inside(target, data_dir):
        print(f"{target} is inside the data directory {data_dir}: choose a place outside it",
              file=sys.stderr)
        return 2
    if target.exists() and any(target.iterdir()):
        print(f"{target} is not empty: refusing to mix token stores", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmdir()
    shutil.move(str(source), str(target))  # tokens/, pin, softhsm2.conf: the whole store
    softhsm.configure(target, create=False)  # the conf names the new tokendir
    print(f"moved the token store to {target}; start with: vault serve --data-dir {data_dir} "
          f"--hsm-dir {target}")
    return 0


def restore(args: argparse.Namespace) -> int:
    """Accept that the data directory was restored from an older copy (an admin's call)."""
    from vault import custody
    from vault.audit import AuditLog
    from vault.keys.hsm import Hsm
    from vault.store import Store

    data_dir = Path(args.data_dir)
    if not args.accept_rollback:
        print("nothing to do: pass --accept-rollback to accept this older copy", file=sys.stderr)
        return 2
    if _new_store(args, data_dir):
        print(f"no vault database in {data_dir}", file=sys.stderr)
        return 2
    _checked_layout(args, data_dir)
    try:  # a running server would go on writing the audit chain this rewinds
        dir_lock = DataDirLock(data_dir).acquire()
    except VaultError as exc:
        print(f"cannot accept the restore: {exc.message}", file=sys.stderr)
        return 2
    try:
        store = Store(_store_url(args) or data_dir / "vault.db")
    except VaultError as exc:
        dir_lock.release()
        print(f"cannot accept the restore: {exc.message}", file=sys.stderr)
        return 2
    hsm = audit = None
    try:
        hsm = Hsm(_hsm_config(args, data_dir, create=False))
        audit = AuditLog(data_dir / "audit.db", hsm)
        before, now = custody.accept_rollback(store, hsm, audit)
    except VaultError as exc:
        print(f"cannot accept the restore: {exc.message}", file=sys.stderr)
        return 2
    finally:
        if audit is not None:
            audit.close()
        store.close()
        if hsm is not None:
            hsm.close()
        dir_lock.release()
    print(f"restore accepted: the token's counter went from checkpoint {before} back to {now}; "
          "the vault will serve this directory")
    return 0


def embed(args: argparse.Namespace) -> int:
    """Photos to a .npz of embeddings for ``vault import``, on this machine (extra faces)."""
    import numpy as np

    from vault.faces import FaceEmbedder, FaceError, embed_files

    try:
        embedder = FaceEmbedder(upsample=args.upsample, jitter=args.jitter)
    except FaceError as exc:
        raise CliError(str(exc)) from None
    images = [Path(p) for p in args.images]
    for path in images:
        readable_file(str(path), "IMAGE")
    embeddings, done, failed = embed_files(images, embedder)
    for message in failed.values():
        print(f"skipped {message}", file=sys.stderr)
    if not done:
        raise CliError("no face in any image: nothing written", preflight.FAILED)
    subjects = [p.parent.name if args.subject_from == "directory" else p.stem for p in done]
    np.savez(args.out, embeddings=embeddings, subject_ids=np.array(subjects))
    print(f"{len(done)} embeddings of {len(set(subjects))} subjects written to {args.out} "
          f"({len(failed)} images skipped); next: vault import {args.out} --collection C")
    return preflight.FAILED if failed else 0


def health(args: argparse.Namespace) -> int:
    """Exit 0 when the vault at --target reports SERVING, 3 otherwise (a health check)."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + args.wait
    while True:
        try:
            with client.channel(args) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=3).status
        except grpc.RpcError as exc:
            status, error = None, client.explain(exc, args.target)
        if status == health_pb2.HealthCheckResponse.SERVING:
            print("SERVING")
            return 0
        if time.monotonic() >= deadline:
            if status is None:
                raise error
            print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            return preflight.UNREACHABLE
        time.sleep(0.5)


def backup(args: argparse.Namespace) -> int:
    """Consistent online snapshot of the data directory (see vault.backup)."""
    from vault.backup import backup as take

    report = take(Path(args.data_dir), Path(args.to))
    print(f"backup in {args.to}: vault.db, audit.db and {report.blocks} block files "
          f"({report.block_bytes / 2**20:.1f} MiB) in {report.seconds:.1f} s, "
          f"{report.rounds} snapshot round(s); no key (the token stays in the HSM directory). "
          "Restore: stop the server, copy these files over the data directory, "
          "vault restore --accept-rollback, start")
    return 0


def demo(args: argparse.Namespace) -> int:
    import grpc

    from vault.demo import run

    try:
        with client.channel(args) as channel:
            return run(channel)
    except grpc.RpcError as exc:
        raise client.explain(exc, args.target) from None


def import_file(args: argparse.Namespace) -> int:
    """Stream a .npz file into a running vault; exit 1 if any item failed."""
    import grpc

    from vault import import_client

    logs.configure()
    try:
        with client.channel(args) as channel:
            report = import_client.run(args.collection, Path(args.file), args.batch, channel=channel)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {args.file}: {exc}") from None
    except grpc.RpcError as exc:
        raise client.explain(exc, args.target) from None
    print(f"{report.stored} new, {report.replayed} already stored, {report.failed} failed, of "
          f"{report.total} items in {report.seconds:.1f} s ({report.rate:.0f} new/s)")
    for message, count in sorted(report.errors.items(), key=lambda kv: -kv[1]):
        print(f"  {count} x {message}")
    return 0 if report.failed == 0 else 1


def keys(args: argparse.Namespace) -> int:
    """Key lifecycle commands against a running vault (see vault.keys_client)."""
    import grpc

    from vault import keys_client

    logs.configure()  # a rotation's progress lines, as JSON off a terminal
    try:
        with client.channel(args) as channel:
            return keys_client.run(channel, args.keys_command, getattr(args, "collection", ""),
                                   getattr(args, "job_id", ""), getattr(args, "version", 0),
                                   getattr(args, "wait", False))
    except grpc.RpcError as exc:
        raise client.explain(exc, args.target) from None


def collections(args: argparse.Namespace) -> int:
    """Collection admin commands against a running vault (see vault.collections_client)."""
    import grpc

    from vault import collections_client

    if args.collections_command == "delete" and not args.yes:
        raise CliError("delete destroys the collection and every template in it for good: "
                       "add --yes to confirm")
    try:
        with client.channel(args) as channel:
            return collections_client.run(channel, args)
    except grpc.RpcError as exc:
        raise client.explain(exc, args.target) from None


def _hsm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hsm-dir", default=env("VAULT_HSM_DIR", None),
                   help="embedded SoftHSM token store and PIN, outside the data directory "
                        "(env VAULT_HSM_DIR; default: DATA_DIR-hsm beside the data directory)")
    p.add_argument("--hsm-token", default=env("VAULT_HSM_TOKEN", "vault"),
                   help="token label (env VAULT_HSM_TOKEN)")


def _data_dir_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=env("VAULT_DATA_DIR", "./data"),
                   help="database, block files and audit log (env VAULT_DATA_DIR)")


def _store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=env("VAULT_STORE", None),
                   help="postgresql://... : keep the database and the block ciphertexts in "
                        "PostgreSQL (the audit log and lock stay in --data-dir; env "
                        "VAULT_STORE); default: SQLite and files in --data-dir")


def _store_url(args: argparse.Namespace) -> str | None:
    """The PostgreSQL URL of --store (never logged: it may hold a password), or None."""
    from vault.storage.connection import is_url

    url: str | None = getattr(args, "store", None)
    if url and not is_url(url):
        raise CliError("--store: give a postgresql://USER@HOST:PORT/DATABASE URL")
    return url or None


def _new_store(args: argparse.Namespace, data_dir: Path) -> bool:
    """True before a vault's first start (a new token may be made): no vault.db, or with
    PostgreSQL no audit log in the data directory yet."""
    return not (data_dir / ("audit.db" if _store_url(args) else "vault.db")).exists()


def _module_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hsm-module", default=env("VAULT_HSM_MODULE", None),
                   help="PKCS#11 module of an external HSM (PIN in VAULT_HSM_PIN or the "
                        "file VAULT_HSM_PIN_FILE; env VAULT_HSM_MODULE); default: the "
                        "embedded SoftHSM token")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (the value its env variable gives, if set)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "%(default)" not in text and "default:" not in text):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """One line for a usage error, naming the option, and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _data_dir_argument(p)
    _store_argument(p)
    p.add_argument("--listen", type=host_port, default=env("VAULT_LISTEN", "127.0.0.1:50051"),
                   help="HOST:PORT, the port required (env VAULT_LISTEN)")
    _module_argument(p)
    _hsm_arguments(p)
    numbers: list[tuple[str, str, type, str, str]] = [
        ("--hsm-check-interval", "VAULT_HSM_CHECK_INTERVAL", float, "1.0",
         "seconds between HSM health checks"),
        ("--max-failed-verifications", "VAULT_MAX_FAILED_VERIFICATIONS", int, "5",
         "failed 1:1 matches in a row that lock a subject; 0 disables"),
        ("--lockout-seconds", "VAULT_LOCKOUT_SECONDS", float, "300",
         "how long a locked subject stays locked"),
        ("--erase-after", "VAULT_ERASE_AFTER", float, "60",
         "seconds after a deletion by which its values are removed from the stored ciphertexts"),
        ("--journal-pages", "VAULT_JOURNAL_PAGES", int, "16",
         ("journal pages (each N/D single enrollments) kept before they are merged into "
          "blocks; every 1:N match scores them all")),
        ("--journal-quiet", "VAULT_JOURNAL_QUIET", float, "60",
         ("seconds a smaller journal may sit without enrollments before it is merged into "
          "blocks anyway; 0 never")),
        ("--lease-ttl", "VAULT_LEASE_TTL", float, "10",
         ("replicas on one PostgreSQL store: seconds the primary's write lease lasts "
          "unrenewed before a standby takes it over")),
        ("--refresh-interval", "VAULT_REFRESH_INTERVAL", float, "0.5",
         ("replicas on one PostgreSQL store: seconds between a standby's reads of the "
          "primary's changes (an enrollment matches there within about this)")),
        ("--memory-reserve-mb", "VAULT_MEMORY_RESERVE_MB", float, "1024",
         ("MiB of the machine's memory imports and enrollments must leave available (the "
          "gallery is held in memory); below it they are refused, 0 never; not applied with "
          "--ray-address, whose shards hold the blocks on other nodes")),
        ("--route-fraction", "VAULT_ROUTE_FRACTION", float, "0.15",
         ("share of clustered blocks a 1:N match scores, nearest the probe first (1 scores "
          "them all)")),
        ("--route-min-blocks", "VAULT_ROUTE_MIN_BLOCKS", int, "16",
         "below this many clustered blocks every one is scored"),
        ("--maintenance-interval", "VAULT_MAINTENANCE_INTERVAL", float, "5",
         "seconds between checkpoint and erasure passes"),
        ("--rate-limit", "VAULT_RATE_LIMIT", float, "1000",
         "calls per second per client, bursts of twice that; 0 disables"),
        ("--verify-budget", "VAULT_VERIFY_BUDGET", float, "6000",
         "1:1 verifications per hour per credential and collection, 0: unlimited"),
        ("--identify-budget", "VAULT_IDENTIFY_BUDGET", float, "6000",
         "1:N identifications per hour per credential and collection, 0: unlimited"),
        ("--score-budget", "VAULT_SCORE_BUDGET", float, "1000",
         "score releases (analyst) per day per credential and collection, 0: unlimited"),
        ("--probe-radius", "VAULT_PROBE_RADIUS", float, "0.95",
         "cosine within which two probes count as one point"),
        ("--probe-cluster", "VAULT_PROBE_CLUSTER", int, "32",
         "earlier probes near a new one that trip the probing guard, 0: off"),
        ("--probe-window", "VAULT_PROBE_WINDOW", float, "600",
         "seconds of probes the guard looks back on"),
        ("--probe-cooldown", "VAULT_PROBE_COOLDOWN", float, "3600",
         "seconds a tripped credential's matches are refused"),
    ]
    for flag, var, kind, default, what in numbers:
        p.add_argument(flag, type=number(kind, None if flag == "--probe-radius" else 0),
                       default=env(var, default), help=f"{what} (env {var})")
    p.add_argument("--decider", choices=("process", "inprocess"),
                   default=env("VAULT_DECIDER", "process"),
                   help="where the secret keys, the PII key and the transforms live: a child "
                        "process of the server (default) or the server itself (env VAULT_DECIDER)")
    p.add_argument("--ray-address", default=env("VAULT_RAY_ADDRESS", None),
                   help="score blocks in Ray shards: a cluster's address (token authentication "
                        "required: RAY_AUTH_MODE=token) or 'local' for a single-node Ray on "
                        "127.0.0.1 (env VAULT_RAY_ADDRESS; default: in process). docs/SCALING.md")
    p.add_argument("--ray-shards-per-node", type=number(int, 1),
                   default=env("VAULT_RAY_SHARDS_PER_NODE", "1"),
                   help="scoring shards per live Ray node (env VAULT_RAY_SHARDS_PER_NODE)")
    p.add_argument("--ray-shard-cpus", type=number(float, 0.01),
                   default=env("VAULT_RAY_SHARD_CPUS", "1"),
                   help="CPUs each shard reserves on its Ray node (below 1 lets several vault "
                        "replicas place their shards on one cluster; env VAULT_RAY_SHARD_CPUS)")
    p.add_argument("--ray-timeout", type=number(float, 0),
                   default=env("VAULT_RAY_TIMEOUT", "30"),
                   help="seconds a shard may take to answer before a 1:N is UNAVAILABLE "
                        "(env VAULT_RAY_TIMEOUT)")
    p.add_argument("--workers", type=number(int, 1), default=env("VAULT_WORKERS", None),
                   help="encryption worker processes (env VAULT_WORKERS; default: one per core)")
    p.add_argument("--tls-cert", default=env("VAULT_TLS_CERT", None),
                   help="server certificate chain (PEM): serve with mutual TLS (env VAULT_TLS_CERT)")
    p.add_argument("--tls-key", default=env("VAULT_TLS_KEY", None),
                   help="server private key (PEM) (env VAULT_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=env("VAULT_TLS_CLIENT_CA", None),
                   help="CA that signs client certificates; their OU values are the roles "
                        "enroller, matcher, analyst, admin (env VAULT_TLS_CLIENT_CA)")
    p.add_argument("--metrics-listen", type=host_port, default=env("VAULT_METRICS_LISTEN", None),
                   help="HOST:PORT serving Prometheus metrics at /metrics, e.g. "
                        "127.0.0.1:9464 (env VAULT_METRICS_LISTEN; default: off)")
    p.add_argument("--otel-endpoint", default=env("VAULT_OTEL_ENDPOINT", None),
                   help="OTLP/gRPC collector for OpenTelemetry traces, a span per RPC with "
                        "no request field in it, e.g. http://127.0.0.1:4317 (extra otel; env "
                        "VAULT_OTEL_ENDPOINT, or OpenTelemetry's OTEL_EXPORTER_OTLP_ENDPOINT; "
                        "default: off)")
    p.add_argument("--health-listen", type=host_port, default=env("VAULT_HEALTH_LISTEN", None),
                   help="loopback HOST:PORT serving only grpc.health, in plaintext, for "
                        "container health checks under mutual TLS or any port "
                        "(env VAULT_HEALTH_LISTEN; default: off)")
    p.add_argument("--allow-insecure-remote", action="store_true",
                   default=env("VAULT_ALLOW_INSECURE_REMOTE", False),
                   help="serve plaintext gRPC on a non-loopback address (containers behind a "
                        "private network only; env VAULT_ALLOW_INSECURE_REMOTE=1)")


def _config_argument(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", metavar="FILE.toml", default=default,
                   help="option defaults from a TOML file: [serve] for serve and the data "
                        "directory commands, [client] for target and TLS; a flag wins over "
                        "its env variable, which wins over the file (env VAULT_CONFIG)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``vault`` command line (every option also accepted after its subcommand)."""
    from vault import __version__

    parser = _Parser(prog="vault", description=__doc__, epilog=EXIT_CODES,
                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"vault {__version__}")
    _config_argument(parser, os.environ.get("VAULT_CONFIG"))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(parent: argparse._SubParsersAction, name: str, text: str) -> _Parser:
        sub = parent.add_parser(name, help=text, description=text, epilog=EXIT_CODES,
                                formatter_class=_Formatter)
        _config_argument(sub, argparse.SUPPRESS)
        return sub

    p = command(sub, "serve", "run the gRPC service")
    _serve_arguments(p)
    p.set_defaults(func=serve)

    d = command(sub, "demo", "enroll, verify, identify and delete against a running server")
    client.add_arguments(d)
    d.set_defaults(func=demo)

    i = command(sub, "import", "stream a .npz file of embeddings into a running vault")
    i.add_argument("file", help="a .npz with 'embeddings' (n, D), 'subject_ids' (n,) and "
                               "optionally 'request_ids' (n,)")
    i.add_argument("--collection", required=True)
    client.add_arguments(i)
    i.add_argument("--batch", type=number(int, 1), default=256,
                   help="items per message (1 MiB at most)")
    i.set_defaults(func=import_file)

    k = command(sub, "keys", "key lifecycle of a running vault (admin)")
    client.add_arguments(k)
    key_sub = k.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)

    def key_command(name: str, text: str) -> _Parser:
        kp = command(key_sub, name, text)
        client.add_arguments(kp, after_subcommand=True)
        return kp

    kl = key_command("list", "master key versions, and a collection's key versions")
    kl.add_argument("--collection", default="")
    key_command("rotate-master", "new master key version; rewrap; destroy old versions")
    key_command("rewrap", "finish an interrupted master key rotation")
    kr = key_command("rotate", "new transform and CKKS keys for a collection")
    kr.add_argument("--collection", required=True)
    kr.add_argument("--wait", action="store_true", help="follow the job until it ends")
    kj = key_command("job", "a collection key rotation's progress")
    kj.add_argument("job_id")
    kj.add_argument("--wait", action="store_true")
    km = key_command("set-min", "refuse key versions below VERSION (only rises)")
    km.add_argument("--collection", required=True)
    km.add_argument("--version", type=number(int, 1), required=True)
    k.set_defaults(func=keys)

    c = command(sub, "collections", "create, list, get, update, delete collections (admin; "
                                    "list and get: any role)")
    client.add_arguments(c)
    coll_sub = c.add_subparsers(dest="collections_command", required=True, parser_class=_Parser)

    def coll_command(name: str, text: str, named: bool = True) -> _Parser:
        cp = command(coll_sub, name, text)
        client.add_arguments(cp, after_subcommand=True)
        if named:
            cp.add_argument("--collection", required=True, help="collection id")
        return cp

    cc = coll_command("create", "a new collection with its own CKKS keys")
    cc.add_argument("--dimension", type=number(int, 2), required=True,
                    help="embedding dimension, 2..1024")
    cc.add_argument("--threshold", type=number(float, None), required=True,
                    help="decision threshold on cosine similarity, in [-1, 1]")
    cc.add_argument("--require-purpose", action="store_true",
                    help="every 1:N identification must give a purpose")
    cl = coll_command("list", "every collection, by id", named=False)
    cl.add_argument("--page-size", type=number(int, 1), default=100,
                    help="collections per request (the server's maximum: 1000)")
    coll_command("get", "one collection's settings and template count")
    cu = coll_command("update", "change the threshold or the purpose requirement (audited)")
    cu.add_argument("--threshold", type=number(float, None), default=None)
    cu.add_argument("--require-purpose", choices=("yes", "no"), default=None)
    cd = coll_command("delete", "crypto-shred a collection: keys, templates, files (audited)")
    cd.add_argument("--yes", action="store_true", help="confirm: nothing can bring it back")
    c.set_defaults(func=collections)

    a = command(sub, "audit", "audit log tools")
    audit_sub = a.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    v = command(audit_sub, "verify", "check the hash chain and the signed checkpoints")
    _data_dir_argument(v)
    _module_argument(v)
    _hsm_arguments(v)
    v.add_argument("--public-key", help="verify offline with this hex Ed25519 public key "
                                        "instead of the token's")
    v.set_defaults(func=audit_verify)
    se = command(audit_sub, "searches", "who ran 1:N searches on a collection, when, why")
    _data_dir_argument(se)
    se.add_argument("--collection", required=True)
    se.add_argument("--purpose", help="only searches with this purpose")
    se.set_defaults(func=audit_searches)

    h = command(sub, "hsm", "embedded SoftHSM token store")
    hsm_sub = h.add_subparsers(dest="hsm_command", required=True, parser_class=_Parser)
    hm = command(hsm_sub, "move", "move DATA_DIR/hsm (old layout) out of the data directory")
    _data_dir_argument(hm)
    hm.add_argument("--to", required=True, help="new HSM directory, outside the data directory")
    hm.set_defaults(func=hsm_move)

    em = command(sub, "embed", "photos to face embeddings on this machine, for vault import "
                               "(extra faces; no image leaves this machine)")
    em.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG, one face each")
    em.add_argument("--out", required=True, help=".npz to write (embeddings, subject_ids)")
    em.add_argument("--subject-from", choices=("stem", "directory"), default="stem",
                    help="subject id: the file name without extension, or its directory's "
                         "name (one directory per person)")
    em.add_argument("--upsample", type=number(int), default=1,
                    help="detector upsampling: finds smaller faces, slower")
    em.add_argument("--jitter", type=number(int), default=0,
                    help="re-samples averaged per face: steadier, slower")
    em.set_defaults(func=embed)

    hc = command(sub, "health", "exit 0 if the vault serves (container health checks)")
    client.add_arguments(hc)
    hc.set_defaults(target=env("VAULT_HEALTH_LISTEN", None) or hc.get_default("target"))
    hc.add_argument("--service", default="", help="health service name ('' is the whole vault; "
                                                   "vault.v1.Integrity: no damaged collection)")
    hc.add_argument("--wait", type=number(float), default=0.0,
                    help="seconds to keep asking until it serves")
    hc.set_defaults(func=health)

    b = command(sub, "backup", "consistent snapshot of a running vault's data directory "
                               "(no key in it)")
    _data_dir_argument(b)
    b.add_argument("--to", required=True, help="new or empty directory, outside the data "
                                               "directory")
    b.set_defaults(func=backup)

    r = command(sub, "restore", "accept a data directory restored from an older copy "
                                "(with the server stopped)")
    r.add_argument("--accept-rollback", action="store_true",
                   help="set the token's rollback counter back to this directory's last "
                        "signed audit checkpoint (recorded in the audit log)")
    _data_dir_argument(r)
    _store_argument(r)
    _module_argument(r)
    _hsm_arguments(r)
    r.set_defaults(func=restore)
    path = config.path_from(sys.argv[1:] if argv is None else argv)
    if path:
        config.apply(parser, config.load(path), path)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``vault`` command; returns its exit code (see ``vault --help``)."""
    try:
        parser = build_parser(argv)
    except CliError as exc:  # the config file: nothing parsed, nothing done
        print(f"vault: {exc.message}", file=sys.stderr)
        return exc.code
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        if args.command == "serve":
            logs.configure()
            log.error(exc.message)
        else:
            print(f"vault {args.command}: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
