"""Locks, atomic publication, and directions stores that are verified on every load."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import shutil
import threading
import time

import numpy as np
import pytest
import zarr

import landscapes.directions_store as ds
from landscapes.directions_store import load_directions, save_directions, verify_directions
from landscapes.errors import (
    ConfigurationError,
    IntegrityError,
    LockTimeoutError,
    StoreError,
    StoreWriteError,
)
from landscapes.integrity import (
    atomic_directory,
    atomic_write_bytes,
    file_lock,
    lock_path,
    sha256_file,
    write_error,
)

ATTRS = {"kind": "random", "seeds": [0, 1], "normalization": "filter"}


def _dirs(k: int = 2, n: int = 2500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


@pytest.fixture
def small_chunks(monkeypatch):
    """1000 parameters per chunk, so a (2, 2500) array has 3 chunks per direction."""
    monkeypatch.setattr(ds, "DIRECTIONS_CHUNK", 1000)


@pytest.fixture
def saved(tmp_path, small_chunks):
    flat = _dirs()
    path = tmp_path / "directions.zarr"
    record = save_directions(path, flat, ATTRS)
    return path, flat, record


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- locks
def test_lock_excludes_other_holders_and_times_out(tmp_path):
    target = tmp_path / "out.zarr"
    held, release = threading.Event(), threading.Event()

    def holder():
        with file_lock(target):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    waited = []
    try:
        with pytest.raises(LockTimeoutError, match=r"out\.zarr\.lock of .*out\.zarr for more than"):
            with file_lock(target, timeout=0.1, on_wait=lambda: waited.append(1)):
                pass
        assert waited == [1]
    finally:
        release.set()
        t.join()
    with file_lock(target, timeout=1):  # free again
        pass
    assert lock_path(target) == tmp_path / "out.zarr.lock" and lock_path(target).exists()


def test_lock_reentrant_in_one_thread(tmp_path):
    target = tmp_path / "out"
    with file_lock(target):
        with file_lock(target):  # exclusive inside exclusive: no deadlock
            with file_lock(target, shared=True):
                pass
    with file_lock(target, shared=True):
        with file_lock(target, shared=True):
            pass
        with pytest.raises(StoreError, match="holds a shared lock .* release the shared lock"):
            with file_lock(target):
                pass


def test_shared_locks_coexist(tmp_path):
    target = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    def reader():
        with file_lock(target, shared=True):
            held.set()
            release.wait(5)

    t = threading.Thread(target=reader)
    t.start()
    held.wait(5)
    try:
        with file_lock(target, shared=True, timeout=0.5):
            pass
        with pytest.raises(LockTimeoutError):
            with file_lock(target, timeout=0.1):
                pass
    finally:
        release.set()
        t.join()


# --------------------------------------------------------------------------- atomic writes
def test_atomic_directory_publishes_or_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(dest) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("boom")
    assert not dest.exists() and _leftovers(tmp_path) == []
    with atomic_directory(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a").write_text("one")
    assert (dest / "a").read_text() == "one"
    with pytest.raises(StoreError, match="already exists and is not empty; delete it"):
        with atomic_directory(dest) as tmp:
            (tmp / "a").write_text("two")
    assert (dest / "a").read_text() == "one" and _leftovers(tmp_path) == []
    with atomic_directory(dest, replace=True) as tmp:
        (tmp / "b").write_text("two")
    assert sorted(p.name for p in dest.iterdir()) == ["b"] and _leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="a file is there"):
        with atomic_directory(tmp_path / "file"):
            pass


def test_atomic_write_bytes_and_sha256(tmp_path):
    f = tmp_path / "r.json"
    atomic_write_bytes(f, b"abc")
    atomic_write_bytes(f, b"hello", fsync=True)
    assert f.read_bytes() == b"hello" and _leftovers(tmp_path) == []
    assert sha256_file(f) == (5, hashlib.sha256(b"hello").hexdigest())


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        pytest.param(errno.ENOSPC, "free space", id="enospc"),
        pytest.param(errno.EDQUOT, "free space", id="edquot"),
        pytest.param(errno.EROFS, "make the store writable", id="erofs"),
        pytest.param(errno.EIO, "fix the cause", id="eio"),
    ],
)
def test_write_error_message(code, fix):
    err = write_error(OSError(code, "ignored", "/s/loss/c/0/0"), "/s", "write_tile: cannot write")
    assert isinstance(err, StoreError) and err.errno == code
    msg = str(err)
    assert msg.startswith("write_tile: cannot write of /s: [Errno")
    assert errno.errorcode[code] in msg and "(/s/loss/c/0/0)" in msg
    assert f"{fix}" in msg and "re-run the same command to resume; finished tiles are kept." in msg


# --------------------------------------------------------------------------- directions
def test_save_load_round_trip_with_manifest(saved):
    path, flat, record = saved
    back, attrs = load_directions(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, flat)
    assert attrs == ATTRS
    arr = zarr.open_array(str(path), mode="r")
    assert arr.chunks == (1, 1000) and arr.metadata.dimension_names == ("direction", "parameter")
    manifest = dict(arr.attrs)["landscapes_directions"]
    assert manifest["shape"] == [2, 2500] and manifest["dtype"] == "float32"
    # the chunk digests are of the values: anyone can recompute them with hashlib
    assert manifest["chunk_sha256"][1][2] == hashlib.sha256(flat[1, 2000:].tobytes()).hexdigest()
    norms = np.linalg.norm(flat.astype(np.float64), axis=1)
    np.testing.assert_allclose(record.norms, norms, rtol=1e-12)
    assert record.written and record.shape == (2, 2500) and record.chunk == 1000
    assert verify_directions(path).sha256 == record.sha256
    assert sorted(p.name for p in path.iterdir()) == ["c", "zarr.json"]
    assert _leftovers(path.parent) == []


def test_save_keeps_identical_and_refuses_other(saved):
    path, flat, record = saved
    mtime = (path / "zarr.json").stat().st_mtime_ns
    again = save_directions(path, flat.copy(), dict(ATTRS))
    assert not again.written and again.sha256 == record.sha256
    assert (path / "zarr.json").stat().st_mtime_ns == mtime
    other = _dirs(seed=1)
    with pytest.raises(StoreError, match=r"already holds other directions .* own directory"):
        save_directions(path, other, ATTRS)
    with pytest.raises(StoreError, match="already holds other directions"):
        save_directions(path, flat, {**ATTRS, "seeds": [5, 6]})
    np.testing.assert_array_equal(load_directions(path)[0], flat)
    assert save_directions(path, other, ATTRS, on_conflict="replace").written
    np.testing.assert_array_equal(load_directions(path)[0], other)
    assert _leftovers(path.parent) == []


def _delete_chunk_dir(path):
    shutil.rmtree(path / "c")


def _delete_one_chunk(path):
    (path / "c" / "1" / "2").unlink()


def _truncate_chunk(path):
    f = path / "c" / "0" / "1"
    f.write_bytes(f.read_bytes()[:10])


def _flip_bytes(path):
    f = path / "c" / "1" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _zero_a_row(path):
    arr = zarr.open_array(str(path), mode="r+")
    arr[0, :] = np.zeros(arr.shape[1], dtype=arr.dtype)


def _drop_manifest(path):
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["landscapes_directions"]
    meta.write_text(json.dumps(doc))


def _only_metadata(path):  # what the racing jobs saw: zarr.json and no chunk at all
    shutil.rmtree(path / "c")


def _delete_metadata(path):
    (path / "zarr.json").unlink()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        pytest.param(_delete_chunk_dir, r"lacks 6 of 6 chunk file\(s\) \(c/0/0, ", id="no-chunks"),
        pytest.param(_delete_one_chunk, r"lacks 1 of 6 chunk file\(s\) \(c/1/2\)", id="one-chunk"),
        pytest.param(_truncate_chunk, r"damaged: c/0/1: undecodable", id="truncated"),
        pytest.param(_flip_bytes, r"c/1/0: (undecodable|checksum mismatch)", id="flipped"),
        pytest.param(_zero_a_row, r"c/0/0: checksum mismatch", id="zeroed-row"),
        pytest.param(_drop_manifest, r"no integrity manifest .* older version", id="no-manifest"),
        pytest.param(_delete_metadata, r"has no zarr.json", id="no-metadata"),
    ],
)
def test_load_directions_refuses_damage(saved, damage, match):
    path, flat, _ = saved
    damage(path)
    with pytest.raises(IntegrityError, match=match) as info:
        load_directions(path)
    msg = str(info.value)
    assert str(path) in msg and "re-run; the directions stage makes them again" in msg
    # the next save finds the damage and publishes a sound store in its place
    assert save_directions(path, flat, ATTRS).written
    np.testing.assert_array_equal(load_directions(path)[0], flat)


def test_missing_chunk_never_reads_as_zero(saved):
    path, _, _ = saved
    _delete_one_chunk(path)
    raw = zarr.open_array(str(path), mode="r")[1, 2000:]  # a reader that skips the checks
    assert np.isnan(raw).all()


@pytest.mark.parametrize(
    ("flat", "match"),
    [
        pytest.param(np.zeros((2, 5), np.float32), "direction 0 is all zeros", id="zero-row"),
        pytest.param(
            np.array([[1.0, np.nan], [1.0, 1.0]], np.float32), "direction 0 holds 1 NaN", id="nan"
        ),
        pytest.param(np.ones(5, np.float32), r"shape \(5,\); pass a \(k, n\)", id="1-d"),
        pytest.param(np.ones((2, 5), np.int32), "dtype int32; pass float32", id="int"),
    ],
)
def test_save_directions_refuses_bad_arrays(tmp_path, flat, match):
    with pytest.raises(ConfigurationError, match=match):
        save_directions(tmp_path / "d.zarr", flat, ATTRS)
    assert not (tmp_path / "d.zarr").exists()


def test_save_directions_bad_attrs_and_paths(tmp_path):
    flat = _dirs(n=10)
    with pytest.raises(ConfigurationError, match="'landscapes_directions' is reserved"):
        save_directions(tmp_path / "d", flat, {"landscapes_directions": 1})
    with pytest.raises(ConfigurationError, match="NaN or inf"):
        save_directions(tmp_path / "d", flat, {"cosine": float("nan")})
    with pytest.raises(ConfigurationError, match="on_conflict='x'"):
        save_directions(tmp_path / "d", flat, on_conflict="x")
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"holds \['keep.txt'\], so it is not a directions store"):
        save_directions(other, flat)
    assert (other / "keep.txt").read_text() == "mine"
    with pytest.raises(StoreError, match="no directions store at .*nope: the path does not exist"):
        load_directions(tmp_path / "nope")


def test_save_directions_disk_full_leaves_destination_unchanged(saved, monkeypatch):
    path, flat, _ = saved

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full)
    with pytest.raises(
        StoreWriteError, match=r"of .*directions\.zarr: \[Errno 28 ENOSPC\]"
    ) as info:
        save_directions(path, _dirs(seed=3), ATTRS, on_conflict="replace")
    assert info.value.errno == errno.ENOSPC and "free space" in str(info.value)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_directions(path)[0], flat)
    assert _leftovers(path.parent) == []


def _race(args):
    """One racing job: wait for the common start, save, then load what is there."""
    path, start_at, seed = args
    flat = np.random.default_rng(seed).standard_normal((2, 300_000)).astype(np.float32)
    while time.time() < start_at:
        pass
    record = save_directions(path, flat, {"seed": seed})
    back, attrs = load_directions(path)
    return record.written, hashlib.sha256(back.tobytes()).hexdigest(), attrs


def test_concurrent_saves_of_the_same_directions(tmp_path):
    expected = hashlib.sha256(
        np.random.default_rng(7).standard_normal((2, 300_000)).astype(np.float32).tobytes()
    ).hexdigest()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pool.map(time.sleep, [0.0] * 4)  # start all four before timing the race
        for rep in range(5):
            path = str(tmp_path / f"run{rep}" / "directions.zarr")
            start_at = time.time() + 0.3
            results = pool.map(_race, [(path, start_at, 7)] * 4, chunksize=1)
            assert sum(written for written, _, _ in results) == 1  # one writer, three keepers
            assert {digest for _, digest, _ in results} == {expected}
            assert all(attrs == {"seed": 7} for _, _, attrs in results)
            assert _leftovers(tmp_path / f"run{rep}") == []
