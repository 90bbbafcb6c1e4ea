"""Figures from raw timings, the targets of issue 6, the printed table and the JSON record.

Besides the workloads (one :class:`WorkloadResult` each), a record holds *studies*: the groups
that measure something else than one grid's contenders (``W-BIG``: memory on large models,
``growth``: time per point as the grid grows, ``scaling``: the dask backend against the local
one). Each is a JSON-able dict made by its module (``benchmarks.memory``, ``benchmarks.growth``,
``benchmarks.scaling``) with ``name``, ``description``, ``columns``, ``rows`` (formatted cells),
``targets`` (``{"target", "met", "detail"}``) and ``notes``, beside its raw figures; the record
keeps them under ``"studies"``, in the order they ran.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ContenderResult",
    "WorkloadResult",
    "check_targets",
    "format_markdown",
    "format_study",
    "format_study_markdown",
    "format_table",
    "load_json",
    "max_relative_difference",
    "write_json",
]

LOSS_LANDSCAPES = "loss-landscapes 3.0.6"
LOOP = "per-point loop"
DEFAULT = "engine default"
#: The size of the W-GPU target: a 51×51 grid over CIFAR-10's 50,000 training images.
GPU_FULL_STEPS, GPU_FULL_IMAGES = 51, 50_000


def max_relative_difference(values: np.ndarray, reference: np.ndarray) -> float:
    """``max |values - reference| / |reference|`` over the grid (NaN if shapes differ)."""
    if values.shape != reference.shape:
        return math.nan
    ref = np.abs(reference)
    return float(np.max(np.abs(values - reference) / np.maximum(ref, np.finfo(np.float64).tiny)))


@dataclass
class ContenderResult:
    """All repeats of one contender on one workload, with the derived figures."""

    name: str
    times_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    minor_faults: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    cpu_s: list[float] = field(default_factory=list)
    foreign_load: list[float] = field(default_factory=list)
    reruns: int = 0  # timed runs repeated because other processes disturbed them
    error: str | None = None
    skipped: str | None = None
    median_s: float = math.nan
    points_per_s: float = math.nan
    vs_loss_landscapes: float = math.nan
    matmul_fraction: float = math.nan
    peak_mib: float = math.nan
    faults_per_point: float = math.nan  # median minor page faults per grid point
    max_rel_diff_vs_loop: float | None = None
    max_rel_diff_vs_fp32: float | None = None  # with --precisions: vs the same contender in fp32

    @property
    def ok(self) -> bool:
        """It ran and was timed."""
        return bool(self.times_s) and not self.error and not self.skipped


@dataclass
class WorkloadResult:
    """One workload: its description, its contenders, and the target checks."""

    name: str
    description: str
    device: str
    precision: str
    steps: int
    points: int
    samples: int
    flops_per_point: int
    peak_gflops: float  # measured before this workload; the run's best once finished
    tolerance: float
    contenders: list[ContenderResult] = field(default_factory=list)
    foreign_load: float = math.nan  # share of the CPUs other processes used meanwhile
    peak_gflops_before: float = math.nan  # the matmul throughput measured just before
    targets: list[dict[str, Any]] = field(default_factory=list)

    def by_name(self, name: str) -> ContenderResult | None:
        return next((c for c in self.contenders if c.name == name and c.ok), None)

    def finish(self) -> None:
        """Fill medians, throughput, ratios and memory from the raw repeats."""
        for c in self.contenders:
            if c.ok:
                c.median_s = statistics.median(c.times_s)
                c.points_per_s = self.points / c.median_s
                c.matmul_fraction = (
                    self.flops_per_point * self.points / c.median_s / (self.peak_gflops * 1e9)
                )
                c.peak_mib = max(c.peak_bytes) / 2**20
                if c.minor_faults:
                    c.faults_per_point = statistics.median(c.minor_faults) / self.points
        ref = self.by_name(LOSS_LANDSCAPES)
        for c in self.contenders:
            if ref is not None and c.ok:
                c.vs_loss_landscapes = c.points_per_s / ref.points_per_s
        self.targets = check_targets(self)


def _target(text: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": text, "met": met, "detail": detail}


def _matmul_target(default: ContenderResult | None, share: float) -> dict[str, Any]:
    return _target(
        f"default ≥ {share:.0%} of measured fp32 matmul throughput",
        default.matmul_fraction >= share if default else None,
        f"{default.matmul_fraction:.1%}" if default else "missing",
    )


def _vs_loop_target(
    default: ContenderResult | None, loop: ContenderResult | None, times: float, where: str, spec: str = ".2f"
) -> dict[str, Any]:
    ok = default is not None and loop is not None
    return _target(
        f"default ≥ {times:g}× the per-point loop{where}",
        loop.median_s / default.median_s >= times if ok else None,
        f"{loop.median_s / default.median_s:{spec}}×" if ok else "missing",
    )


def check_targets(w: WorkloadResult) -> list[dict[str, Any]]:
    """The targets of issue 6 that apply to ``w``; ``met`` is None when a figure is missing."""
    out: list[dict[str, Any]] = []
    default, ref, loop = w.by_name(DEFAULT), w.by_name(LOSS_LANDSCAPES), w.by_name(LOOP)
    engines = [c for c in w.contenders if c.name.startswith("engine") and c.ok]
    base = w.name.removesuffix(" [fp32]")  # the CPU targets (fp32); on CUDA only agreement is checked
    if base == "W-MLP-a":
        ok = default is not None and ref is not None
        out.append(
            _target(
                "default never slower than loss-landscapes",
                ok and default.vs_loss_landscapes >= 1.0 if ok else None,
                f"default {default.vs_loss_landscapes:.2f}× loss-landscapes" if ok else "missing",
            )
        )
        out.append(_matmul_target(default, 0.45))
    if base == "W-MLP-b":
        ok = default is not None and ref is not None
        out.append(
            _target(
                "default ≥ 1.4× loss-landscapes' points/s",
                default.vs_loss_landscapes >= 1.4 if ok else None,
                f"{default.vs_loss_landscapes:.2f}×" if ok else "missing",
            )
        )
    if base == "W-CNN":
        ok = default is not None and loop is not None
        out.append(
            _target(
                "default never slower than the per-point loop",
                default.median_s <= loop.median_s if ok else None,
                f"default {default.median_s:.2f} s, loop {loop.median_s:.2f} s"
                if ok
                else "missing",
            )
        )
    if base == "W-LM":
        out.append(_vs_loop_target(default, loop, 1.3, ""))
        out.append(_matmul_target(default, 0.60))
    if base == "W-GPU-resnet56-bf16":
        full = w.steps == GPU_FULL_STEPS and w.samples == GPU_FULL_IMAGES
        ok = default is not None
        out.append(
            _target(
                f"{GPU_FULL_STEPS}×{GPU_FULL_STEPS} grid over {GPU_FULL_IMAGES:,} images in bf16 under 3 minutes",
                default.median_s < 180 if ok and full else None,
                (f"default {default.median_s:.1f} s" if ok else "missing")
                + ("" if full else f" (at {w.steps}×{w.steps} and {w.samples:,} images: not the target's size)"),
            )
        )
    if base in ("W-MLP-a-cuda", "W-MLP-b-cuda"):
        out.append(_vs_loop_target(default, loop, 20, " on the same GPU", ".1f"))
    budgets = [(c, c.info.get("memory_budget")) for c in engines]
    if budgets and all(b for _, b in budgets):
        over = [c.name for c, b in budgets if max(c.peak_bytes) > b]
        out.append(
            _target(
                "peak memory within the engine's memory budget in every run",
                not over,
                f"over: {', '.join(over)}" if over
                else f"largest {max(max(c.peak_bytes) for c, _ in budgets) / 2**20:.0f} MiB, "
                f"smallest budget {min(b for _, b in budgets) / 2**20:.0f} MiB",
            )
        )
    diffs = [c.max_rel_diff_vs_loop for c in engines if c.max_rel_diff_vs_loop is not None]
    if diffs:
        worst = max(diffs)
        out.append(
            _target(
                f"engine agrees with the per-point loop (max rel diff < {w.tolerance:g})",
                bool(worst < w.tolerance),
                f"worst {worst:.2e} over {len(diffs)} engine runs",
            )
        )
    failed = [c.name for c in w.contenders if c.error]
    if failed:
        out.append(_target("every contender runs", False, "failed: " + ", ".join(failed)))
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _resolved(c: ContenderResult) -> str:
    """``strategy/tile_points·pass_points [tile shape]`` as the engine reported them (the pass
    only where it is smaller than the tile)."""
    if "strategy" not in c.info:
        return ""
    shape = c.info.get("tile_shape")
    tile, passes = c.info.get("tile_points", "?"), c.info.get("pass_points")
    text = f"{c.info['strategy']}/{tile}" + (f"·{passes}" if passes not in (None, tile) and c.info["strategy"] != "loop" else "")
    text += " compiled" if str(c.info.get("compile", "")).startswith("on") else ""
    return text + (f" [{'×'.join(map(str, shape))}]" if shape else "")


def format_table(results: list[WorkloadResult], header: dict[str, Any]) -> str:
    """Plain-text table, one block per workload, then the target checks."""
    lines = [
        f"machine: {header['machine'].get('cpu')} · {header['machine'].get('torch_threads')} "
        f"torch threads · torch {header['machine'].get('torch')}",
        "measured matmul throughput: "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in header["matmul_gflops"].items()),
        f"repeats: {header['repeats']} (median reported), contenders alternate within each repeat",
    ]
    cols = (
        "contender",
        "resolved",
        "median s",
        "points/s",
        "× LL",
        "% matmul",
        "peak MiB",
        "faults/pt",
        "rel diff",
        "vs fp32",
        "reruns",
    )
    for w in results:
        lines += [
            "",
            f"{w.name}: {w.description}; {w.steps}×{w.steps} grid on {w.device} ({w.precision}); "
            f"{w.flops_per_point / 1e6:,.1f} MFLOP per point; peak {w.peak_gflops:,.0f} GFLOP/s",
        ]
        limit = header.get("policy", {}).get("max_foreign", 0.1)
        disturbed = [c.name for c in w.contenders if any(f > limit for f in c.foreign_load)]
        if disturbed:
            lines.append(
                f"  WARNING: other processes used more than {limit:.0%} of the CPUs during some "
                f"timed runs even after reruns ({', '.join(disturbed)}); those are unreliable"
            )
        rows = [cols]
        for c in w.contenders:
            resolved = _resolved(c)
            if c.error or c.skipped:
                why = f"error: {c.error}" if c.error else str(c.skipped)
                rows.append((c.name, why[:40], "", "", "", "", "", "", "", "", ""))
                continue
            rows.append(
                (
                    c.name,
                    resolved,
                    _fmt(c.median_s, ".3f"),
                    _fmt(c.points_per_s, ",.0f"),
                    _fmt(c.vs_loss_landscapes, ".2f"),
                    _fmt(c.matmul_fraction * 100, ".1f"),
                    _fmt(c.peak_mib, ",.1f"),
                    _fmt(c.faults_per_point, ",.0f"),
                    _fmt(c.max_rel_diff_vs_loop, ".1e"),
                    _fmt(c.max_rel_diff_vs_fp32, ".1e"),
                    str(c.reruns),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        for n, r in enumerate(rows):
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
            cells += [v.rjust(wd) for v, wd in zip(r[2:], widths[2:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * wd for wd in widths))
        for t in w.targets:
            mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[t["met"]]
            lines.append(f"  [{mark}] {t['target']}: {t['detail']}")
    for study in header.get("studies", []):
        lines += ["", format_study(study)]
    for note in header.get("notes", []):
        lines += ["", note]
    return "\n".join(lines)


_MARKS = {True: "MET   ", False: "MISSED", None: "n/a   "}


def format_study(study: dict[str, Any]) -> str:
    """Plain-text table of one study (see the module docstring), then its target checks and notes."""
    lines = [f"{study['name']}: {study['description']}"]
    rows = [list(study["columns"]), *study["rows"]]
    if study["rows"]:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        for n, r in enumerate(rows):
            cells = [str(r[0]).ljust(widths[0])] + [str(v).rjust(wd) for v, wd in zip(r[1:], widths[1:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
            if n == 0:
                lines.append("  " + "  ".join("-" * wd for wd in widths))
    for t in study["targets"]:
        lines.append(f"  [{_MARKS[t['met']]}] {t['target']}: {t['detail']}")
    lines += [f"  {note}" for note in study.get("notes", [])]
    return "\n".join(lines)


def format_study_markdown(study: dict[str, Any]) -> str:
    """Markdown table of one study, then its target checks and notes."""
    out = [f"**{study['name']}**: {study['description']}.", ""]
    if study["rows"]:
        out += ["| " + " | ".join(study["columns"]) + " |",
                "|---" + "|--:" * (len(study["columns"]) - 1) + "|"]
        out += ["| " + " | ".join(map(str, r)) + " |" for r in study["rows"]]
        out.append("")
    for t in study["targets"]:
        mark = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        out.append(f"- {t['target']}: {mark} ({t['detail']})")
    out += [f"- {note}" for note in study.get("notes", [])]
    out.append("")
    return "\n".join(out)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return _clean(obj.item())
    return obj


def format_markdown(results: list[WorkloadResult], studies: list[dict[str, Any]] = ()) -> str:
    """Markdown tables (for docs/benchmarks.md), one per workload and study, with the target checks."""
    out: list[str] = []
    for w in results:
        out += [
            f"**{w.name}**: {w.description}; {w.steps}×{w.steps} grid on {w.device} "
            f"({w.precision}); {w.flops_per_point / 1e6:,.1f} MFLOP per point.",
            "",
            "| contender | resolved | median s | points/s | × LL | % matmul | peak MiB | faults/pt | rel diff |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for c in w.contenders:
            if c.error or c.skipped:
                out.append(f"| {c.name} | {c.error or c.skipped} | | | | | | | |")
                continue
            resolved = _resolved(c)
            out.append(
                f"| {c.name} | {resolved} | {_fmt(c.median_s, '.3f')} | {_fmt(c.points_per_s, ',.0f')}"
                f" | {_fmt(c.vs_loss_landscapes, '.2f')} | {_fmt(c.matmul_fraction * 100, '.1f')}"
                f" | {_fmt(c.peak_mib, ',.1f')} | {_fmt(c.faults_per_point, ',.0f')} | {_fmt(c.max_rel_diff_vs_loop, '.1e')} |"
            )
        out.append("")
        for t in w.targets:
            mark = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            out.append(f"- {t['target']}: {mark} ({t['detail']})")
        out.append("")
    out += [format_study_markdown(study) for study in studies]
    return "\n".join(out)


def load_json(path: Path) -> tuple[dict[str, Any], list[WorkloadResult]]:
    """Read a record written by :func:`write_json` back (NaN where it wrote null)."""
    record = json.loads(path.read_text())
    results = []
    for raw in record.pop("workloads"):
        contenders = [
            ContenderResult(
                **{k: math.nan if v is None and k not in _OPTIONAL else v for k, v in c.items()}
            )
            for c in raw.pop("contenders")
        ]
        raw = {k: math.nan if v is None and k not in _OPTIONAL else v for k, v in raw.items()}
        results.append(WorkloadResult(**raw, contenders=contenders))
    return record, results


_OPTIONAL = {"error", "skipped", "max_rel_diff_vs_loop", "max_rel_diff_vs_fp32", "met"}


def write_json(path: Path, header: dict[str, Any], results: list[WorkloadResult]) -> None:
    """Write the header (machine, command, settings) and every raw and derived figure."""
    write_record(path, {**header, "workloads": [asdict(w) for w in results]})


def write_record(path: Path, record: dict[str, Any]) -> None:
    """``record`` as indented JSON at ``path`` (numpy and torch scalars as plain numbers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(record), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":  # python -m benchmarks.report RESULT.json: Markdown tables
    import sys

    header, loaded = load_json(Path(sys.argv[1]))
    print(format_markdown(loaded, header.get("studies", [])))
