"""The curvature stage: Hessian extreme eigenvalues, trace, spectral density and sharpness at θ0.

Loads the model at the checkpoint and the data as the evaluate stage does, and measures the
dataset loss ``metrics.loss`` (the same `landscapes.Loss` the landscape's ``loss`` array is)
with `landscapes.curvature_summary` (λmax, λmin, Hutch++ trace with its standard error,
|λmin/λmax|, negative mass of the SLQ spectrum) and, as configured, the average and
worst-case sharpness within ``curvature.rho``. The spectral density goes to a PNG, its SLQ
nodes and weights to JSON. With ``eigenvectors`` > 0 (``directions.kind=hessian`` in the same
pipeline) the one Lanczos run finds that many eigenpairs at each end, and the top ones are saved
as a verified directions store (``eigenvectors.zarr``) for the directions stage to read instead
of running Lanczos again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import landscapes as L
from landscapes.directions_store import save_directions, verify_directions
from landscapes.errors import ConfigurationError
from landscapes.params import ParameterSpace
from pipelines.builders import as_device, build_adapters, build_data, build_loss, load_model
from pipelines.config import PipelineConfig

__all__ = ["CurvatureInputs", "CurvatureOutputs", "curvature", "loss_metric", "intact"]

#: the stage's metric names for the fields of `CurvatureSummary.metrics()`
NAMES = {"lambda_max": "lambda_max", "lambda_min": "lambda_min", "trace": "hessian_trace",
         "trace_stderr": "hessian_trace_stderr", "eigen_ratio": "eigen_ratio", "negative_mass": "negative_mass",
         "hvps": "hessian_vector_products"}


@dataclass(frozen=True)
class CurvatureInputs:
    checkpoint: Path
    model_mode: str  # compute.model_mode: the key covers it (not the rest of compute)
    bn_batches: int
    eigenvectors: int = 0  # top eigenvectors to save for directions.kind=hessian (grid.dims), or 0
    out_dir: Path = Path(".")


@dataclass(frozen=True)
class CurvatureOutputs:
    spectrum_json: Path  # SLQ nodes and weights, the eigenvalues, how they were computed
    spectrum_png: Path  # the spectral density
    figures: dict[str, float]  # the curvature at θ0: logged on the pipeline run (and a sweep's, against the epoch)
    metrics: dict[str, float] = field(default_factory=dict)  # this stage's own cost: seconds, Hessian-vector products
    artifacts: tuple[Path, ...] = ()
    eigenvectors: Path | None = None  # eigenvectors.zarr: the top ``inputs.eigenvectors`` (unit, descending)
    eigenvectors_sha256: str = ""  # its manifest digest


def loss_metric(cfg: PipelineConfig) -> tuple[L.Loss, Any, Any]:
    """The dataset loss the landscape's ``loss`` array measures, and the forward/output adapters."""
    if cfg.metrics.model_loss:
        raise ConfigurationError(
            "curvature: metrics.model_loss=true is not supported by the Hessian computations; set "
            "metrics.model_loss=false and metrics.loss to the loss to differentiate."
        )
    inputs, target = build_data(cfg.data)
    loss = L.Loss(build_loss(cfg.metrics), inputs, target, name="loss", shift=cfg.metrics.shift,
                  target_key=cfg.metrics.target_key)
    forward, output = build_adapters(cfg.adapters)
    return loss, forward, output


