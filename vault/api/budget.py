"""Match budgets and probing detection, per credential and collection.

Two things stop a caller that holds a valid credential from rebuilding templates:

- **Budgets**: token buckets per (credential, collection, kind), refilled at a rate per
  hour and holding at most ``BURST_MINUTES`` of it: 1:1 verifications, 1:N
  identifications, and score releases (the analyst role). Past one: RESOURCE_EXHAUSTED
  with how long to wait.
- **Probing**: reconstruction attacks query around one point (central differences,
  perturbation sweeps, averaging of accepted probes). Each credential keeps a ring of its
  recent protected probes (in memory only; unit vectors in the collection's transformed
  space, where cosines are those of the embeddings); a probe with ``cluster`` or more
  earlier ones within cosine ``radius`` of it inside ``window`` seconds trips the guard:
  the credential's matches on that collection are refused for ``cooldown`` seconds
  (RESOURCE_EXHAUSTED) and one alert is audited.

Defaults (flags and env of ``vault serve``, see docs/SECURITY.md) suit an access-control
gate: a thousand visits an hour, several frames of one person per visit.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vault.domain.errors import ResourceExhausted

BURST_MINUTES = 10.0


@dataclass(frozen=True)
class BudgetConfig:
    """Rates per credential and collection (0: unlimited) and the probing guard."""

    verify_per_hour: float = 6000.0
    identify_per_hour: float = 6000.0
    scores_per_day: float = 1000.0
    probe_radius: float = 0.95  # cosine: frames of one person, never two people (see docs)
    probe_cluster: int = 32
    probe_window: float = 600.0
    probe_cooldown: float = 3600.0
    probe_ring: int = 256


class Tripped(ResourceExhausted):
    """The probing guard tripped now (the caller audits the alert once)."""


class _Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens, self.last = tokens, last


class _Ring:
    """A credential's recent probes on one collection."""

    def __init__(self, size: int) -> None:
        self.probes: deque[tuple[float, np.ndarray]] = deque(maxlen=size)
        self.blocked_until = 0.0


class Budgets:
    """Every budget and probe ring of one server (at most ``max_keys`` remembered)."""

    def __init__(self, config: BudgetConfig | None = None,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.config = config or BudgetConfig()
        self._clock = clock
        self._max = max_keys
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[str, str, str], _Bucket] = OrderedDict()
        self._rings: OrderedDict[tuple[str, str], _Ring] = OrderedDict()

    def now(self) -> float:
        return self._clock()

    def take(self, identity: str, collection_id: str, kind: str) -> None:
        """Spend one unit of ``kind`` (``verify``, ``identify``, ``scores``)."""
        per_hour = {"verify": self.config.verify_per_hour,
                    "identify": self.config.identify_per_hour,
                    "scores": self.config.scores_per_day / 24}[kind]
        if per_hour <= 0:
            return
        rate = per_hour / 3600
        burst = max(1.0, per_hour * BURST_MINUTES / 60) if kind != "scores" \
            else max(1.0, per_hour * 24)  # scores: a day's budget, spendable at once
        now = self.now()
        key = (identity, collection_id, kind)
        with self._lock:
            bucket = self._buckets.pop(key, None) or _Bucket(burst, now)
            self._buckets[key] = bucket
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.last) * rate)
            bucket.last = now
            if bucket.tokens < 1:
                wait = math.ceil((1 - bucket.tokens) / rate)
                what = {"verify": "1:1 verifications", "identify": "1:N identifications",
                        "scores": "score releases"}[kind]
                unit = "day" if kind == "scores" else "hour"
                amount = self.config.scores_per_day if kind == "scores" else per_hour
                raise ResourceExhausted(f"budget of {amount:g} {what} per {unit} for this "
                                        f"credential and collection spent; retry in {wait} s")
            bucket.tokens -= 1
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)

    def check_blocked(self, identity: str, collection_id: str) -> None:
        """RESOURCE_EXHAUSTED while the credential's probing guard is tripped."""
        with self._lock:
            ring = self._rings.get((identity, collection_id))
            wait = ring.blocked_until - self.now() if ring is not None else 0.0
        if wait > 0:
            raise ResourceExhausted(
                "probing pattern detected (many probes around one point): matches of this "
                f"credential on this collection are refused; retry in "
                f"{math.ceil(wait)} s")

    def observe(self, identity: str, collection_id: str, probe: np.ndarray) -> None:
        """Record a protected probe; :class:`Tripped` if it completes a probing cluster."""
        cfg = self.config
        if cfg.probe_cluster <= 0:
            return
        unit = np.asarray(probe, np.float32)
        unit = unit / max(float(np.linalg.norm(unit)), 1e-12)
        now = self.now()
        key = (identity, collection_id)
        with self._lock:
            ring = self._rings.pop(key, None) or _Ring(cfg.probe_ring)
            self._rings[key] = ring
            while ring.probes and ring.probes[0][0] < now - cfg.probe_window:
                ring.probes.popleft()
            near = 0
            if ring.probes:
                earlier = np.stack([p for _, p in ring.probes])
                near = int(np.count_nonzero(earlier @ unit >= cfg.probe_radius))
            ring.probes.append((now, unit))
            tripped = near >= cfg.probe_cluster
            if tripped:
                ring.blocked_until = now + cfg.probe_cooldown
                ring.probes.clear()
            while len(self._rings) > self._max:
                self._rings.popitem(last=False)
        if tripped:
            raise Tripped(f"probing pattern detected ({near} recent probes within cosine "
                          f"{cfg.probe_radius:g} of this one): matches of this credential on "
                          f"this collection are refused for {cfg.probe_cooldown:g} s")


def file_clock(path: str) -> Callable[[], float]:
    """Tests only (env VAULT_BUDGET_CLOCK_FILE): the time is the number in ``path``, which
    the test advances, so that an hour of traffic needs no hour of waiting."""
    def now() -> float:
        with open(path) as f:
            return float(f.read())
    return now
