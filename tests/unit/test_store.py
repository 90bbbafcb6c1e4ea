"""LandscapeStore: Zarr v3 layout, tile writes, done-mask, xarray view, errors, concurrency."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import pickle
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from landscapes.errors import ConfigurationError, IntegrityError, StoreError, StoreWriteError
from landscapes.grid import Tile, axis
from landscapes.store import DIRECTIONS_CHUNK_ELEMENTS, LandscapeStore, verify_store

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


# --------------------------------------------------------------------------- integrity
def _fill(store):
    """Write and mark done every tile; return the expected (loss, accuracy)."""
    for t in store.tiles():
        store.write_tile(t, {"loss": _block(t, 0.0), "accuracy": _block(t, 0.5)})
    store.mark_done(store.tiles())
    return store.read("loss"), store.read("accuracy")


def _truncate(f):
    f.write_bytes(f.read_bytes()[:7])


def _flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _rewrite(store, indices):
    tiles = {t.index: t for t in store.tiles()}
    for i in indices:
        t = tiles[i]
        store.write_tile(t, {"loss": _block(t, 0.0), "accuracy": _block(t, 0.5)})
    store.mark_done([tiles[i] for i in indices])


def test_write_tile_records_chunk_checksums(store2d):
    t = store2d.tiles()[4]
    record = store2d.write_tile(t, {"loss": _block(t, 0), "accuracy": _block(t, 1)})
    on_disk = json.loads((store2d.path / "integrity" / "tiles" / "1.1.json").read_text())
    assert record == on_disk and on_disk["tile"] == [1, 1]
    entry = on_disk["chunks"]["loss"]
    data = (store2d.path / "loss" / "c" / "1" / "1").read_bytes()
    assert entry == {
        "file": "loss/c/1/1",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert store2d.attrs["landscapes_integrity"]["algorithm"] == "sha256"
    # an all-NaN tile still gets a chunk file (and a record): NaN is a value, not "unwritten"
    nan = store2d.tiles()[0]
    store2d.write_tile(nan, {"loss": np.full(nan.shape, np.nan), "accuracy": np.zeros(nan.shape)})
    assert (store2d.path / "loss" / "c" / "0" / "0").is_file()
    store2d.mark_done([nan, t])
    report = store2d.verify()
    assert report.ok and report.records and report.tiles_done == 2
    assert report.summary()[0].endswith("ok (2/9 tiles done, checksums match)")


def test_verify_finds_and_repair_clears_damaged_chunks(store2d):
    loss, acc = _fill(store2d)
    assert store2d.verify().ok
    root = store2d.path
    (root / "loss" / "c" / "1" / "1").unlink()
    _truncate(root / "accuracy" / "c" / "0" / "2")
    _flip(root / "loss" / "c" / "2" / "0")
    (root / "integrity" / "tiles" / "2.2.json").unlink()

    report = store2d.verify()
    assert not report.ok and report.done_mask == "ok"
    assert report.damaged_tiles == [(0, 2), (1, 1), (2, 0), (2, 2)]
    found = {(d.tile, d.reason, d.file) for d in report.damaged}
    assert found == {
        ((1, 1), "missing chunk", "loss/c/1/1"),
        ((0, 2), "truncated chunk", "accuracy/c/0/2"),
        ((2, 0), "checksum mismatch", "loss/c/2/0"),
        ((2, 2), "done but no record", "integrity/tiles/2.2.json"),
    }
    text = "\n".join(report.summary())
    assert "DAMAGED: 4 damaged tile(s)" in text and "verify_store(" in text
    assert "tile (0, 2): truncated chunk: accuracy/c/0/2 (metric 'accuracy'): 7 bytes" in text
    assert store2d.is_complete()  # verify alone changes nothing

    repaired = store2d.verify(repair=True)
    assert repaired.repaired and repaired.tiles_done == 5
    assert [t.index for t in store2d.missing_tiles()] == [(0, 2), (1, 1), (2, 0), (2, 2)]
    assert not (root / "loss" / "c" / "2" / "0").exists()  # damaged chunks are deleted
    assert not (root / "accuracy" / "c" / "0" / "2").exists()
    assert store2d.verify().ok  # what is left is sound

    _rewrite(store2d, [t.index for t in store2d.missing_tiles()])
    np.testing.assert_array_equal(store2d.read("loss"), loss)
    np.testing.assert_array_equal(store2d.read("accuracy"), acc)
    assert store2d.verify().ok and store2d.is_complete()


def test_missing_done_mask_is_rebuilt_from_records(store2d):
    loss, acc = _fill(store2d)
    root = store2d.path
    (root / "done" / "c" / "0" / "0").unlink()  # nothing done: still a valid (empty) mask
    assert not store2d.done_mask().any()
    store2d.mark_done(store2d.tiles())
    _flip(root / "accuracy" / "c" / "0" / "1")
    (root / "integrity" / "tiles" / "1.0.json").unlink()  # written, record lost: not done
    shutil.rmtree(root / "done")

    with pytest.raises(
        IntegrityError, match=r"has no done mask \(the array 'done' is missing\)"
    ) as e:
        LandscapeStore.open(root)
    assert "verify_store(" in str(e.value) and "repair=True" in str(e.value)
    assert "Recreate it" not in str(e.value)  # the old, wrong advice
    with pytest.raises(IntegrityError, match="has no done mask"):
        store2d.done_mask()

    report = verify_store(root)
    assert report.done_mask == "missing" and not report.ok
    assert [(d.tile, d.reason) for d in report.damaged] == [((0, 1), "checksum mismatch")]
    repaired = verify_store(root, repair=True)
    assert "rebuilt the done mask from the checksum records: 7/9 tile(s) done" in repaired.notes[0]
    store = LandscapeStore.open(root)
    assert [t.index for t in store.missing_tiles()] == [(0, 1), (1, 0)]
    assert xr.open_zarr(root)["done"].dims == ("tile_x", "tile_y")  # consolidated again
    _rewrite(store, [(0, 1), (1, 0)])
    np.testing.assert_array_equal(store.read("loss"), loss)
    np.testing.assert_array_equal(store.read("accuracy"), acc)
    assert store.verify().ok


def test_undecodable_done_mask_is_named_and_rebuilt(store2d):
    _fill(store2d)
    _truncate(store2d.path / "done" / "c" / "0" / "0")
    store = LandscapeStore.open(store2d.path)
    with pytest.raises(IntegrityError, match=r"damaged done mask .*file done/c/0/0: RuntimeError"):
        store.missing_tiles()
    with pytest.raises(IntegrityError, match="damaged done mask"):
        store.mark_done([(0, 0)])
    assert "done mask unreadable" in repr(store)
    report = store.verify(repair=True)
    assert report.done_mask == "unreadable" and report.damaged == ()
    assert store.is_complete() and store.verify().ok


def test_undecodable_chunk_is_named_on_read(store2d):
    _fill(store2d)
    _truncate(store2d.path / "loss" / "c" / "1" / "2")
    with pytest.raises(
        IntegrityError, match=r"chunk file loss/c/1/2 \(metric 'loss', tile \(1, 2\)\)"
    ) as e:
        LandscapeStore.open(store2d.path, mode="r").read("loss")
    assert str(store2d.path) in str(e.value) and "Zstd" in str(e.value)
    np.testing.assert_array_equal(store2d.read("accuracy")[0, 0], 0.5)


def _make_older(store):
    """What a store written before checksum records looks like."""
    meta = store.path / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["landscapes_integrity"]
    doc.pop("consolidated_metadata", None)
    meta.write_text(json.dumps(doc))
    shutil.rmtree(store.path / "integrity")


def test_older_store_without_records(store2d):
    loss, acc = _fill(store2d)
    _make_older(store2d)
    old = LandscapeStore.open(store2d.path)
    np.testing.assert_array_equal(old.read("loss"), loss)
    report = old.verify()
    assert report.ok and not report.records
    assert "no checksum records (older store)" in report.summary()[1]
    (old.path / "loss" / "c" / "0" / "0").unlink()
    _truncate(old.path / "accuracy" / "c" / "2" / "1")
    report = old.verify()
    assert [(d.tile, d.reason, d.file) for d in report.damaged] == [
        ((0, 0), "missing chunk", "loss/c/0/0"),
        ((2, 1), "undecodable chunk", "accuracy/c/2/1"),
    ]
    old.verify(repair=True)
    assert [t.index for t in old.missing_tiles()] == [(0, 0), (2, 1)]
    assert old.write_tile((0, 0), {"loss": np.ones((2, 3)), "accuracy": np.ones((2, 3))}) is None
    assert not (old.path / "integrity").exists()  # an older store stays as it was
    shutil.rmtree(old.path / "done")
    repaired = verify_store(old.path, repair=True)
    assert "rebuilt the done mask empty (an older store" in repaired.notes[0]
    assert not LandscapeStore.open(old.path).done_mask().any()


def test_verify_errors(store2d):
    ro = LandscapeStore.open(store2d.path, mode="r")
    with pytest.raises(
        StoreError, match=r"verify: store .* read-only; open it with mode='r\+' to repair"
    ):
        ro.verify(repair=True)
    assert ro.verify().ok
    shutil.rmtree(store2d.path / "accuracy")
    with pytest.raises(StoreError, match=r"lacks .* \['accuracy'\]; .* cannot be repaired"):
        verify_store(store2d.path, repair=True)


def test_directions_in_store_are_checked(tmp_path):
    d = np.random.default_rng(1).standard_normal((2, 30)).astype(np.float32)
    store = LandscapeStore.create(
        tmp_path / "s", axes=[X, Y], metrics=["loss"], tile_shape=(2, 3), directions=d
    )
    np.testing.assert_array_equal(store.read_directions(), d)
    assert store.verify().ok
    (store.path / "directions" / "c" / "0" / "0").unlink()
    with pytest.raises(IntegrityError, match=r"lacks chunk file\(s\) \['directions/c/0/0'\]"):
        store.read_directions()
    report = store.verify()
    assert (
        not report.ok
        and "directions: chunk file(s) ['directions/c/0/0'] missing" in report.problems[0]
    )


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


async def _full_async(self, key, value):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_names_store_and_how_to_resume(store2d, monkeypatch):
    store2d.write_tile((0, 0), {"loss": np.ones((2, 3)), "accuracy": np.ones((2, 3))})
    store2d.mark_done([(0, 0)])
    monkeypatch.setattr(zarr.storage.LocalStore, "set", _full_async)
    with pytest.raises(StoreWriteError) as e:
        store2d.write_tile((0, 1), {"loss": np.ones((2, 3)), "accuracy": np.ones((2, 3))})
    msg = str(e.value)
    assert msg.startswith(
        f"write_tile: cannot write tile (0, 1) of {store2d.path}: [Errno 28 ENOSPC]"
    )
    assert "No space left on device" in msg and e.value.errno == errno.ENOSPC
    assert (
        "free space (or raise the quota) and re-run the same command to resume; finished tiles are kept."
        in msg
    )
    with pytest.raises(
        StoreWriteError,
        match=r"mark_done: cannot write the done mask of .*\[Errno 28 ENOSPC\].*free space",
    ):
        store2d.mark_done([(0, 1)])
    monkeypatch.undo()
    # the record is written by the tile's writer: a full disk there is reported the same way
    monkeypatch.setattr("landscapes.store.atomic_write_bytes", _full)
    with pytest.raises(StoreWriteError, match=r"write_tile: cannot write tile \(1, 1\).*ENOSPC"):
        store2d.write_tile((1, 1), {"loss": np.ones((2, 3)), "accuracy": np.ones((2, 3))})
    monkeypatch.undo()
    resumed = LandscapeStore.open(store2d.path)
    assert [t.index for t in resumed.missing_tiles()][:2] == [(0, 1), (0, 2)]
    assert resumed.verify().ok and resumed.read("loss")[0, 0] == 1.0


def test_workers_in_processes_record_checksums(tmp_path):
    store = LandscapeStore.create(
        tmp_path / "par",
        axes=[axis(-1, 1, 12), axis(-1, 1, 10)],
        metrics=METRICS,
        tile_shape=(3, 4),
    )
    tasks = [(t, {"loss": _block(t, 0.0), "accuracy": _block(t, 0.5)}) for t in store.tiles()]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        records = pool.starmap(store.write_tile, tasks, chunksize=1)
    store.mark_done(store.tiles())  # the driver alone marks done
    for t, record in zip(store.tiles(), records, strict=True):
        name = ".".join(map(str, t.index)) + ".json"
        assert json.loads((store.path / "integrity" / "tiles" / name).read_text()) == record
        for metric in METRICS:
            entry = record["chunks"][metric]
            assert (
                entry["sha256"]
                == hashlib.sha256((store.path / entry["file"]).read_bytes()).hexdigest()
            )
    report = store.verify()
    assert report.ok and report.tiles_done == 12
    assert not [p for p in (store.path / "integrity" / "tiles").iterdir() if p.name.startswith(".")]


def test_create_is_atomic_and_xarray_sees_no_foreign_files(tmp_path, store2d):
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not recognized as a component" from integrity/
        ds = xr.open_zarr(store2d.path, consolidated=False)
        assert set(ds.data_vars) == {"loss", "accuracy", "done"}
    with pytest.raises(ConfigurationError, match=r"metric name\(s\) \['integrity'\] collide"):
        LandscapeStore.create(tmp_path / "b", axes=[X], metrics=["integrity"], tile_shape=(2,))
    with pytest.raises(ConfigurationError, match=r"\['landscapes_integrity'\] are reserved"):
        LandscapeStore.create(
            tmp_path / "b",
            axes=[X],
            metrics=["loss"],
            tile_shape=(2,),
            attrs={"landscapes_integrity": 1},
        )