def curvature(cfg: PipelineConfig, inputs: CurvatureInputs) -> CurvatureOutputs:
    """The curvature figures at θ0 (figures, for the pipeline run), the stage's cost (metrics) and
    the spectral density (artifacts)."""
    started = time.perf_counter()
    c = cfg.curvature
    model = load_model(cfg.model, inputs.checkpoint, trust_pickle=cfg.checkpoint.trust_pickle, strict=cfg.checkpoint.strict)
    model = model.to(as_device(cfg.compute.device))
    loss, forward, output = loss_metric(cfg)
    common: dict[str, Any] = {"forward": forward, "output": output, "model_mode": inputs.model_mode,
                              "target_key": cfg.metrics.target_key}
    summary = L.curvature_summary(
        model, None, loss, k=max(1, inputs.eigenvectors), trace_probes=c.trace_probes, spectrum_probes=c.spectrum_probes, steps=c.steps,
        spectrum_deflate=c.deflate, tol=c.tol, max_iter=c.max_iter, negative_threshold=c.negative_threshold, seed=c.seed,
        hvp=str(c.hvp), bn_batches=inputs.bn_batches, **common,
    )
    metrics = {NAMES[k]: v for k, v in summary.metrics().items()}
    if c.average:
        avg = L.average_sharpness(model, None, loss, rho=c.rho, samples=c.samples, adaptive=c.adaptive,
                                  seed=c.seed, **common)
        metrics |= {"average_sharpness": avg.value, "average_sharpness_stderr": avg.stderr,
                    "average_sharpness_rel": avg.relative}
    if c.worst_case:
        worst = L.worst_case_sharpness(model, None, loss, rho=c.rho, norm=str(c.norm), steps=c.ascent_steps,
                                       adaptive=c.adaptive, seed=c.seed, **common)
        metrics |= {"worst_case_sharpness": worst.value, "worst_case_sharpness_rel": worst.relative}
    metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
    inputs.out_dir.mkdir(parents=True, exist_ok=True)
    spectrum = summary.spectrum
    js, png = inputs.out_dir / "spectrum.json", inputs.out_dir / "spectrum.png"
    js.write_text(json.dumps({
        "nodes": spectrum.nodes.tolist(), "weights": spectrum.weights.tolist(),
        "num_parameters": spectrum.num_parameters, "eigenvalues": summary.eigen.eigenvalues.tolist(),
        "residuals": summary.eigen.residuals.tolist(), "converged": summary.eigen.converged,
        "trace_interval": list(summary.trace_interval), "info": summary.eigen.info,
        "metrics": metrics,
    }, indent=1, default=str))
    _plot_density(spectrum, summary, png)
    vectors, digest = _save_eigenvectors(model, summary.eigen, inputs) if inputs.eigenvectors else (None, "")
    cost = {"hessian_vector_products": metrics.pop("hessian_vector_products", 0.0),
            "curvature_seconds": time.perf_counter() - started}
    return CurvatureOutputs(spectrum_json=js, spectrum_png=png, figures=metrics, metrics=cost, artifacts=(png, js),
                            eigenvectors=vectors, eigenvectors_sha256=digest)


def _save_eigenvectors(model: Any, eigen: L.HessianEigen, inputs: CurvatureInputs) -> tuple[Path, str]:
    """The top ``inputs.eigenvectors`` eigenvectors as a directions store, eigenvalues in its attrs."""
    top = inputs.eigenvectors
    space = ParameterSpace.from_module(model)
    flat = np.stack([space.flatten(d).detach().cpu().double().numpy() for d in eigen.eigenvectors[:top]])
    path = inputs.out_dir / "eigenvectors.zarr"
    record = save_directions(path, flat.astype(np.float32), {
        "kind": "hessian", "eigenvalues": [float(v) for v in eigen.eigenvalues[:top]],
        "residuals": [float(r) for r in eigen.residuals[:top]], "converged": bool(eigen.converged),
        "hessian_vector_products": int(eigen.hvps), "checkpoint": str(inputs.checkpoint),
        "parameters": [[s.name, list(s.shape), s.kind] for s in space.specs],
    }, on_conflict="replace")
    return path, record.sha256


def _plot_density(spectrum: L.SpectralDensity, summary: L.CurvatureSummary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lo, hi = min(spectrum.lambda_min, summary.lambda_min), max(spectrum.lambda_max, summary.lambda_max)
    pad = 0.05 * (hi - lo) if hi > lo else 1.0
    grid = np.linspace(lo - pad, hi + pad, 400)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        ax.semilogy(grid, np.maximum(spectrum.density(grid), 1e-12))
        ax.axvline(summary.lambda_max, color="C3", ls="--", lw=1, label=f"λmax = {summary.lambda_max:.4g}")
        ax.axvline(summary.lambda_min, color="C2", ls=":", lw=1, label=f"λmin = {summary.lambda_min:.4g}")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.set_title(f"Hessian spectrum, trace ≈ {summary.trace:.4g} ± {summary.trace_stderr:.2g}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def intact(outputs: CurvatureOutputs) -> str | None:
    """Why a finished run's spectrum files cannot be reused, or None."""
    for p in (outputs.spectrum_json, outputs.spectrum_png):
        if not Path(p).is_file():
            return f"{p} is missing"
    if outputs.eigenvectors is not None:
        return store_intact(outputs.eigenvectors, outputs.eigenvectors_sha256)
    return None


def store_intact(path: Path, sha256: str) -> str | None:
    """Why the directions store at ``path`` is not the one a run recorded (missing, damaged,
    other values), or None."""
    try:
        record = verify_directions(path)
    except (OSError, ValueError) as err:  # StoreError, IntegrityError
        return str(err).splitlines()[0]
    if record.sha256 != sha256:
        return f"{path} holds other values than the run recorded (sha256 {record.sha256[:12]}…)"
    return None
