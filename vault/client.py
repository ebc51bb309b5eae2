"""Client-side connection options shared by ``vault import``, ``vault keys`` and ``vault demo``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("VAULT_LISTEN", "127.0.0.1:50051"),
                        help="HOST:PORT of the vault (env VAULT_LISTEN)")
    parser.add_argument("--tls-ca", default=os.environ.get("VAULT_TLS_CA"),
                        help="CA certificate that signs the server's (mutual TLS; env VAULT_TLS_CA)")
    parser.add_argument("--tls-cert", default=os.environ.get("VAULT_TLS_CLIENT_CERT"),
                        help="this client's certificate: its OU values are its roles")
    parser.add_argument("--tls-key", default=os.environ.get("VAULT_TLS_CLIENT_KEY"),
                        help="this client's private key")


def channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the vault: mutual TLS when a CA is given, plaintext otherwise."""
    if not args.tls_ca:
        return grpc.insecure_channel(args.target)
    creds = grpc.ssl_channel_credentials(
        Path(args.tls_ca).read_bytes(),
        Path(args.tls_key).read_bytes() if args.tls_key else None,
        Path(args.tls_cert).read_bytes() if args.tls_cert else None)
    return grpc.secure_channel(args.target, creds)
