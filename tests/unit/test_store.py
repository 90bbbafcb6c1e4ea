"""LandscapeStore: Zarr v3 layout, tile writes, done-mask, xarray view, errors, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import numpy as np
import pytest
import xarray as xr
import zarr

from landscapes.errors import ConfigurationError, StoreError
from landscapes.grid import Tile, axis
from landscapes.store import DIRECTIONS_CHUNK_ELEMENTS, LandscapeStore

X = axis(-1.0, 1.0, 5)  # contains 0
Y = axis(0.5, 2.0, 7)  # does not contain 0
METRICS = ("loss", "accuracy")


def _block(tile: Tile, offset: float) -> np.ndarray:
    """Values that encode their global grid position: offset + 100 i + j."""
    ii, jj = np.meshgrid(
        np.arange(tile.slices[0].start, tile.slices[0].stop),
        np.arange(tile.slices[1].start, tile.slices[1].stop),
        indexing="ij",
    )
    return offset + 100.0 * ii + jj


@pytest.fixture
def store2d(tmp_path):
    return LandscapeStore.create(
        tmp_path / "plane.zarr",
        axes=[X, Y],
        metrics=METRICS,
        tile_shape=(2, 3),
        attrs={"checkpoint": "ckpt.pt", "seeds": [1, 2], "nested": {"lr": 0.1}},
    )


def test_layout_properties(store2d):
    assert store2d.dims == ("x", "y")
    assert store2d.metrics == METRICS
    assert store2d.shape == (5, 7)
    assert store2d.tile_shape == (2, 3)
    assert [t.index for t in store2d.tiles()][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert len(store2d.tiles()) == 9
    np.testing.assert_array_equal(store2d.axes[1], Y)
    assert store2d.grid.shape == (5, 7)
    assert store2d.read_directions() is None
    # one tile == one chunk of each metric array
    assert zarr.open_array(store2d.path / "loss", mode="r").chunks == (2, 3)
    assert store2d.attrs["landscapes_store_version"] == 1
    assert store2d.attrs["tile_shape"] == [2, 3]


def test_write_reopen_read_done_mask(store2d):
    tiles = store2d.tiles()
    written = [tiles[0], tiles[4], tiles[8]]  # (0,0), (1,1), (2,2) – last is a 1x1 edge tile
    for t in written:
        loss = _block(t, 0.0)
        acc = _block(t, 0.5)
        if t.index == (1, 1):
            loss[0, 0], loss[1, 2], acc[0, 1] = np.nan, np.inf, -np.inf
        store2d.write_tile(t, {"loss": loss, "accuracy": acc})
    store2d.mark_done([tiles[0], (1, 1)])  # Tile objects and plain indices both work

    reopened = LandscapeStore.open(store2d.path, mode="r")
    loss, acc = reopened.read("loss"), reopened.read("accuracy")
    assert loss.dtype == np.float64 and loss.shape == (5, 7)
    expected = np.full((5, 7), np.nan)
    for t in written:
        expected[t.slices] = _block(t, 0.0)
    expected[2, 3], expected[3, 5] = np.nan, np.inf  # tile (1,1) covers rows 2-3, cols 3-5
    np.testing.assert_array_equal(loss, expected)
    assert np.isneginf(acc[2, 4]) and acc[4, 6] == 0.5 + 406.0

    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    np.testing.assert_array_equal(reopened.done_mask(), mask)
    # (2,2) has values but is not done: completion is never inferred from data
    assert [t.index for t in reopened.missing_tiles()] == [
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 2),
        (2, 0),
        (2, 1),
        (2, 2),
    ]
    assert not reopened.is_complete()

    store2d.mark_done(store2d.tiles())
    assert reopened.is_complete() and reopened.missing_tiles() == []


def test_one_dimensional_flat_blocks(tmp_path):
    xs = axis(0.25, 3.0, 10)
    store = LandscapeStore.create(tmp_path / "line", axes=[xs], metrics=["loss"], tile_shape=(4,))
    assert store.dims == ("x",)
    assert [t.shape for t in store.tiles()] == [(4,), (4,), (2,)]
    store.write_tile((2,), {"loss": np.array([7.0, np.nan])})
    store.write_tile(store.tiles()[0], {"loss": np.arange(4.0)})
    store.mark_done([(2,)])
    np.testing.assert_array_equal(
        LandscapeStore.open(store.path).read("loss"),
        [0, 1, 2, 3, np.nan, np.nan, np.nan, np.nan, 7, np.nan],
    )
    np.testing.assert_array_equal(store.done_mask(), [False, False, True])


def test_flat_block_in_c_order(store2d):
    t = store2d.tiles()[1]
    store2d.write_tile(t, {"loss": _block(t, 0).reshape(-1), "accuracy": _block(t, 0).ravel()})
    np.testing.assert_array_equal(store2d.read("loss")[t.slices], _block(t, 0))


def test_directions_round_trip_chunked(tmp_path):
    n = DIRECTIONS_CHUNK_ELEMENTS + 5
    d = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    store = LandscapeStore.create(
        tmp_path / "d", axes=[X], metrics=["loss"], tile_shape=(5,), directions=d
    )
    back = LandscapeStore.open(store.path, mode="r").read_directions()
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, d)
    arr = zarr.open_array(store.path / "directions", mode="r")
    assert arr.chunks == (1, DIRECTIONS_CHUNK_ELEMENTS)
    assert arr.metadata.dimension_names == ("direction", "parameter")


def test_attrs_round_trip_and_update(store2d):
    reopened = LandscapeStore.open(store2d.path)
    attrs = reopened.attrs
    assert attrs["checkpoint"] == "ckpt.pt" and attrs["nested"] == {"lr": 0.1}
    assert attrs["metrics"] == ["loss", "accuracy"] and attrs["dims"] == ["x", "y"]
    reopened.update_attrs({"summary": {"loss_at_theta0": np.float64(0.25)}, "seeds": (3,)})
    again = LandscapeStore.open(store2d.path, mode="r").attrs
    assert again["summary"] == {"loss_at_theta0": 0.25} and again["seeds"] == [3]
    assert again["checkpoint"] == "ckpt.pt"
    # consolidated metadata follows the update
    assert xr.open_zarr(store2d.path, consolidated=True).attrs["seeds"] == [3]


@pytest.mark.parametrize("consolidated", [True, False])
def test_xarray_open_zarr(store2d, consolidated):
    t = store2d.tiles()[3]
    store2d.write_tile(t, {"loss": _block(t, 0), "accuracy": _block(t, 1)})
    ds = xr.open_zarr(store2d.path, consolidated=consolidated)
    assert ds["loss"].dims == ("x", "y") and ds["done"].dims == ("tile_x", "tile_y")
    np.testing.assert_array_equal(ds["y"].values, Y)
    np.testing.assert_array_equal(ds["loss"].values, store2d.read("loss"))
    assert float(ds["loss"].sel(x=X[2], y=Y[0])) == 200.0
    assert ds.attrs["checkpoint"] == "ckpt.pt"

    view = store2d.to_xarray()
    assert set(view.data_vars) == set(METRICS) and set(view.coords) == {"x", "y"}
    np.testing.assert_array_equal(view["accuracy"].values, store2d.read("accuracy"))
    assert view.attrs["tile_shape"] == [2, 3]
    assert view["loss"].sel(x=X[2], y=Y[0]).item() == 200.0


def test_overwrite(store2d, tmp_path):
    store2d.write_tile((0, 0), {"loss": np.ones((2, 3)), "accuracy": np.ones((2, 3))})
    store2d.mark_done([(0, 0)])
    fresh = LandscapeStore.create(
        store2d.path, axes=[X], metrics=["loss"], tile_shape=(2,), overwrite=True
    )
    assert fresh.shape == (5,) and not fresh.done_mask().any()
    assert np.isnan(fresh.read("loss")).all()


def test_pickle_reopens(store2d):
    clone = pickle.loads(pickle.dumps(store2d))
    assert clone.path == store2d.path and clone.metrics == store2d.metrics


def test_concurrent_processes_write_disjoint_tiles(tmp_path):
    store = LandscapeStore.create(
        tmp_path / "par",
        axes=[axis(-1, 1, 24), axis(-1, 1, 20)],
        metrics=METRICS,
        tile_shape=(3, 4),
    )
    tasks = [(t, {"loss": _block(t, 0.0), "accuracy": _block(t, 0.5)}) for t in store.tiles()]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:  # the bound method pickles the store as (path, mode)
        pool.starmap(store.write_tile, tasks, chunksize=1)
    store.mark_done(store.tiles())
    loss = LandscapeStore.open(store.path, mode="r").read("loss")
    ii, jj = np.meshgrid(np.arange(24), np.arange(20), indexing="ij")
    np.testing.assert_array_equal(loss, 100.0 * ii + jj)
    assert store.is_complete()


# --------------------------------------------------------------------------- bad inputs
def _other_tiling_tile(store):
    return Tile(index=(0, 0), slices=(slice(0, 1), slice(0, 3)))


@pytest.mark.parametrize(
    ("tile", "values", "match"),
    [
        pytest.param(
            (0, 0),
            {"loss": np.zeros((2, 3)), "acc": np.zeros((2, 3))},
            r"unknown: \['acc'\], missing: \['accuracy'\]",
            id="wrong-metric-name",
        ),
        pytest.param(
            (0, 0), {"loss": np.zeros((2, 3))}, r"missing: \['accuracy'\]", id="missing-metric"
        ),
        pytest.param(
            (0, 0),
            {"loss": np.zeros((3, 2)), "accuracy": np.zeros((2, 3))},
            r"'loss' block has shape \(3, 2\), tile \(0, 0\) needs \(2, 3\)",
            id="wrong-block-shape",
        ),
        pytest.param(
            (2, 2),
            {"loss": np.zeros((2, 3)), "accuracy": np.zeros((2, 3))},
            r"needs \(1, 1\)",
            id="edge-tile-shape",
        ),
        pytest.param(
            (3, 0),
            {"loss": np.zeros((2, 3)), "accuracy": np.zeros((2, 3))},
            r"outside the tile grid \(3, 3\)",
            id="index-out-of-range",
        ),
        pytest.param(
            "other",
            {"loss": np.zeros((1, 3)), "accuracy": np.zeros((1, 3))},
            r"take tiles from store.tiles\(\)",
            id="tile-of-other-tiling",
        ),
        pytest.param(
            (0, 0),
            {"loss": np.full((2, 3), "a"), "accuracy": np.zeros((2, 3))},
            r"dtype <U1; pass real numbers",
            id="non-numeric",
        ),
    ],
)
def test_write_tile_errors(store2d, tile, values, match):
    if tile == "other":
        tile = _other_tiling_tile(store2d)
    with pytest.raises(StoreError, match=match):
        store2d.write_tile(tile, values)
    assert np.isnan(store2d.read("loss")).all()


def test_read_only_and_read_errors(store2d):
    ro = LandscapeStore.open(store2d.path, mode="r")
    with pytest.raises(StoreError, match=r"open read-only; open it with mode='r\+'"):
        ro.write_tile((0, 0), {"loss": np.zeros((2, 3)), "accuracy": np.zeros((2, 3))})
    with pytest.raises(StoreError, match=r"mark_done: .* read-only"):
        ro.mark_done([(0, 0)])
    with pytest.raises(StoreError, match=r"no metric 'acc'.*holds \['loss', 'accuracy'\]"):
        ro.read("acc")
    with pytest.raises(StoreError, match=r"mark_done: tile index \(0, 9\) is outside"):
        store2d.mark_done([(0, 9)])
    with pytest.raises(ConfigurationError, match=r"mode='w': use 'r'"):
        LandscapeStore.open(store2d.path, mode="w")


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="the path does not exist; create it"):
        LandscapeStore.open(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match=r"not a landscape store: no zarr.json"):
        LandscapeStore.open(tmp_path / "plain")
    zarr.create_group(str(tmp_path / "other"), zarr_format=3, attributes={"a": 1})
    with pytest.raises(StoreError, match="'landscapes_store_version' is missing"):
        LandscapeStore.open(tmp_path / "other")
    store = LandscapeStore.create(tmp_path / "s", axes=[X], metrics=["loss"], tile_shape=(2,))
    meta = store.path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["landscapes_store_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="landscapes_store_version=99.*upgrade"):
        LandscapeStore.open(store.path)


def test_create_refuses_to_clobber(tmp_path, store2d):
    with pytest.raises(StoreError, match="already exists .* pass overwrite=True"):
        LandscapeStore.create(store2d.path, axes=[X], metrics=["loss"], tile_shape=(2,))
    (tmp_path / "data").mkdir()
    keep = tmp_path / "data" / "important.txt"
    keep.write_text("keep me")
    with pytest.raises(StoreError, match="not a landscape store, so it is never overwritten"):
        LandscapeStore.create(
            tmp_path / "data", axes=[X], metrics=["loss"], tile_shape=(2,), overwrite=True
        )
    assert keep.read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"metrics": ["loss", "x"]}, r"collide with dims", id="metric-named-like-dim"),
        pytest.param({"metrics": ["done"]}, r"collide", id="metric-named-done"),
        pytest.param({"metrics": []}, r"at least one metric", id="no-metrics"),
        pytest.param({"metrics": ["a/b"]}, r"'a/b' is not a valid name", id="bad-name"),
        pytest.param(
            {"dims": ("a",)}, r"dims=\('a',\) does not fit a grid with 2 axes", id="dims-length"
        ),
        pytest.param({"tile_shape": (2,)}, r"tile_shape=\(2,\) does not fit", id="tile-shape"),
        pytest.param(
            {"directions": np.zeros((3, 10), np.float32)},
            r"shape \(3, 10\); expected \(k, n\) with k=2",
            id="directions-k",
        ),
        pytest.param(
            {"directions": np.zeros((2, 10), np.int64)}, r"dtype int64", id="directions-dtype"
        ),
        pytest.param(
            {"attrs": {"obj": object()}},
            r"attrs\['obj'\]=.* not JSON-serializable",
            id="attrs-not-json",
        ),
        pytest.param(
            {"attrs": {"metrics": "x"}}, r"\['metrics'\] are reserved", id="attrs-reserved"
        ),
        pytest.param({"attrs": {"v": float("nan")}}, r"NaN or inf", id="attrs-nan"),
    ],
)
def test_create_errors(tmp_path, kwargs, match):
    args = {"axes": [X, Y], "metrics": ["loss"], "tile_shape": (2, 3), **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        LandscapeStore.create(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()


def test_update_attrs_errors(store2d):
    with pytest.raises(ConfigurationError, match=r"\['tile_shape'\] are fixed by the store"):
        store2d.update_attrs({"tile_shape": [1, 1]})
