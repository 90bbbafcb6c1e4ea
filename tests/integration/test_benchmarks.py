"""The benchmark runner end to end (``--quick``): it runs, agrees with the plain loop, and the
engine's default picks the strategy the measured rules call for on each real workload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_run_writes_agreeing_results(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--workloads", "W-MLP-a,W-MLP-b,W-CNN,W-GPU", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine default" in proc.stdout and f"wrote {out}" in proc.stdout
    record = json.loads(out.read_text())
    assert record["quick"] is True and record["machine"]["landscapes_sources_sha256"]
    if not torch.cuda.is_available():
        assert any("W-GPU" in note and "no CUDA device" in note for note in record["notes"])
    by_name = {w["name"]: w for w in record["workloads"]}
    assert {"W-MLP-a", "W-MLP-b", "W-CNN"} <= set(by_name)

    defaults = {}
    for name, w in by_name.items():
        contenders = {c["name"]: c for c in w["contenders"]}
        loop = contenders["per-point loop"]
        assert loop["error"] is None and loop["median_s"] > 0
        engine = [c for c in w["contenders"] if c["name"].startswith("engine") and not c["skipped"]]
        assert engine, name
        for c in engine:
            assert c["error"] is None, (name, c["name"], c["error"])
            assert c["max_rel_diff_vs_loop"] < w["tolerance"], (name, c["name"])
            assert c["points_per_s"] == pytest.approx(w["points"] / c["median_s"], rel=1e-6)
        defaults[name] = contenders["engine default"]["info"]

    # the rules of docs/benchmarks.md: one-point passes where activations outgrow the caches
    assert (defaults["W-MLP-a"]["strategy"], defaults["W-MLP-a"]["pass_points"]) == ("batched", 1)
    assert defaults["W-MLP-b"]["strategy"] == "batched" and defaults["W-MLP-b"]["pass_points"] > 1
    assert defaults["W-CNN"]["strategy"] == "loop"
