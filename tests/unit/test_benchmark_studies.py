"""The benchmark's study groups (W-BIG, growth, scaling): run in the suite, judged, reprinted.

The end-to-end test runs ``python -m benchmarks`` on the three groups at tiny sizes, each in a
fresh process (the scaling group starts real dask ``LocalCluster``s of one and two workers), and
checks the merged record's figures, the targets computed from them and the reprinted tables.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import growth, scaling
from benchmarks.report import format_markdown, format_table, load_json, write_json

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_suite_runs_the_study_groups_and_the_report_reprints_them(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--workloads", "W-BIG,growth,scaling", "--memory-cases",
         "mlp-4m", "--memory-steps", "3", "--growth-steps", "3,5", "--scaling-steps", "5", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["workloads"] == [] and record["processes"] == "one fresh process per workload group"
    big, grow, scale = record["studies"]
    assert [big["name"], grow["name"], scale["name"]] == ["W-BIG", "growth", "scaling"]

    (mem,) = big["runs"]
    assert mem["case"] == "mlp-4m" and mem["points"] == 9 and mem["finite"] and mem["total"] > 3
    assert big["targets"][0]["met"] is (big["rows"][0][9] == "met")

    assert {r["steps"]: r["points"] for r in grow["runs"]} == {3: 9, 5: 25}
    for r in grow["runs"]:
        assert 0 < r["evaluate_s"] < r["stage_s"] and r["tiles"] == 1 and r["strategy"] == "batched"
    small, large = grow["figures"]["3"], grow["figures"]["5"]
    assert small["evaluate_us_per_point"] == pytest.approx(1e6 * small["evaluate_s"] / 9)
    ratio = large["evaluate_us_per_point"] / small["evaluate_us_per_point"]
    assert grow["targets"][1]["met"] is (ratio <= growth.LIMIT)
    assert f"{ratio:.2f}×" in grow["targets"][1]["detail"] and "not the issue's 41² and 201²" in grow["targets"][1]["detail"]

    runs = {r["config"]: r for r in scale["runs"]}
    assert set(runs) == set(scaling.CONFIGS)
    assert runs[scaling.ONE]["workers"] == 1 and runs[scaling.TWO]["workers"] == 2
    for config, r in runs.items():
        assert r["evaluate_s"] > 0 and r["points"] == 25
        assert (r["start_s"] > 0) is (config != scaling.LOCAL)  # a cluster started, and its start kept apart
    speedup = runs[scaling.ONE]["evaluate_s"] / runs[scaling.TWO]["evaluate_s"]
    versus_local = runs[scaling.TWO]["evaluate_s"] / runs[scaling.LOCAL]["evaluate_s"]
    assert [t["met"] for t in scale["targets"]] == [speedup >= scaling.SPEEDUP, versus_local <= scaling.LIMIT]

    for study in record["studies"]:  # printed by the run, each with its target lines
        assert f"{study['name']}: {study['description']}" in proc.stdout
        for t in study["targets"]:
            assert f"{t['target']}: {t['detail']}" in proc.stdout
    reprint = subprocess.run([sys.executable, "-m", "benchmarks.report", str(out)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True).stdout
    assert "**growth**" in reprint and "| 5×5 | 25 | 1 | 5×5 | batched |" in reprint
    assert f"| {scaling.TWO} | {runs[scaling.TWO]['evaluate_s']:.2f} |" in reprint  # one round: its median
    assert "**W-BIG**" in reprint and "| mlp-4m | 4.2 M |" in reprint


def _growth_runs(small_s: float, large_s: float, *, steps: tuple[int, int] = (41, 201)) -> list[dict]:
    runs = []
    for r in range(3):
        for s, per_point in zip(steps, (small_s, large_s), strict=True):
            points = s * s
            runs.append({"round": r, "steps": s, "points": points, "stage_s": per_point * points + 0.2 + 0.01 * r,
                         "evaluate_s": per_point * points + 0.01 * r, "cpu_s": 1.0, "tiles": math.ceil(points / 250),
                         "tile_shape": [1, s], "strategy": "batched", "foreign_load": 0.0})
    return runs


@pytest.mark.parametrize(("large", "met"), [(1.10e-3, True), (0.60e-3, True), (1.20e-3, False)])
def test_growth_target_is_the_time_per_point_at_most_115_percent(large: float, met: bool) -> None:
    study = growth.summarize(_growth_runs(1.0e-3, large))
    evaluation = study["targets"][1]
    assert evaluation["met"] is met
    assert evaluation["detail"].startswith(f"{(large * 201**2 + 0.01) / (1.0e-3 * 41**2 + 0.01) * 41**2 / 201**2:.2f}×")
    assert "not the issue's" not in evaluation["detail"]
    assert study["figures"]["201"]["ms_per_tile"] == pytest.approx(1e3 * (large * 201**2 + 0.01) / 162)
    assert [row[0] for row in study["rows"]] == ["41×41", "201×201"]


def test_growth_at_other_sizes_says_so() -> None:
    study = growth.summarize(_growth_runs(1e-3, 1e-3, steps=(5, 11)))
    assert all("(not the issue's 41² and 201²)" in t["detail"] for t in study["targets"])
    assert "time per point at 11² within 15 % of 5²" in study["targets"][0]["target"]


def _scaling_runs(one: float, two: float, local: float) -> list[dict]:
    return [{"round": r, "config": c, "steps": 101, "points": 10201, "tiles": 51, "tile_shape": [2, 101],
             "strategy": "batched", "stage_s": s + 3, "evaluate_s": s * (1 + 0.01 * r), "start_s": 0 if c == scaling.LOCAL else 2.0,
             "close_s": 0.5, "workers": None, "foreign_load": 0.01}
            for r in range(3) for c, s in zip(scaling.CONFIGS, (one, two, local), strict=True)]


@pytest.mark.parametrize(
    ("one", "two", "local", "met"),
    [(10.0, 5.5, 5.0, [True, True]), (10.0, 6.2, 5.0, [False, False]), (10.0, 5.0, 6.0, [True, True])],
)
def test_scaling_targets(one: float, two: float, local: float, met: list[bool]) -> None:
    study = scaling.summarize(_scaling_runs(one, two, local))
    assert [t["met"] for t in study["targets"]] == met
    assert study["targets"][0]["detail"] == f"{one / two:.2f}× ({two * 1.01:.2f} s vs {one * 1.01:.2f} s)"
    assert study["figures"][scaling.TWO]["speedup_vs_one_worker"] == pytest.approx(one / two)
    assert study["rows"][2][4] == "—" and study["rows"][0][4] == "2.00"


def test_scaling_without_a_configuration_leaves_its_targets_open() -> None:
    runs = [r for r in _scaling_runs(10.0, 5.0, 5.0) if r["config"] != scaling.LOCAL]
    study = scaling.summarize(runs)
    assert [t["met"] for t in study["targets"]] == [True, None]
    assert study["targets"][1]["detail"] == "missing"


def test_record_with_studies_round_trips_and_prints(tmp_path: Path) -> None:
    studies = [growth.summarize(_growth_runs(1e-3, 1.2e-3)), scaling.summarize(_scaling_runs(10.0, 5.5, 5.0))]
    header = {"machine": {"cpu": "x"}, "matmul_gflops": {"cpu fp32": 100.0}, "repeats": 1, "notes": ["a note"],
              "studies": studies}
    write_json(tmp_path / "r.json", header, [])
    loaded, results = load_json(tmp_path / "r.json")
    assert results == [] and [s["name"] for s in loaded["studies"]] == ["growth", "scaling"]
    text = format_table(results, loaded)
    assert "  [MISSED] evaluation (tiles evaluated, written, marked done): time per point at 201² within 15 % of 41²" in text
    assert "  [MET   ] dask 2 workers × 1 thread ≥ 1.7× 1 worker × 1 thread" in text
    assert text.index("growth:") < text.index("scaling:") < text.index("a note")
    md = format_markdown(results, loaded["studies"])
    assert "| 201×201 | 40,401 | 162 | 1×201 | batched |" in md and "**missed**" in md


def test_unknown_groups_and_bad_sizes_are_refused(capsys) -> None:
    from benchmarks.__main__ import _parse

    args = _parse(["--growth-steps", "41,201", "--memory-cases", "mlp-4m"])
    assert args.growth_steps == (41, 201) and args.memory_cases == ("mlp-4m",)
    assert args.workloads.endswith("W-BIG,growth,scaling")
    for bad, message in ((["--workloads", "W-MLP-a,grwth"], "unknown group(s) grwth; choose from W-MLP-a"),
                         (["--growth-steps", "41"], "--growth-steps: give two grid sizes or more"),
                         (["--memory-cases", "mlp-5m"], "--memory-cases=mlp-5m: choose from mlp-4m")):
        with pytest.raises(SystemExit):
            _parse(bad)
        assert message in capsys.readouterr().err


def test_a_disturbed_study_run_runs_again_at_most_retries_times() -> None:
    from benchmarks.measure import until_quiet

    loads, said = iter([0.9, 0.8, 0.0]), []

    def run() -> dict:
        return {"foreign_load": next(loads), "seconds": 1.0}

    assert until_quiet(run, 0.5, 5, 0.0, said.append) == {"foreign_load": 0.0, "seconds": 1.0, "reruns": 2}
    assert len(said) == 2 and "used 90% of the CPUs" in said[0]
    loads = iter([0.9, 0.8, 0.0])
    assert until_quiet(run, 0.5, 1, 0.0, said.append)["reruns"] == 1  # the last try is kept, disturbed or not
