"""``vault collections``: collection admin against a running vault.

    vault collections create --collection C --dimension D --threshold T [--require-purpose]
    vault collections list [--page-size N]     every collection, by id (all pages)
    vault collections get --collection C
    vault collections update --collection C [--threshold T] [--require-purpose yes|no]
    vault collections delete --collection C --yes   crypto-shred it (see docs/SECURITY.md)
"""

from __future__ import annotations

import argparse

import grpc

from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


def line(c: pb.Collection) -> str:
    """One collection as one line (the threshold as the float32 it is stored as, rounded)."""
    return (f"{c.collection_id}\tdimension={c.dimension} threshold={round(c.threshold, 6)} "
            f"key_version={c.key_version} min_key_version={c.min_key_version} "
            f"templates={c.template_count} require_purpose={'yes' if c.require_purpose else 'no'}")


def run(channel: grpc.Channel, args: argparse.Namespace) -> int:
    """Run one ``vault collections`` subcommand; prints its result, returns 0, or 1 when
    the list holds damaged collections (a failed RPC raises grpc.RpcError for the caller
    to explain)."""
    stub = vault_pb2_grpc.TemplateVaultStub(channel)
    command, cid = args.collections_command, getattr(args, "collection", "")
    if command == "create":
        request = pb.CreateCollectionRequest(collection_id=cid, dimension=args.dimension,
                                             threshold=args.threshold,
                                             require_purpose=args.require_purpose)
        print(line(stub.CreateCollection(request, timeout=120)))
    elif command == "list":
        token, damaged = "", 0
        while True:
            page = stub.ListCollections(pb.ListCollectionsRequest(
                page_size=args.page_size, page_token=token), timeout=60)
            for c in page.collections:
                print(line(c))
            for d in page.damaged:
                print(f"{d.collection_id}\tDAMAGED: {d.reason}")
                damaged += 1
            token = page.next_page_token
            if not token:
                break
    elif command == "get":
        print(line(stub.GetCollection(pb.GetCollectionRequest(collection_id=cid), timeout=60)))
    elif command == "update":
        update = pb.UpdateCollectionRequest(collection_id=cid)
        if args.threshold is not None:
            update.threshold = args.threshold
        if args.require_purpose is not None:
            update.require_purpose = args.require_purpose == "yes"
        print(line(stub.UpdateCollection(update, timeout=60)))
    elif command == "delete":
        done = stub.DeleteCollection(pb.DeleteCollectionRequest(collection_id=cid), timeout=300)
        print(f"deleted collection {cid} and its {done.templates_deleted} templates; run "
              "`vault keys rotate-master` so that old backups cannot open it either")
    return 1 if command == "list" and damaged else 0
