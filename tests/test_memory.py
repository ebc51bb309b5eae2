"""A node whose memory is full refuses imports and enrollments (RESOURCE_EXHAUSTED,
nothing stored) and goes on matching; with room again, the same data directory takes
them. Tried through a real server: the reserve is set above what any machine has."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from vault.domain.errors import ResourceExhausted
from vault.memory import MemoryGuard, available_bytes
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode


def test_available_memory_is_the_smaller_of_the_kernels_and_the_cgroups(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cgroup.mkdir()
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 2000000 kB\n")
    assert available_bytes(proc, cgroup) == 2_000_000 * 1024  # no cgroup files: the kernel's
    (cgroup / "memory.max").write_text("max\n")
    assert available_bytes(proc, cgroup) == 2_000_000 * 1024
    (cgroup / "memory.max").write_text(str(1 << 30))
    (cgroup / "memory.current").write_text(str(900 << 20))
    (cgroup / "memory.stat").write_text(f"anon 1\ninactive_file {100 << 20}\n")
    assert available_bytes(proc, cgroup) == (1 << 30) - (800 << 20)  # the limit's headroom
    assert available_bytes(tmp_path / "none", tmp_path / "none") is None


def test_a_limit_on_any_cgroup_above_the_process_is_seen_v2_and_v1(tmp_path: Path) -> None:
    """A host service: its own cgroup sets no limit, its slice does (MemoryMax on a parent);
    the smallest headroom on the way up is the one that counts."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemAvailable: 20000000 kB\n")
    kernel = 20_000_000 * 1024

    def limits(directory: Path, limit: str, used: int, cache: int, v1: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        names = (("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
                 if v1 else ("memory.max", "memory.current", "inactive_file"))
        (directory / names[0]).write_text(limit + "\n")
        (directory / names[1]).write_text(f"{used}\n")
        (directory / "memory.stat").write_text(f"anon 5\n{names[2]} {cache}\n")

    (proc / "self" / "cgroup").write_text("0::/vault.slice/vault.service\n")
    limits(cgroup, "max", 0, 0)
    limits(cgroup / "vault.slice" / "vault.service", "max", 1 << 30, 0)
    assert available_bytes(proc, cgroup) == kernel
    limits(cgroup / "vault.slice", str(4 << 30), 3 << 30, 256 << 20)
    assert available_bytes(proc, cgroup) == (1 << 30) + (256 << 20)  # the slice's
    limits(cgroup / "vault.slice" / "vault.service", str(2 << 30), 1900 << 20, 0)
    assert available_bytes(proc, cgroup) == 148 << 20  # the service's own, smaller still

    # cgroup v1 (hybrid): the memory controller's own tree, "no limit" a huge number
    (proc / "self" / "cgroup").write_text("4:memory:/jobs/job7\n0::/\n")
    unlimited = str((1 << 63) - 4096)
    limits(cgroup / "memory", unlimited, 8 << 30, 0, v1=True)
    limits(cgroup / "memory" / "jobs" / "job7", unlimited, 1 << 30, 0, v1=True)
    assert available_bytes(proc, cgroup) == kernel
    limits(cgroup / "memory" / "jobs", str(3 << 30), 2 << 30, 100 << 20, v1=True)
    assert available_bytes(proc, cgroup) == (1 << 30) + (100 << 20)

    # a membership path not visible here (no cgroup namespace): the mount's own limit
    (proc / "self" / "cgroup").write_text("0::/elsewhere/not-mounted\n")
    limits(cgroup, str(10 << 30), 9 << 30, 0)
    assert available_bytes(proc, cgroup) == 1 << 30


def test_the_guard_refuses_what_would_cross_the_reserve() -> None:
    free = available_bytes()
    assert free is not None  # Linux
    MemoryGuard(0).require(1 << 60, "anything")  # 0: never refuses
    MemoryGuard(1 << 20).require(1 << 20, "a small write")
    with pytest.raises(ResourceExhausted, match="memory is full.*nothing was stored"):
        MemoryGuard(1 << 20).require(free + (1 << 30), "more than there is")


def _count(stub) -> int:  # type: ignore[no-untyped-def]
    return stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count


def test_a_full_node_refuses_writes_stores_nothing_and_keeps_matching(tmp_path: Path, lfw) -> None:
    emb, ids = lfw["emb"], lfw["ids"]
    people = np.unique(ids)[:12]
    face = {p: emb[np.flatnonzero(ids == p)[0]] for p in people}
    data = tmp_path / "data"
    with ServerProcess(data) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                         threshold=0.92))
        stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="first", embedding=face[people[0]]))
    items = [pb.ImportItem(subject_id=f"s{k}", embedding=face[p], request_id=f"r{k}")
             for k, p in enumerate(people[1:])]
    full = ServerProcess(data, env={"VAULT_MEMORY_RESERVE_MB": str(1 << 40)})  # 2^40 MiB: an exbibyte
    with full, full.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ImportTemplates(iter([pb.ImportTemplatesRequest(collection_id="c", items=items)]),
                                      timeout=120))
        assert refused.value.code() == Code.RESOURCE_EXHAUSTED
        assert "memory is full" in refused.value.details() and "nothing was stored" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="second", embedding=face[people[1]]))
        assert refused.value.code() == Code.RESOURCE_EXHAUSTED
        assert "second" not in refused.value.details()
        assert _count(stub) == 1
        # A key rotation would hold a second copy of every block until its switch.
        with pytest.raises(grpc.RpcError) as refused:
            stub.RotateCollectionKey(pb.RotateCollectionKeyRequest(collection_id="c"))
        assert refused.value.code() == Code.RESOURCE_EXHAUSTED and "rotation" in refused.value.details()
        versions = stub.ListKeyVersions(pb.ListKeyVersionsRequest(collection_id="c"))
        assert list(versions.key_versions) == [1] and not versions.HasField("job")
        # Still serving: matches of what is stored, 1:1 and 1:N.
        probe = face[people[0]]
        assert stub.Match(pb.MatchRequest(collection_id="c", subject_id="first", embedding=probe)).matched
        assert stub.Match(pb.MatchRequest(collection_id="c", embedding=probe)).matched
        assert full.health(timeout=5) == 1  # SERVING
    with ServerProcess(data) as server, server.channel() as channel:  # room again
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        answers = [r for m in stub.ImportTemplates(
            iter([pb.ImportTemplatesRequest(collection_id="c", items=items)]), timeout=120)
            for r in m.results]
        assert [a.code for a in answers] == [0] * len(items)
        assert _count(stub) == 1 + len(items)
        found = stub.Match(pb.MatchRequest(collection_id="c", embedding=face[people[5]]))
        assert found.matched and found.candidates[0].subject_id == "s4"
