"""The connectivity stage: the loss between θ0 and another checkpoint, along the straight line and a
fitted quadratic Bézier curve (``connectivity.enabled``; `landscapes.connectivity`).

Metrics: for each path (``linear``, ``bezier``) and each metric (a loss as it is, an accuracy as its
error), the barrier under both definitions in use, ``<path>_<metric>_barrier_frankle`` (the maximum
above the mean of the end values, Frankle et al. 2020) and ``<path>_<metric>_barrier_entezari`` (the
maximum above the straight interpolation of the end values, Entezari et al. 2022). Files: the values
along the paths (``paths.json``), their plot (``paths.png``) and the fitted bend as a checkpoint of
the configured model (``bend.pt``, θ0's buffers), loadable like any other checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import landscapes as L
from landscapes.integrity import atomic_file
from landscapes.plots import checkpoint_name
from pipelines.builders import (
    as_device,
    build_adapters,
    build_data,
    build_loss,
    build_metrics,
    load_model,
)
from pipelines.config import PipelineConfig

__all__ = ["ConnectivityInputs", "ConnectivityOutputs", "connectivity", "intact"]


@dataclass(frozen=True)
class ConnectivityInputs:
    checkpoint: Path  # θ0: the start of the paths
    towards: Path  # the end
    model_mode: str  # compute.model_mode: the key covers it (not the rest of compute)
    bn_batches: int
    out_dir: Path = Path(".")


@dataclass(frozen=True)
class ConnectivityOutputs:
    paths_json: Path
    paths_png: Path
    bend: Path | None  # the fitted bend as a checkpoint (None without connectivity.bezier)
    figures: dict[str, float]  # the barriers: logged on the pipeline run (and a sweep's, against the epoch)
    metrics: dict[str, float] = field(default_factory=dict)  # this stage's own cost
    artifacts: tuple[Path, ...] = ()


def connectivity(cfg: PipelineConfig, inputs: ConnectivityInputs) -> ConnectivityOutputs:
    """Evaluate the straight path (and the fitted Bézier curve) from θ0 to ``inputs.towards``."""
    started = time.perf_counter()
    c = cfg.connectivity
    trust, strict = cfg.checkpoint.trust_pickle, cfg.checkpoint.strict
    device = as_device(cfg.compute.device)
    start = load_model(cfg.model, inputs.checkpoint, trust_pickle=trust, strict=strict).to(device)
    end = load_model(cfg.model, inputs.towards, trust_pickle=trust, strict=strict).to(device)
    data = build_data(cfg.data)
    forward, output = build_adapters(cfg.adapters)
    metrics = build_metrics(cfg.metrics, data)
    along: dict[str, Any] = {"steps": c.steps, "model_mode": inputs.model_mode, "bn_batches": inputs.bn_batches,
                             "device": device, "forward": forward, "output": output}
    paths = {"linear": L.linear_path(start, end, metrics, **along)}
    inputs.out_dir.mkdir(parents=True, exist_ok=True)
    bend_path, fit_losses = None, np.zeros(0)
    if c.bezier:
        fit_data = data if data[1] is not None else data[0]  # (x, y) tensors, or the DataLoader of (x, y) batches
        curve = L.fit_bezier(start, end, build_loss(cfg.metrics), fit_data, steps=c.fit_steps, lr=c.lr, seed=c.seed,
                             batch_size=c.batch_size, optimizer=str(c.optimizer), model_mode=str(c.fit_mode),
                             forward=forward, output=output)
        paths["bezier"] = L.evaluate_curve(curve, start, metrics, **along)
        fit_losses = curve.losses
        bend_path = inputs.out_dir / "bend.pt"
        state = start.state_dict() | {n: t.detach().cpu() for n, t in curve.bend.items()}
        with atomic_file(bend_path) as tmp:
            torch.save({n: t.detach().cpu() for n, t in state.items()}, tmp)
    figures = _barrier_metrics(paths)
    if fit_losses.size:
        figures["bezier_fit_final_loss"] = float(fit_losses[-10:].mean())
    js, png = inputs.out_dir / "paths.json", inputs.out_dir / "paths.png"
    js.write_text(json.dumps({
        "start": str(inputs.checkpoint), "end": str(inputs.towards), "model_mode": inputs.model_mode,
        "paths": {name: {"t": p.t.tolist(), "values": {k: v.tolist() for k, v in p.values.items()},
                         "barriers": {k: vars(b) for k, b in p.barriers().items()}} for name, p in paths.items()},
        "fit_losses": fit_losses.tolist(), "metrics": figures,
    }, indent=1, default=str))
    _plot(paths, png, title=f"{checkpoint_name(str(inputs.checkpoint))} → {checkpoint_name(str(inputs.towards))}")
    files = (png, js) + ((bend_path,) if bend_path else ())
    return ConnectivityOutputs(paths_json=js, paths_png=png, bend=bend_path, figures=figures,
                              metrics={"connectivity_seconds": time.perf_counter() - started}, artifacts=files)


def _barrier_metrics(paths: dict[str, L.PathValues]) -> dict[str, float]:
    out = {}
    for name, path in paths.items():
        for what, b in path.barriers().items():
            out |= {f"{name}_{what}_barrier_frankle": b.frankle, f"{name}_{what}_barrier_entezari": b.entezari}
    return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def _plot(paths: dict[str, L.PathValues], path: Path, *, title: str) -> None:
    """The loss (log scale) and the error along each path, against t."""
    from matplotlib.figure import Figure

    first = next(iter(paths.values()))
    shown = [m for m in first.values if m in ("loss", *first.accuracy)]
    fig = Figure(figsize=(5.0 * len(shown), 3.6))
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, metric in zip(axes, shown, strict=True):
        for name, p in paths.items():
            values = 1.0 - p.values[metric] if metric in p.accuracy else p.values[metric]
            b = p.barriers()[_key(metric, p)]
            ax.plot(p.t, values, marker=".", label=f"{name} (barrier {b.frankle:.3g} Frankle, {b.entezari:.3g} Entezari)")
        ax.set_xlabel("t (0: θ0, 1: the other checkpoint)")
        ax.set_ylabel("error" if metric in first.accuracy else metric)
        if metric == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _key(metric: str, p: L.PathValues) -> str:
    if metric not in p.accuracy:
        return metric
    return "error" if metric == "accuracy" else f"{metric}_error"


def intact(outputs: ConnectivityOutputs) -> str | None:
    """Why a finished run's files cannot be reused, or None."""
    for p in (outputs.paths_json, outputs.paths_png, outputs.bend):
        if p is not None and not Path(p).is_file():
            return f"{p} is missing"
    return None
