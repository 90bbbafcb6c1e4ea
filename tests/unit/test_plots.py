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


def test_render_all_self_contained_html(tmp_path):
    """``include_plotlyjs=True``: each page carries plotly.js (MLflow's viewer cannot load a file beside it)."""
    (page,) = [p for p in plots.render_all(_line(), tmp_path, metrics=["loss"], include_plotlyjs=True) if p.suffix == ".html"]
    text = page.read_text(encoding="utf-8")
    assert "Plotly.newPlot" in text and not re.findall(r"<script[^>]*src=", text)
    assert page.stat().st_size > 1_000_000 and not (tmp_path / plots.PLOTLY_JS).exists()


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


# --------------------------------------------------------------------------- issue 12: plots that say what they show
def _provenance(ds: xr.Dataset, kind: str = "random", **directions) -> xr.Dataset:
    """``ds`` with the root attrs a pipeline store carries (records.provenance, evaluate._create)."""
    dirs = {"kind": kind, "seeds": [0, 1], "normalization": "filter", "ignore": "biasbn", "towards": [],
            "norms": [12.5, 12.6], "cosine": 0.01, "cosine_after_orthogonalization": None}
    if kind == "checkpoints":
        dirs |= {"seeds": [], "normalization": "None", "ignore": "None",
                 "towards": ["/r/outputs/demo/checkpoints/epoch_020.pt", "/r/outputs/demo/checkpoints/epoch_030.pt"]}
    dirs |= directions
    ck = {"source": "/r/outputs/demo/checkpoints/epoch_010.pt", "path": "/r/outputs/demo/checkpoints/epoch_010.pt",
          "sha256": "ab" * 32, "parameter_count": 100, "training_run_id": None}
    return ds.assign_attrs(directions=dirs, checkpoint=ck, grid={"dims": ds["loss"].ndim}, model_mode="eval")


PLANE_XY = (axis(-0.2, 1.2, 15), axis(-0.2, 1.2, 29))  # holds (0, 0), (1, 0), (0, 1)


def _panel(fig):
    (ax,) = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    return ax


def _colorbar_ticks(fig) -> np.ndarray:
    (cax,) = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    lo, hi = sorted(cax.get_ylim())
    ticks = np.asarray(cax.get_yticks())
    return ticks[(ticks >= lo) & (ticks <= hi)]


def _assert_round(ticks: np.ndarray) -> None:
    """Ticks k·s apart, s = 1, 2, 2.5 or 5 × 10^e, each an integer multiple of s."""
    assert len(ticks) >= 2, ticks
    step = float(np.diff(ticks).min())
    assert np.allclose(np.diff(ticks), step)
    mantissa = step / 10.0 ** np.floor(np.log10(step))
    assert any(np.isclose(mantissa, m) for m in (1.0, 2.0, 2.5, 5.0)), (ticks, step)
    assert np.allclose(ticks / step, np.round(ticks / step), atol=1e-9), ticks
    assert all(len(f"{t:.10g}") <= 5 for t in ticks), ticks  # printed short: 0.5, -1.25, 200


def _marker_positions(ax) -> dict[str, tuple[float, ...]]:
    return {ln.get_label(): tuple(np.ravel(ln.get_xydata())) for ln in ax.get_lines() if ln.get_linestyle() == "None"}


def test_axis_labels_and_title_from_provenance():
    ds = _provenance(_quadratic())
    fig = plots.plot_contour(ds, "loss", log=True)
    ax = _panel(fig)
    assert ax.get_xlabel() == "direction 1 (filter-normalized Gaussian, seed 0)"
    assert ax.get_ylabel() == "direction 2 (filter-normalized Gaussian, seed 1)"
    assert ax.get_title() == "loss (log10) · epoch_010 · 21×15 plane"
    (cax,) = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert cax.get_ylabel() == "loss (log10)"

    ortho = _provenance(_quadratic(), normalization="layer", cosine_after_orthogonalization=0.0)
    labels = [plots._axis_labels(ortho, ["x", "y"])]
    assert labels == [["direction 1 (layer-normalized Gaussian, seed 0)",
                       "direction 2 (layer-normalized Gaussian, seed 1, orthogonalized)"]]
    three = _provenance(_quadratic(x=PLANE_XY[0], y=PLANE_XY[1]), "checkpoints")
    ax = _panel(plots.plot_contour(three, filled=True))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("towards epoch_020", "towards epoch_030")
    assert "epoch_010" in ax.get_title() and "15×29 plane" in ax.get_title()
    # a coordinate's long_name wins; a plain dataset with other dim names keeps them
    named = _quadratic().rename({"x": "alpha", "y": "beta"})
    named["alpha"].attrs["long_name"] = "α (lr × 10)"
    ax = _panel(plots.plot_contour(named))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("α (lr × 10)", "beta")


