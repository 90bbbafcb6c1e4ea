"""Holding freed memory on a CPU: same values, far fewer page faults, memory given back after.

Each case runs in a fresh interpreter: glibc's thresholds are process-wide and change for good
once set, so they must not depend on which tests ran before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from landscapes import allocator

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, resource
import torch
from torch import nn
import landscapes as L

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(32 * 64, 10)).eval()
x, y = torch.randn(1800, 1, 8, 8), torch.randint(0, 10, (1800,))  # 44 MiB of activations per point
metric = L.Loss(nn.CrossEntropyLoss(), x, y)
dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
axes = [L.axis(-1, 1, 8), L.axis(-1, 1, 5)]

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()

L.evaluate(model, metric, dirs, axes)  # warm up: kernels, caches, the first faults
before, faults = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
land = L.evaluate(model, metric, dirs, axes)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"faults": faults, "rss_growth": rss() - before, "loss": land["loss"].tolist(),
                  "allocator": land.metadata["cpu_allocator"], "strategy": land.metadata["strategy"]}))
"""


def _run(hold: bool) -> dict:
    env = {**os.environ, allocator.ENV: "1" if hold else "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not allocator.holds_freed_memory(), reason="needs Linux with glibc")
def test_holding_freed_memory_cuts_page_faults_and_changes_no_value() -> None:
    held, system = _run(hold=True), _run(hold=False)
    assert held["strategy"] == system["strategy"] == "loop"
    assert (held["allocator"], system["allocator"]) == ("holds freed memory", "system")
    assert held["loss"] == system["loss"]  # bit for bit: only where memory comes from differs
    # without the hold, every point faults its 44 MiB of activations back in (~11,000 pages)
    assert system["faults"] > 40 * 5_000
    assert held["faults"] < system["faults"] / 5  # what is left: refilling the heap once
    # and the memory held while evaluating is given back when it ends
    assert held["rss_growth"] < 64 * 2**20


def test_hold_is_a_no_op_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.ENV, "0")
    assert not allocator.holds_freed_memory()
    with allocator.hold_freed_memory(1 << 30, 1 << 20):
        pass
