"""Progress without a terminal: plain lines every 10 % of the grid or every 30 s, not a tqdm bar."""

from __future__ import annotations

import io
import re

import pytest

from pipelines.backends import LOG_EVERY_SECONDS, _ProgressLog

LINE = re.compile(r"^evaluate: (\d+)/(\d+) points \((\d+) %\), (\d+\.\d) s elapsed(, ~(\d+) s left)?$")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.slow
def test_piped_run_prints_progress_lines(project) -> None:
    # 5x5 grid in tiles of 5 points: a line at 20, 40, 60, 80 and 100 %
    proc = project.cli("pipelines.run", "debug=default", "compute.progress=true", "compute.max_batch_points=5")
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("evaluate:")]
    assert "\r" not in proc.stderr and "pt/s" not in proc.stderr  # no tqdm bar in a pipe
    assert [LINE.match(ln).group(1) for ln in lines] == ["5", "10", "15", "20", "25"], proc.stderr
    assert all(LINE.match(ln).group(2) == "25" for ln in lines)
    assert LINE.match(lines[0]).group(6) is not None  # time left, while points are left
    assert lines[-1].startswith("evaluate: 25/25 points (100 %)") and "left" not in lines[-1]


def test_progress_line_every_tenth_of_the_grid() -> None:
    out, clock = io.StringIO(), _Clock()
    log = _ProgressLog(441, 0, out, clock=clock)
    for _ in range(441 // 21):
        clock.now += 0.5
        log.update(21)
    log.close()
    lines = _lines(out)
    assert len(lines) == 10  # 44, 88, ... crossed by 21-point steps; 441 at the end
    assert lines[0] == "evaluate: 63/441 points (14 %), 1.5 s elapsed, ~9 s left"
    assert lines[-1] == "evaluate: 441/441 points (100 %), 10.5 s elapsed"


def test_progress_line_every_30_seconds_when_slow() -> None:
    out, clock = io.StringIO(), _Clock()
    log = _ProgressLog(1000, 0, out, clock=clock)
    clock.now = LOG_EVERY_SECONDS - 1
    log.update(1)
    assert _lines(out) == []
    clock.now = LOG_EVERY_SECONDS + 1
    log.update(1)
    assert _lines(out) == ["evaluate: 2/1000 points (0 %), 31.0 s elapsed, ~15469 s left"]


def test_resumed_run_counts_its_own_rate_and_says_nothing_when_disabled() -> None:
    out, clock = io.StringIO(), _Clock()
    log = _ProgressLog(100, 50, out, clock=clock)  # half the grid done before
    clock.now = 10.0
    log.update(10)
    assert _lines(out) == ["evaluate: 60/100 points (60 %), 10.0 s elapsed, ~40 s left"]
    quiet = _ProgressLog(100, 0, None, clock=clock)
    quiet.update(100)
    quiet.close()  # no stream: nothing written, nothing raised
