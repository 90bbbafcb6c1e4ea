"""``precision``: bf16 autocast within a stated tolerance of fp32, recorded in the metadata and
the store; TF32 on CUDA only, with the global flags restored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import landscapes as L
from landscapes.errors import ConfigurationError
from tests.conftest import assert_unchanged, make_cnn, make_mlp, snapshot

#: bf16 keeps 8 bits of mantissa: losses of these small models agree with fp32 to 2e-2 relative.
BF16_RTOL = 2e-2

MODELS = [
    pytest.param(make_mlp, "data", id="mlp"),
    pytest.param(lambda: make_cnn(batchnorm=True), "image_data", id="cnn-bn"),
]


def _setup(factory, data_name, request):
    x, y = request.getfixturevalue(data_name)
    model = factory()
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    return model, dirs, [L.Loss(nn.CrossEntropyLoss(), x, y), L.Accuracy(x, y)]


@pytest.mark.parametrize("factory,data_name", MODELS)
@pytest.mark.parametrize("strategy", ["auto", "loop", "vmap"])
def test_bf16_is_within_tolerance_of_fp32(factory, data_name, strategy, request) -> None:
    model, dirs, metrics = _setup(factory, data_name, request)
    axes = [L.axis(-1, 1, 5), L.axis(-1, 1, 4)]
    before = snapshot(model)
    fp32 = L.evaluate(model, metrics, dirs, axes, strategy=strategy)
    bf16 = L.evaluate(model, metrics, dirs, axes, strategy=strategy, precision="bf16")
    assert_unchanged(model, before)
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=BF16_RTOL)
    assert not np.array_equal(bf16["loss"], fp32["loss"])  # autocast did round: bf16 really ran
    assert bf16["loss"].dtype == np.float64
    assert np.abs(bf16["accuracy"] - fp32["accuracy"]).max() <= 0.1  # a few argmax flips at most
    assert bf16.metadata["precision"] == "bf16" and fp32.metadata["precision"] == "fp32"


def test_bf16_batched_mlp_and_custom_metrics(data) -> None:
    """The hand-batched MLP path and a custom metric's own forward run in bf16 too."""
    x, y = data
    model = make_mlp()

    class Mean(L.Metric):
        name = "mean_out"

        def __call__(self, model_wrapper):
            return float(model_wrapper.forward(x).float().mean())

    dirs = [L.random_direction(model, seed=0)]
    loss = L.Loss(nn.CrossEntropyLoss(), x, y)
    axes = [L.axis(-1, 1, 7)]
    fp32 = L.evaluate(model, loss, dirs, axes)
    bf16 = L.evaluate(model, loss, dirs, axes, precision="bf16")
    assert bf16.metadata["strategy"] == "batched"
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=BF16_RTOL)
    assert not np.array_equal(bf16["loss"], fp32["loss"])
    custom32 = L.evaluate(model, [Mean()], dirs, axes)
    custom16 = L.evaluate(model, [Mean()], dirs, axes, precision="bf16")
    np.testing.assert_allclose(custom16["mean_out"], custom32["mean_out"], rtol=5e-2, atol=1e-2)
    assert not np.array_equal(custom16["mean_out"], custom32["mean_out"])