def test_three_checkpoint_plane_marks_every_checkpoint():
    ds = _provenance(_quadratic(x=PLANE_XY[0], y=PLANE_XY[1]), "checkpoints")
    for fig in (plots.plot_contour(ds), plots.plot_contour(ds, filled=True, log=True)):
        assert _marker_positions(_panel(fig)) == {
            "θ0 (epoch_010)": (0.0, 0.0), "epoch_020": (1.0, 0.0), "epoch_030": (0.0, 1.0)}
        names = {t.get_text() for t in _panel(fig).texts}
        assert {"epoch_020", "epoch_030"} <= names  # named beside the markers
    surface = plots.plot_surface(ds)
    ax3 = [a for a in surface.axes if a.name == "3d"][0]
    marks = {ln.get_label(): ln for ln in ax3.get_lines()}
    assert set(marks) == {"θ0 (epoch_010)", "epoch_020", "epoch_030"}
    x, y, z = (np.ravel(v) for v in marks["epoch_020"].get_data_3d())
    i, j = np.flatnonzero(np.isclose(PLANE_XY[0], 1.0))[0], np.flatnonzero(PLANE_XY[1] == 0.0)[0]
    assert (x[0], y[0]) == (1.0, 0.0) and z[0] == pytest.approx(ds["loss"].values[i, j])

    # normalized directions do not pass through the checkpoints; orthogonalized ones miss θ2
    normalized = _provenance(_quadratic(x=PLANE_XY[0], y=PLANE_XY[1]), "checkpoints", normalization="filter")
    assert list(_marker_positions(_panel(plots.plot_contour(normalized)))) == ["θ0 (epoch_010)"]
    ortho = _provenance(_quadratic(x=PLANE_XY[0], y=PLANE_XY[1]), "checkpoints", cosine_after_orthogonalization=0.0)
    assert list(_marker_positions(_panel(plots.plot_contour(ortho)))) == ["θ0 (epoch_010)", "epoch_020"]


def test_interpolation_line_marks_both_ends():
    t = axis(-0.25, 1.25, 31)
    line = xr.Dataset({"loss": ("x", (t - 0.9) ** 2 + 0.1)}, coords={"x": t})
    line = _provenance(line.assign(accuracy=1.0 / (1.0 + line["loss"])), "checkpoints",
                       towards=["/r/ck/epoch_030.pt"], norms=[3.0])
    fig = plots.plot_curve(line, ("loss", "accuracy"), log=True)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "towards epoch_030"
    assert ax.get_title() == "loss, accuracy · epoch_010 · 31-point line"
    vlines = {ln.get_label(): ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_label() not in ("loss",)}
    assert vlines == {"θ0 (epoch_010)": 0.0, "epoch_030": 1.0}
    (top,) = [c for c in ax.child_axes]
    assert [tk.get_text() for tk in top.get_xticklabels()] == ["θ0 (epoch_010)", "epoch_030"]
    assert list(top.get_xticks()) == [0.0, 1.0]


@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(lambda ds: plots.plot_contour(ds, "loss", log=True), id="contour-log"),
        pytest.param(lambda ds: plots.plot_contour(ds, "accuracy", filled=True), id="filled"),
        pytest.param(lambda ds: plots.plot_surface(ds, "loss", log=True), id="surface-log"),
        pytest.param(lambda ds: plots.plot_contour(ds * 37.3 - 11.0, "loss", levels=7), id="shifted"),
        pytest.param(lambda ds: plots.comparison_figure([ds, ds * 2.0], ["a", "b"], log=True), id="comparison"),
    ],
)
def test_colorbar_ticks_are_round(draw):
    _assert_round(_colorbar_ticks(draw(_provenance(_quadratic()))))


