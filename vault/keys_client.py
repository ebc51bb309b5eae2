"""``vault keys``: the key lifecycle of a running vault, for its security team.

    vault keys list [--collection C]        master key versions; a collection's versions
    vault keys rotate-master                new master key version, rewrap, destroy old
    vault keys rewrap                       finish an interrupted master key rotation
    vault keys rotate --collection C        new transform and CKKS keys (background job)
    vault keys job JOB_ID [--wait]          a rotation's progress
    vault keys set-min --collection C --version V
"""

from __future__ import annotations

import time

import grpc

from vault.progress import Progress
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

_STATES = {pb.KeyJob.STATE_RUNNING: "running", pb.KeyJob.STATE_DONE: "done",
           pb.KeyJob.STATE_FAILED: "failed"}


def _job_line(job: pb.KeyJob) -> str:
    line = (f"job {job.job_id}: collection {job.collection_id} v{job.from_version} -> "
            f"v{job.to_version}, {_STATES.get(job.state, 'unknown')}, "
            f"{job.blocks_done}/{job.blocks_total} blocks")
    return line + (f" (error: {job.error})" if job.error else "")


def wait(stub: vault_pb2_grpc.TemplateVaultStub, job: pb.KeyJob, poll: float = 1.0,
         progress: bool | None = None) -> pb.KeyJob:
    """Poll a rotation until it ends; a bar on a terminal, log lines otherwise."""
    with Progress(job.blocks_total, "rotating", "block", bar=progress) as shown:
        while job.state == pb.KeyJob.STATE_RUNNING:
            time.sleep(poll)
            job = stub.GetKeyJob(pb.GetKeyJobRequest(job_id=job.job_id), timeout=30)
            shown.update(job.blocks_done, total=job.blocks_total)
    return job


def run(channel: grpc.Channel, command: str, collection: str = "", job_id: str = "",
        version: int = 0, wait_for_job: bool = False) -> int:
    stub = vault_pb2_grpc.TemplateVaultStub(channel)
    if command == "list":
        r = stub.ListKeyVersions(pb.ListKeyVersionsRequest(collection_id=collection), timeout=30)
        print(f"master key versions in the token: {list(r.master_key_versions)} "
              f"(current v{r.current_master_key_version})")
        if collection:
            print(f"collection {r.collection_id}: key version v{r.key_version}, minimum "
                  f"v{r.min_key_version}, held {['v%d' % v for v in r.key_versions]}")
            if r.HasField("job"):
                print(_job_line(r.job))
        return 0
    if command in ("rotate-master", "rewrap"):
        call = stub.RotateMasterKey if command == "rotate-master" else stub.RewrapKeys
        request = pb.RotateMasterKeyRequest() if command == "rotate-master" else pb.RewrapKeysRequest()
        r = call(request, timeout=600)
        print(f"master key v{r.version}: {r.rewrapped} wrapped keys rewrapped, destroyed "
              f"{['v%d' % v for v in r.destroyed_versions] or 'nothing'}")
        return 0
    if command == "rotate":
        job = stub.RotateCollectionKey(pb.RotateCollectionKeyRequest(collection_id=collection),
                                       timeout=120)
        print(_job_line(job))
        if wait_for_job:
            job = wait(stub, job)
            print(_job_line(job))
        return 0 if job.state != pb.KeyJob.STATE_FAILED else 1
    if command == "job":
        job = stub.GetKeyJob(pb.GetKeyJobRequest(job_id=job_id), timeout=30)
        if wait_for_job:
            job = wait(stub, job)
        print(_job_line(job))
        return 0 if job.state != pb.KeyJob.STATE_FAILED else 1
    if command == "set-min":
        r = stub.SetMinKeyVersion(pb.SetMinKeyVersionRequest(collection_id=collection,
                                                             min_key_version=version), timeout=30)
        print(f"collection {r.collection_id}: key version v{r.key_version}, minimum "
              f"v{r.min_key_version}")
        return 0
    raise ValueError(f"unknown keys command {command}")