def test_bad_precision_names_the_choices(mlp, data) -> None:
    x, y = data
    loss = L.Loss(nn.CrossEntropyLoss(), x, y)
    dirs = [L.random_direction(mlp, seed=0)]
    with pytest.raises(ConfigurationError, match=r"precision='fp16' is not an option; choose one of 'fp32', 'tf32', 'bf16'"):
        L.evaluate(mlp, loss, dirs, [[0.0, 1.0]], precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer to tf32")
def test_tf32_on_a_cpu_raises_with_the_fix(mlp, data) -> None:
    x, y = data
    loss = L.Loss(nn.CrossEntropyLoss(), x, y)
    with pytest.raises(ConfigurationError, match=r"precision='tf32' needs a CUDA device.*use precision='fp32'"):
        L.Evaluator(mlp, loss, [L.random_direction(mlp, seed=0)], precision="tf32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tf32_on_cuda_sets_and_restores_the_flags(image_data) -> None:
    x, y = image_data
    model = make_cnn(batchnorm=True)
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    axes = [L.axis(-1, 1, 3)] * 2
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [f.allow_tf32 for f in flags]
    seen: list[tuple[bool, bool]] = []
    hook = model.conv1.register_forward_hook(lambda *_: seen.append(tuple(f.allow_tf32 for f in flags)))
    try:
        for f in flags:
            f.allow_tf32 = True  # a global setting fp32 must not inherit
        fp32 = L.evaluate(model, metric, dirs, axes, device="cuda", strategy="loop")
        assert set(seen) == {(False, False)}
        seen.clear()
        tf32 = L.evaluate(model, metric, dirs, axes, device="cuda", strategy="loop", precision="tf32")
        assert set(seen) == {(True, True)}
        assert [f.allow_tf32 for f in flags] == [True, True]  # restored
    finally:
        hook.remove()
        for f, old in zip(flags, saved, strict=True):
            f.allow_tf32 = old
    np.testing.assert_allclose(tf32["loss"], fp32["loss"], rtol=5e-3)
    assert tf32.metadata["precision"] == "tf32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_bf16_on_cuda_is_within_tolerance_of_fp32(image_data, strategy) -> None:
    x, y = image_data
    model = make_cnn(batchnorm=True)
    dirs = [L.random_direction(model, seed=0), L.random_direction(model, seed=1)]
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    axes = [L.axis(-1, 1, 4)] * 2
    fp32 = L.evaluate(model, metric, dirs, axes, device="cuda", strategy=strategy)
    bf16 = L.evaluate(model, metric, dirs, axes, device="cuda", strategy=strategy, precision="bf16")
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=BF16_RTOL)


# --- the pipeline: compute.precision --------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _compose(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from pipelines.config import register_configs, to_typed

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root_dir={root}", f"paths.output_dir={root}/out", "debug=default", *overrides])
    return to_typed(cfg)


def test_pipeline_precision_is_checked_at_compose_time(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises(ConfigCompositionException, match=r"compute\.precision=fp16") as info:
        _compose(tmp_path, "compute.precision=fp16")
    assert isinstance(info.value.__cause__, ValidationError)
    assert "Invalid value 'fp16', expected one of [fp32, tf32, bf16]" in str(info.value.__cause__)


def test_precision_is_part_of_the_evaluate_key_and_the_store_fingerprint(tmp_path: Path) -> None:
    from pipelines import tracking
    from pipelines.driver import VERSION, Flow
    from pipelines.pipeline import STAGES, store_fingerprint

    sections = next(s for s in STAGES if s.name == "evaluate").sections
    keys, prints = {}, {}
    for p in ("fp32", "tf32", "bf16"):
        c = _compose(tmp_path, f"compute.precision={p}")
        assert str(c.compute.precision) == p
        flow = Flow(c, None, (), tmp_path, identity={"checkpoint": "c" * 64, "directions": "d" * 64})
        keys[p] = tracking.stage_key("evaluate", {s: getattr(c, s) for s in sections}, ["c" * 64, "d" * 64], VERSION)
        prints[p] = store_fingerprint(flow)
        if p == "fp32":  # an fp32 store keeps the fingerprint it had before compute.precision existed
            c32 = c
            old = {"model": c.model, "adapters": c.adapters, "data": c.data, "metrics": c.metrics, "grid": c.grid,
                   "model_mode": c.compute.model_mode}
            assert prints[p] == tracking.stage_key("evaluate", old, ("c" * 64, "d" * 64), VERSION)
    assert len(set(keys.values())) == 3 and len(set(prints.values())) == 3
    assert str(c32.compute.precision) == "fp32"  # the default


def test_evaluate_stage_records_the_precision_in_the_store(tmp_path: Path) -> None:
    from landscapes.store import LandscapeStore
    from pipelines.backends import LocalBackend
    from pipelines.demo import DemoMLP
    from pipelines.stages.directions import DirectionsInputs, directions
    from pipelines.stages.evaluate import EvaluateInputs, evaluate

    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(DemoMLP().state_dict(), ckpt)
    values = {}
    for p in ("fp32", "bf16"):
        c = _compose(tmp_path, f"compute.precision={p}", "grid.steps=[3,3]")
        dirs = directions(c, DirectionsInputs(ckpt, (), tmp_path / "directions"))
        out = evaluate(c, EvaluateInputs(ckpt, dirs.path, tmp_path / p / "landscape.zarr", p[0] * 64), LocalBackend())
        store = LandscapeStore.open(out.store, mode="r")
        assert store.attrs["evaluation"]["precision"] == p
        values[p] = store.read("loss")
    np.testing.assert_allclose(values["bf16"], values["fp32"], rtol=BF16_RTOL)
    assert not np.array_equal(values["bf16"], values["fp32"])


@pytest.mark.parametrize("model_mode", ["eval", "recompute_bn"])
def test_bf16_uses_each_points_own_weights(image_data, model_mode) -> None:
    """Autocast caches bf16 copies of parameters for as long as its region lasts; a region
    spanning several points would give every point the first one's weights. Far along a
    line the loss moves much more than bf16's rounding, so stale weights could not pass."""
    x, y = image_data
    model = make_cnn(batchnorm=True)
    dirs = [L.random_direction(model, seed=0)]
    metric = L.Loss(nn.CrossEntropyLoss(), x, y)
    axes = [L.axis(-3, 3, 5)]
    fp32 = L.evaluate(model, metric, dirs, axes, strategy="loop", model_mode=model_mode)
    bf16 = L.evaluate(model, metric, dirs, axes, strategy="loop", model_mode=model_mode, precision="bf16")
    assert np.ptp(fp32["loss"]) > 0.3  # the line really moves
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=BF16_RTOL)


def test_bf16_batched_one_point_passes() -> None:
    """All 1797 digits through the demo MLP: batched tiles of one-point passes (their outputs in
    reused buffers, which autocast would skip) run in bf16 too."""
    from pipelines.demo import DemoMLP, load_digits_tensors

    x, y = load_digits_tensors()
    torch.manual_seed(0)
    model = DemoMLP()
    dirs = [L.random_direction(model, seed=s) for s in (0, 1)]
    loss = L.Loss(nn.CrossEntropyLoss(), x, y)
    axes = [L.axis(-1, 1, 3)] * 2
    fp32 = L.evaluate(model, loss, dirs, axes)
    bf16 = L.evaluate(model, loss, dirs, axes, precision="bf16")
    assert (bf16.metadata["strategy"], bf16.metadata["pass_points"]) == ("batched", 1)
    np.testing.assert_allclose(bf16["loss"], fp32["loss"], rtol=BF16_RTOL)
    assert not np.array_equal(bf16["loss"], fp32["loss"])
