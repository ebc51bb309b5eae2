"""Progress of long work (imports, rotations, benchmarks): a bar on a terminal, a
structured log line every tenth of the way otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Self, TypeVar

from vault import logs

T = TypeVar("T")
log = logs.get("vault.progress")


class Progress:
    """Tracks ``done`` out of ``total``; ``bar`` None means a bar when stderr is a terminal,
    ``quiet`` shows nothing at all (tests that drive a benchmark)."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, bar: bool | None = None,
                 quiet: bool = False, position: int = 0) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self._logged_tenth = 0
        self._bar = None
        if not quiet and (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr,
                             position=position)
        self._log = not quiet and self._bar is None

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """Move to ``done`` (and ``total``, when the amount of work is learnt on the way)."""
        self.done = done
        if total is not None:
            self.total = total
        if self._bar is not None:
            self._bar.total = self.total
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(done - self._bar.n)  # tqdm limits how often it redraws
            return
        tenth = min(10, 10 * done // max(self.total, 1))
        if self._log and tenth > self._logged_tenth:
            self._logged_tenth = tenth
            log.info("progress", kind=self.desc, count=done,
                     status=f"{done}/{self.total}" + (f" {note}" if note else ""))

    def still(self, note: str) -> None:
        """Say the work goes on without moving (a long step that reports no count): the
        bar's note, or one log line."""
        if self._bar is not None:
            self._bar.set_postfix_str(note)  # redraws: the elapsed time moves
        elif self._log:
            log.info("progress", kind=self.desc, count=self.done,
                     status=f"{self.done}/{self.total} {note}")

    def advance(self, count: int = 1) -> None:
        """Move ``count`` further."""
        self.update(self.done + count)

    def close(self) -> None:
        """Remove the bar (log lines need no closing)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def progress(iterable: Iterable[T], total: int, desc: str, *, quiet: bool = False) -> Iterator[T]:
    """Iterate over ``iterable`` showing a :class:`Progress`."""
    with Progress(total, desc, quiet=quiet) as shown:
        for item in iterable:
            yield item
            shown.advance()