def test_nice_ticks_and_round_coordinates():
    _assert_round(plots.nice_ticks(-1.3497, 0.4499))
    assert plots.nice_ticks(-1.3497, 0.4499).tolist() == [-1.0, -0.5, 0.0]
    x = axis(-1.0, 1.0, 21)
    assert x[9] != -0.1 and plots.round_coordinate(x[9], x) == -0.1  # -0.09999999999999998
    line = axis(-0.25, 1.25, 21)
    assert [plots.round_coordinate(v, line) for v in (line[18], line[1])] == [1.1, -0.175]
    assert plots.round_coordinate(0.0, x) == 0.0 and plots.round_coordinate(1 / 3, x) == pytest.approx(1 / 3, abs=1e-12)
    assert plots.round_coordinate(2.0e-7, [0.0, 1.0e-6]) == 2.0e-7  # small axes keep their digits


@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(lambda ds: plots.plot_contour(ds, "loss"), id="contour"),
        pytest.param(lambda ds: plots.plot_contour(ds, "loss", filled=True), id="filled"),
        pytest.param(lambda ds: plots.plot_surface(ds), id="surface"),
        pytest.param(lambda ds: plots.plot_curve(ds.isel(y=6), ("loss", "accuracy")), id="curve"),
        pytest.param(lambda ds: plots.comparison_figure([ds, ds], ["a", "b"]), id="comparison"),
        pytest.param(lambda ds: _into_axes(ds), id="given-axes"),
    ],
)
def test_legend_stays_off_the_data(draw):
    ds = _provenance(_quadratic(x=PLANE_XY[0], y=PLANE_XY[1]), "checkpoints")
    fig = draw(ds)
    fig.draw_without_rendering()
    legends = [*fig.legends, *(a.get_legend() for a in fig.axes if a.get_legend() is not None)]
    assert legends, "no legend"
    data_axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    for legend in legends:
        box = legend.get_window_extent()
        for ax in data_axes:
            assert not box.overlaps(ax.get_window_extent()), (legend, ax)
        labels = [t.get_text() for t in legend.get_texts()]
        assert any(lb.startswith("θ0") for lb in labels), labels


def _into_axes(ds):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), layout="constrained")
    return plots.plot_contour(ds, ax=fig.add_subplot())


def _newplot_args(path: Path) -> tuple[list, dict]:
    """The data and layout JSON of the page's ``Plotly.newPlot(id, data, layout, config)`` call."""
    text = path.read_text(encoding="utf-8")
    start = text.index("Plotly.newPlot(")
    decoder = json.JSONDecoder()
    pos = text.index(",", start) + 1
    values = []
    for _ in range(2):
        while text[pos] in " \n\t,":
            pos += 1
        value, pos = decoder.raw_decode(text, pos)
        values.append(value)
    return values[0], values[1]


def test_html_small_one_colorbar_theta0_on_surface(tmp_path):
    x = y = axis(-1.0, 1.0, 21)
    ds = _provenance(_quadratic(x=x, y=y))
    path = plots.plot_html(ds, "loss", path=tmp_path / "plots" / "loss.html", log=True)
    _html_ok(path)  # < 200 KB, plotly.min.js beside it, no network source
    data, layout = _newplot_args(path)
    scaled = [t for t in data if t["type"] in ("surface", "contour", "heatmap")]
    assert [t["type"] for t in scaled] == ["surface", "contour"]
    assert [t.get("showscale", True) for t in scaled] == [True, False]  # one colour bar
    assert not any(k.startswith("coloraxis") for k in layout)
    assert scaled[0]["colorscale"] == scaled[1]["colorscale"] == plots._plotly_colorscale()
    first, last = scaled[0]["colorscale"][0][1], scaled[0]["colorscale"][-1][1]
    assert (first, last) == ("rgb(68,1,84)", "rgb(253,231,37)")  # matplotlib's viridis ends
    _assert_round(np.asarray(scaled[0]["colorbar"]["tickvals"]))
    assert layout["scene"]["xaxis"]["title"]["text"] == "direction 1 (filter-normalized Gaussian, seed 0)"
    assert layout["xaxis"]["title"]["text"] == "direction 1 (filter-normalized Gaussian, seed 0)"
    assert layout["yaxis"]["title"]["text"] == "direction 2 (filter-normalized Gaussian, seed 1)"
    assert "epoch_010" in layout["title"]["text"] and "21×21 plane" in layout["title"]["text"]

    fig = plots.html_figure(ds, "loss", log=True)
    (on_surface,) = [t for t in fig.data if t.type == "scatter3d"]
    assert on_surface.name == "θ0 (epoch_010)"
    assert (on_surface.x[0], on_surface.y[0]) == (0.0, 0.0)
    assert on_surface.z[0] == pytest.approx(np.log10(ds["loss"].values[10, 10]))

    # a second page in the folder shares the one plotly.min.js
    plots.plot_html(_line(), path=tmp_path / "plots" / "line.html")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["line.html", "loss.html", "plotly.min.js"]


