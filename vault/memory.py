"""The machine's memory, as the gallery sees it: imports, enrollments and key rotations
are refused (``RESOURCE_EXHAUSTED``) before they would leave less than a reserve free,
instead of the kernel's OOM killer ending the vault in the middle of a write.

The gallery holds every block in memory (16 MiB per 4,096 512-d templates), so the
largest gallery a node serves is set by its memory; the reserve keeps room for what a
running vault needs besides (an import chunk's buffers, a restart's reads, the decider).
With Ray shards the blocks live on other nodes and the guard is off (vault.core). The
limits seen are those of the process's own memory cgroup (``/proc/self/cgroup``) and of
every cgroup above it, v2 or v1: a container's, a systemd service's ``MemoryMax`` or a
slice's over it.
"""

from __future__ import annotations

from pathlib import Path

from vault import logs
from vault.domain.errors import ResourceExhausted

log = logs.get("vault.memory")

MIB = 1 << 20


# cgroup v1 writes "no limit" as the largest page-aligned int64.
V1_UNLIMITED = 1 << 62


def available_bytes(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory that can still be taken without swapping: the kernel's MemAvailable, or the
    smallest headroom (limit - usage + reclaimable file pages) of a memory cgroup limit
    over this process, when smaller. None where nothing can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for directory, v1 in _memory_cgroups(proc, cgroup):
        try:
            headroom = _headroom(directory, v1)
        except (OSError, ValueError):
            continue
        if headroom is not None:
            found.append(headroom)
    return min(found) if found else None


def _memory_cgroups(proc: Path, cgroup: Path) -> list[tuple[Path, bool]]:
    """This process's memory cgroup directories, its own first and then each parent up to
    the mount (``(directory, is_v1)``); the mount alone where the membership cannot be
    read or names a path not visible here (a container without its own cgroup namespace)."""
    mounts: list[tuple[Path, bool, str]] = []
    try:
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                mounts.append((cgroup, False, path))
            elif "memory" in controllers.split(","):
                mounts.append((cgroup / "memory", True, path))
    except (OSError, ValueError):
        mounts = [(cgroup, False, "/"), (cgroup / "memory", True, "/")]
    found: list[tuple[Path, bool]] = []
    for mount, v1, path in mounts:
        own = mount / path.strip("/")
        directory = own if ".." not in path.split("/") and own.is_dir() else mount
        while True:
            found.append((directory, v1))
            if directory == mount or directory == directory.parent:
                break
            directory = directory.parent
    return found


def _headroom(directory: Path, v1: bool) -> int | None:
    """What a cgroup's limit still leaves, or None where it sets none."""
    limit_file, usage_file, reclaimable = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file") if v1
        else ("memory.max", "memory.current", "inactive_file"))
    limit = (directory / limit_file).read_text().strip()
    if limit == "max" or int(limit) >= V1_UNLIMITED:
        return None
    used = int((directory / usage_file).read_text())
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return int(limit) - used + int(stat.get(reclaimable, 0))


class MemoryGuard:
    """Refuses a write that would leave less than ``reserve`` bytes available
    (0: never refuses)."""

    def __init__(self, reserve: int) -> None:
        self.reserve = reserve

    def require(self, nbytes: int, what: str) -> None:
        """RESOURCE_EXHAUSTED unless ``nbytes`` more still leave the reserve free."""
        if self.reserve <= 0:
            return
        free = available_bytes()
        if free is None or free - nbytes >= self.reserve:
            return
        log.warning("write refused: memory reserve", count=nbytes // MIB,
                    status=f"available_mib={free // MIB} reserve_mib={self.reserve // MIB}")
        raise ResourceExhausted(
            f"this vault node's memory is full: {what} needs {nbytes // MIB} MiB and would "
            f"leave less than the reserve of {self.reserve // MIB} MiB free "
            f"({free // MIB} MiB available); the gallery is held in memory, so add memory, "
            "move blocks to Ray shards, or delete templates; nothing was stored")
