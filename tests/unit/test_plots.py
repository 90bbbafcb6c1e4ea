"""Plots: real PNG/HTML files from 1-D and 2-D landscapes, shared colour scales, errors."""

from __future__ import annotations

import json
import re
import struct
import sys
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import xarray as xr

from landscapes import plots
from landscapes.errors import ConfigurationError
from landscapes.grid import axis
from landscapes.store import LandscapeStore

X = axis(-1.0, 1.0, 21)
Y = axis(-0.5, 1.5, 15)  # non-square grid


def _quadratic(scale: float = 1.0, x: np.ndarray = X, y: np.ndarray = Y) -> xr.Dataset:
    xx, yy = np.meshgrid(x, y, indexing="ij")
    loss = scale * ((xx - 0.3) ** 2 + 2.0 * (yy - 0.2) ** 2) + 0.1
    loss[3, 4] = np.nan  # an unevaluated point
    acc = 1.0 / (1.0 + loss)
    return xr.Dataset(
        {"loss": (("x", "y"), loss), "accuracy": (("x", "y"), acc)},
        coords={"x": x, "y": y},
        attrs={"name": f"quadratic x{scale}"},
    )


def _line(scale: float = 1.0) -> xr.Dataset:
    loss = scale * (X - 0.2) ** 2 + 0.05
    loss[-1] = np.inf  # diverged point: drawn as a gap
    return xr.Dataset({"loss": ("x", loss), "accuracy": ("x", 1.0 / (1.0 + loss))}, coords={"x": X})