def test_html_embedded_on_request(tmp_path):
    out = plots.plot_html(_line(), path=tmp_path / "e.html", include_plotlyjs=True)
    assert out.stat().st_size > 1_000_000 and not (tmp_path / plots.PLOTLY_JS).exists()


def test_planes_group_and_differences_stay_within_a_plane(tmp_path):
    a = _provenance(_quadratic(1.0))
    b = _provenance(_quadratic(2.0))  # same directions, same θ0: one plane
    other = _provenance(_quadratic(3.0), seeds=[5, 6], norms=[11.0, 11.1])  # other directions
    moved = _provenance(_quadratic(4.0)).assign_attrs(checkpoint={"source": "epoch_020.pt", "sha256": "cd" * 32})
    assert plots.plane_id(a) == plots.plane_id(b) != plots.plane_id(other)
    assert plots.plane_id(moved) not in (plots.plane_id(a), plots.plane_id(other))  # other θ0
    assert plots.plane_id(_quadratic()) is None
    assert plots.plane_id(_quadratic().assign_attrs({plots.PLANE_ATTR: "p1"})) == "p1"
    assert plots.plane_groups([a, other, b, moved]) == [[0, 2], [1], [3]]
    assert plots.plane_groups([a, b], planes=["t1", "t2"]) == [[0], [1]]  # e.g. MLflow tags win

    paths = plots.plot_comparison([a, other, b, moved], ["a", "o", "b", "m"], out_dir=tmp_path / "mix")
    assert [p.name for p in paths] == ["loss_comparison.png", "loss_difference.png", "loss_comparison.html"]
    assert json.loads(_png(paths[0])[2][plots.COLOR_SCALE_KEY])["planes"] == 3
    fig = plots.comparison_figure([a, other, b, moved], ["a", "o", "b", "m"])
    assert "difference maps need one shared plane" in fig.get_suptitle()
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["a · plane 1", "o · plane 2", "b · plane 1", "m · plane 3"]
    assert len(panels) == 4 and len({ax.get_subplotspec().rowspan.start for ax in panels}) == 2  # 2×2 grid
    assert all(ax.get_box_aspect() == 1 for ax in panels)
    diff = plots._difference_figure(plots._comparison_fields([a, other, b, moved], list("aobm"), "loss", False, "t"),
                                    [[0, 2], [1], [3]])
    assert [ax.get_title() for ax in diff.axes if ax.get_label() != "<colorbar>"] == ["b − a"]

    # only different planes: side by side, no difference map
    paths = plots.plot_comparison([a, other], ["a", "o"], out_dir=tmp_path / "apart", log=True)
    assert [p.name for p in paths] == ["loss_log_comparison.png", "loss_log_comparison.html"]
    _html_ok(paths[1])
    data, layout = _newplot_args(paths[1])
    assert sum(t.get("showscale", True) for t in data if t["type"] == "contour") == 1
    assert "difference maps need one shared plane" in layout["title"]["text"]
    assert layout["xaxis"]["title"]["text"] == "direction 1 (filter-normalized Gaussian, seed 0)"
    assert layout["xaxis2"]["title"]["text"] == "direction 1 (filter-normalized Gaussian, seed 5)"


def test_bad_comparison_input_writes_nothing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigurationError, match=r"all 1-D or all 2-D"):
        plots.plot_comparison([_quadratic(), _line()], ["a", "b"], out_dir=out)
    with pytest.raises(ConfigurationError, match=r"2 datasets and 1 planes"):
        plots.plot_comparison([_quadratic(), _quadratic()], ["a", "b"], out_dir=out, planes=["p"])
    with pytest.raises(ConfigurationError, match=r"include_plotlyjs='cdn'"):
        plots.plot_comparison([_quadratic()], ["a"], out_dir=out, include_plotlyjs="cdn")
    assert not out.exists()
