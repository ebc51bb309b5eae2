"""The machine's memory, as the gallery sees it: imports, enrollments and key rotations
are refused (``RESOURCE_EXHAUSTED``) before they would leave less than a reserve free,
instead of the kernel's OOM killer ending the vault in the middle of a write.

The gallery holds every block in memory (16 MiB per 4,096 512-d templates), so the
largest gallery a node serves is set by its memory; the reserve keeps room for what a
running vault needs besides (an import chunk's buffers, a restart's reads, the decider).
With Ray shards the blocks live on other nodes and the guard is off (vault.core). The
cgroup read is the one mounted at /sys/fs/cgroup (a container's own); a limit set on a
parent cgroup of a host service is not seen.
"""

from __future__ import annotations

from pathlib import Path

from vault import logs
from vault.domain.errors import ResourceExhausted

log = logs.get("vault.memory")

MIB = 1 << 20


def available_bytes(proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory that can still be taken without swapping: the kernel's MemAvailable, or a
    cgroup v2 limit's headroom (limit - usage + reclaimable file pages) when smaller.
    None where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            found.append(int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


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
