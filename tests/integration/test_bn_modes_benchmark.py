"""``benchmarks.bn_modes`` on the small CNN: every mode and strategy runs, vmap reports itself,
and the batched ``recompute_bn`` agrees with the per-point loop."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import bn_modes


def test_bn_modes_benchmark_small_cnn(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        bn_modes.main(["--models", "cnn", "--images", "32", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the process's threads
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| cnn")]
    got = {(r[1].strip(), r[2].strip()): float(r[6]) for r in rows}
    assert set(got) == {(mode, s) for mode in bn_modes.MODES for s in ("loop", "vmap")}
    assert all(0 <= diff < 1e-5 for diff in got.values())
    assert all(re.fullmatch(r" \d+\.\d{2}× ", r[5]) for r in rows)
