"""Client-side connection options shared by ``vault import``, ``vault keys`` and ``vault demo``,
and the one-line explanation of a failed call."""

from __future__ import annotations

import argparse

import grpc

from vault.preflight import FAILED, UNREACHABLE, CliError, env, host_port, readable_file


def add_arguments(parser: argparse.ArgumentParser, after_subcommand: bool = False) -> None:
    """--target and the client TLS options. ``after_subcommand``: a second copy on a
    sub-subcommand, which must not reset what was given before it."""

    def default(name: str, value: str | None = None) -> str | None:
        return argparse.SUPPRESS if after_subcommand else env(name, value)

    parser.add_argument("--target", type=host_port,
                        default=default("VAULT_TARGET", env("VAULT_LISTEN", "127.0.0.1:50051")),
                        help="HOST:PORT of the vault (env VAULT_TARGET, else VAULT_LISTEN)")
    parser.add_argument("--tls-ca", default=default("VAULT_TLS_CA"),
                        help="CA certificate that signs the server's (mutual TLS; env VAULT_TLS_CA)")
    parser.add_argument("--tls-cert", default=default("VAULT_TLS_CLIENT_CERT"),
                        help="this client's certificate: its OU values are its roles "
                             "(env VAULT_TLS_CLIENT_CERT)")
    parser.add_argument("--tls-key", default=default("VAULT_TLS_CLIENT_KEY"),
                        help="this client's private key (env VAULT_TLS_CLIENT_KEY)")


def channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the vault: mutual TLS when a CA is given, plaintext otherwise."""
    if not args.tls_ca:
        return grpc.insecure_channel(args.target)
    ca = readable_file(args.tls_ca, "--tls-ca")
    key = readable_file(args.tls_key, "--tls-key")
    cert = readable_file(args.tls_cert, "--tls-cert")
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                         cert.read_bytes() if cert else None)
    return grpc.secure_channel(args.target, creds)


def explain(exc: grpc.RpcError, target: str) -> CliError:
    """A failed call as one line: exit 3 when the vault is out of reach, else 1."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in details or "Connection" in details):
        return CliError(f"cannot reach the vault at {target}: is it running? Start it with "
                        "`make run` (or `vault serve`), or pass --target HOST:PORT", UNREACHABLE)
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"the vault at {target} is not serving: {details}", UNREACHABLE)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"the vault at {target} did not answer in time ({details})", UNREACHABLE)
    return CliError(f"{code.name}: {details}", FAILED)
