"""The benchmark's target checks on given timings, including the GPU ones no CPU run reaches."""

from __future__ import annotations

import pytest

from benchmarks.report import DEFAULT, LOOP, ContenderResult, WorkloadResult


def _workload(name: str, steps: int, samples: int, times: dict[str, float], peak: int = 1 << 20, budget: int = 1 << 30) -> WorkloadResult:
    contenders = []
    for contender, seconds in times.items():
        info = {"strategy": "vmap", "memory_budget": budget} if contender.startswith("engine") else {}
        contenders.append(ContenderResult(contender, times_s=[seconds] * 3, peak_bytes=[peak] * 3, info=info))
    w = WorkloadResult(name, "", "cuda", "bf16", steps, steps * steps, samples, 10**9, 100.0, 5e-2, contenders)
    w.finish()
    return w


def _target(w: WorkloadResult, starts: str) -> dict:
    (t,) = [t for t in w.targets if t["target"].startswith(starts)]
    return t


@pytest.mark.parametrize(
    ("steps", "images", "seconds", "met"),
    [(51, 50_000, 150.0, True), (51, 50_000, 200.0, False), (11, 10_000, 5.0, None)],
)
def test_gpu_resnet_target_only_judged_at_full_size(steps, images, seconds, met) -> None:
    w = _workload("W-GPU-resnet56-bf16", steps, images, {DEFAULT: seconds, LOOP: seconds * 30})
    t = _target(w, "51×51 grid over 50,000 images")
    assert t["met"] is met
    assert f"{seconds:.1f} s" in t["detail"]


@pytest.mark.parametrize(("loop", "met"), [(10.0, True), (5.0, False)])
def test_gpu_mlp_target_is_twenty_times_the_loop(loop, met) -> None:
    w = _workload("W-MLP-a-cuda", 41, 1797, {DEFAULT: 0.4, LOOP: loop})
    t = _target(w, "default ≥ 20×")
    assert t["met"] is met and t["detail"] == f"{loop / 0.4:.1f}×"


def test_peak_memory_over_the_budget_is_a_missed_target() -> None:
    fits = _workload("W-CNN", 5, 100, {DEFAULT: 1.0, LOOP: 1.0}, peak=100 << 20, budget=1 << 30)
    assert _target(fits, "peak memory")["met"] is True
    over = _workload("W-CNN", 5, 100, {DEFAULT: 1.0, LOOP: 1.0}, peak=2 << 30, budget=1 << 30)
    t = _target(over, "peak memory")
    assert t["met"] is False and DEFAULT in t["detail"]


@pytest.mark.parametrize(("loop", "met"), [(13.5, True), (12.0, False)])
def test_lm_target_is_one_point_three_times_the_loop_in_fp32(loop, met) -> None:
    for name in ("W-LM", "W-LM [fp32]"):
        w = _workload(name, 21, 64, {DEFAULT: 10.0, LOOP: loop})
        t = _target(w, "default ≥ 1.3× the per-point loop")
        assert t["met"] is met and t["detail"] == f"{loop / 10.0:.2f}×"
        assert _target(w, "default ≥ 60% of measured fp32 matmul")["met"] is (w.contenders[0].matmul_fraction >= 0.6)
    bf16 = _workload("W-LM [bf16]", 21, 64, {DEFAULT: 10.0, LOOP: loop})
    assert not [t for t in bf16.targets if "per-point loop" in t["target"] and "≥" in t["target"]]


def test_precisions_compare_each_contender_with_itself_in_fp32() -> None:
    import numpy as np

    from benchmarks.__main__ import _compare_with_fp32

    results = [_workload(f"W-X [{p}]", 2, 1, {DEFAULT: 1.0, LOOP: 2.0}) for p in ("fp32", "bf16")]
    ref = np.array([[1.0, 2.0], [4.0, 8.0]])
    values = {"W-X [fp32]": {DEFAULT: ref, LOOP: ref}, "W-X [bf16]": {DEFAULT: ref * 1.01, LOOP: ref}}
    values["W-X [bf16]"][DEFAULT][1, 1] = 8.4  # 5 % off at one point
    _compare_with_fp32(results, values)
    fp32, bf16 = ({c.name: c for c in r.contenders} for r in results)
    assert fp32[DEFAULT].max_rel_diff_vs_fp32 is None
    assert bf16[DEFAULT].max_rel_diff_vs_fp32 == pytest.approx(0.05)
    assert bf16[LOOP].max_rel_diff_vs_fp32 == 0.0


def test_bad_precisions_option_names_the_choices(capsys) -> None:
    from benchmarks.__main__ import _parse

    assert _parse(["--precisions", "bf16,fp32"]).precisions == ["bf16", "fp32"]
    with pytest.raises(SystemExit):
        _parse(["--precisions", "fp32,fp16"])
    assert "--precisions=fp32,fp16: choose from fp32, tf32, bf16" in capsys.readouterr().err
