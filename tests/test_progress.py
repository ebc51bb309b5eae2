"""Progress of long work: JSON lines every tenth off a terminal, a bar on one, nothing
when quiet."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest

from vault import logs
from vault.progress import Progress, progress


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure(stream=out)
    yield out
    logs.configure()


def _events(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_off_a_terminal_logs_each_tenth_once_and_the_end(log_lines: io.StringIO) -> None:
    assert list(progress(range(1000), 1000, "import")) == list(range(1000))
    events = _events(log_lines)
    assert [e["count"] for e in events] == list(range(100, 1001, 100))
    assert {e["event"] for e in events} == {"progress"} and {e["kind"] for e in events} == {"import"}
    assert events[-1]["status"] == "1000/1000"


def test_a_total_learnt_on_the_way_and_jumps_log_once_each(log_lines: io.StringIO) -> None:
    with Progress(0, "rotating", bar=False) as shown:
        shown.update(0)  # nothing known yet: no line, no division by zero
        shown.update(3, total=12)
        shown.update(3, total=12)  # no change, no second line
        shown.update(12, note="done")
    assert [(e["count"], e["status"]) for e in _events(log_lines)] == [(3, "3/12"), (12, "12/12 done")]


def test_a_bar_goes_to_stderr_and_quiet_shows_nothing(log_lines: io.StringIO,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(10, "enroll", bar=True) as shown:
        shown.advance(10)
    assert "enroll" in capsys.readouterr().err and _events(log_lines) == []
    list(progress(range(10), 10, "enroll", quiet=True))
    assert capsys.readouterr().err == "" and _events(log_lines) == []