def _png(path: Path) -> tuple[int, int, dict[str, str]]:
    """Width, height and tEXt chunks of a PNG, checking the signature and chunk CRCs."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, size, text = 8, None, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r} chunk of {path}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
        if kind == b"IEND":
            break
    assert size is not None
    return size[0], size[1], text


def _html_ok(path: Path) -> None:
    """A page that loads plotly.js from the file beside it (works offline), and is small."""
    text = path.read_text(encoding="utf-8")
    assert text.lower().startswith(("<html", "<!doctype html")) and "Plotly.newPlot" in text
    sources = re.findall(r"<script[^>]*src=\"([^\"]+)\"", text)
    assert sources == [plots.PLOTLY_JS]  # no CDN, no other network source
    assert (path.parent / plots.PLOTLY_JS).stat().st_size > 1_000_000
    assert path.stat().st_size < 200_000


def test_contour_png_and_theta0(tmp_path):
    fig = plots.plot_contour(_quadratic(), "loss", title="q")
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    # no provenance: the default dims x, y read as directions (issue 12: not "x" and "y")
    assert ax.get_xlabel() == "direction 1" and ax.get_ylabel() == "direction 2"
    assert ax.get_title() == "q"
    assert [line.get_label() for line in ax.get_lines()] == ["θ0"]
    out = tmp_path / "c.png"
    fig.savefig(out, dpi=plots.DPI)
    assert _png(out)[:2] == (600, 500)

    # a range without 0: no θ0 marker; filled + log still works
    shifted = _quadratic(x=axis(0.5, 2.0, 9))
    fig = plots.plot_contour(shifted, "loss", filled=True, log=True)
    assert all(a.get_lines() == [] for a in fig.axes)


def test_contour_levels_cover_the_quadratic():
    ds = _quadratic()
    fig = plots.plot_contour(ds, "loss", filled=True, levels=10)
    cs = fig.axes[0].collections[0]
    lo, hi = np.nanmin(ds["loss"].values), np.nanmax(ds["loss"].values)
    assert cs.levels[0] <= lo < cs.levels[1] and cs.levels[-2] < hi <= cs.levels[-1]


def test_contour_draws_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plots.plot_contour(_quadratic(), ax=ax) is fig


def test_curve_twin_axes(tmp_path):
    fig = plots.plot_curve(_line(), ("loss", "accuracy"), log=True)
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    assert fig.axes[1].get_ylabel() == "accuracy"
    out = tmp_path / "curve.png"
    fig.savefig(out, dpi=plots.DPI)
    assert _png(out)[:2] == (650, 450)


def test_render_all_2d_from_store(tmp_path):
    """Input through ``.to_xarray()`` of a real store; every 2-D plot written."""
    ds = _quadratic()
    store = LandscapeStore.create(
        tmp_path / "s.zarr", axes=[X, Y], metrics=["loss", "accuracy"], tile_shape=(21, 15)
    )
    store.write_tile((0, 0), {m: ds[m].values for m in ("loss", "accuracy")})
    paths = plots.render_all(store, tmp_path / "out", metrics=["loss"])
    assert [p.name for p in paths] == [
        "loss_contour.png",
        "loss_contour_filled.png",
        "loss_surface.png",
        "loss.html",
    ]
    assert _png(paths[0])[:2] == (600, 500)
    assert _png(paths[2])[:2] == (700, 550)
    _html_ok(paths[3])


def test_render_all_1d(tmp_path):
    paths = plots.render_all(_line(), tmp_path, log=True)
    assert [p.name for p in paths] == [
        "loss_curve_log.png",
        "loss_log.html",
        "accuracy_curve_log.png",
        "accuracy_log.html",
        "curves_log.png",
    ]
    for p in paths:
        if p.suffix == ".png":
            assert _png(p)[:2] == (650, 450)
        else:
            assert "Plotly.newPlot" in p.read_text(encoding="utf-8")


def test_plot_html_2d_directory_mode(tmp_path):
    out = plots.plot_html(
        _quadratic(), "accuracy", path=tmp_path / "h" / "acc.html", include_plotlyjs="directory"
    )
    text = out.read_text(encoding="utf-8")
    assert '"type":"surface"' in text and '"type":"contour"' in text
    assert (out.parent / "plotly.min.js").stat().st_size > 1_000_000


def test_comparison_shared_scale_2d(tmp_path):
    a, b, c = _quadratic(1.0), _quadratic(3.0), _quadratic(2.0, x=axis(-2.0, 2.0, 11))
    paths = plots.plot_comparison([a, b, c], ["a", "b", "c"], "loss", out_dir=tmp_path)
    assert [p.name for p in paths] == [
        "loss_comparison.png",
        "loss_difference.png",
        "loss_comparison.html",
    ]
    lo = min(np.nanmin(d["loss"].values) for d in (a, b, c))
    hi = max(np.nanmax(d["loss"].values) for d in (a, b, c))
    scale = json.loads(_png(paths[0])[2][plots.COLOR_SCALE_KEY])
    assert scale["vmin"] == lo and scale["vmax"] == hi and scale["log"] is False
    assert scale["planes"] == 1  # no provenance: the caller vouches for one plane
    # only b shares a's grid: one difference panel (plus its colour bar)
    _png(paths[1])
    _html_ok(paths[2])

    fig = plots.comparison_figure([a, b, c], ["a", "b", "c"], "loss")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    norms = {id(cs.norm) for ax in panels for cs in ax.collections}
    assert len(panels) == 3 and len(norms) == 1  # three panels, one norm
    norm = panels[0].collections[0].norm
    assert (norm.vmin, norm.vmax) == (lo, hi)
    assert panels[0].get_shared_x_axes().joined(panels[0], panels[2])
    assert all(ax.get_box_aspect() == 1 for ax in panels)  # square panels, not stretched
    assert fig.get_supxlabel() == "direction 1" and fig.get_supylabel() == "direction 2"


def test_comparison_log_and_1d(tmp_path):
    a, b = _quadratic(1.0), _quadratic(0.5)
    paths = plots.plot_comparison([a, b], ["a", "b"], "loss", out_dir=tmp_path, log=True)
    scale = json.loads(_png(paths[0])[2][plots.COLOR_SCALE_KEY])
    assert scale["vmin"] == pytest.approx(np.log10(np.nanmin(b["loss"].values)), rel=1e-12)
    assert scale["vmax"] == pytest.approx(np.log10(np.nanmax(a["loss"].values)), rel=1e-12)

    paths = plots.plot_comparison([_line(1.0), _line(2.0)], ["a", "b"], out_dir=tmp_path / "1d")
    assert [p.name for p in paths] == ["loss_comparison.png", "loss_comparison.html"]
    assert _png(paths[0])[:2] == (650, 450)
    fig = plots.comparison_figure([_line(1.0), _line(2.0)], ["a", "b"])
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["a", "b", "θ0"]  # θ0 marked


def test_no_global_matplotlib_state(tmp_path):
    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    for fig in (plots.plot_surface(_quadratic()), plots.plot_curve(_line())):
        fig.savefig(tmp_path / "f.png")
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda p: plots.plot_contour(_line()), r"needs a 2-D landscape", id="contour-1d"
        ),
        pytest.param(
            lambda p: plots.plot_surface(_quadratic(), "lossy"),
            r"metric='lossy' is not in the dataset; choose one of",
            id="unknown-metric",
        ),
        pytest.param(
            lambda p: plots.plot_curve(_quadratic()), r"needs a 1-D landscape", id="curve-2d"
        ),
        pytest.param(
            lambda p: plots.plot_html(_line(), path=p / "x.html", include_plotlyjs="cdn"),
            r"include_plotlyjs='cdn' needs network access",
            id="html-cdn",
        ),
        pytest.param(
            lambda p: plots.plot_contour(_quadratic() * np.nan),
            r"no finite values, so there is nothing to plot",
            id="all-nan",
        ),
        pytest.param(
            lambda p: plots.plot_contour(-_quadratic(), log=True),
            r"no positive values.*pass log=False",
            id="log-nonpositive",
        ),
        pytest.param(
            lambda p: plots.plot_comparison([_quadratic()], ["a", "b"], out_dir=p),
            r"1 datasets and 2 labels",
            id="labels-count",
        ),
        pytest.param(
            lambda p: plots.plot_comparison([_quadratic(), _line()], ["a", "b"], out_dir=p),
            r"all 1-D or all 2-D",
            id="mixed-dims",
        ),
        pytest.param(
            lambda p: plots.render_all(object(), p),
            r"cannot plot a object; pass an xarray.Dataset",
            id="not-a-dataset",
        ),
    ],
)
def test_bad_inputs(tmp_path, call, match):
    with pytest.raises(ConfigurationError, match=match):
        call(tmp_path)
