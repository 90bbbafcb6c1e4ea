"""A ``(k, n)`` directions array on disk: written once, atomically, and verified on every load.

Layout of a directions store at ``path`` (a Zarr format 3 *array*)::

    zarr.json     shape (k, n), float32 or float64, chunks (1, min(n, 2**20)),
                  dimension_names ("direction", "parameter"), fill value NaN;
                  attributes = the caller's provenance + ``landscapes_directions`` (the manifest)
    c/<r>/<j>     chunk j of direction r (every chunk is written, even an all-zero one)

The manifest (attribute ``landscapes_directions``)::

    {"format": 1, "shape": [k, n], "dtype": "float32", "chunks": [1, c],
     "algorithm": "sha256",
     "chunk_sha256": [[<hex>, ...], ...],   # per direction, per chunk: SHA-256 of the chunk's
                                            # values as little-endian C-order bytes
     "sha256": <hex>,                       # SHA-256 of "k,n,dtype:" + the chunk digests, ","-joined
     "norms": [<float>, ...]}               # Euclidean norm of each direction (float64 sums)

The digests cover decoded values, not the compressed files: loading reads every value anyway,
and a value digest stays valid if the codec changes. A missing chunk would read as the fill
value; it is reported by name before any value is used, and the fill value is NaN, so even a
reader that skips the checks never gets a silent zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from landscapes._json import jsonable
from landscapes.errors import ConfigurationError, IntegrityError, StoreError
from landscapes.integrity import atomic_directory, file_lock, remove_leftovers, write_error

__all__ = [
    "DIRECTIONS_CHUNK",
    "DirectionsRecord",
    "load_directions",
    "save_directions",
    "verify_directions",
]

DIRECTIONS_CHUNK = 1 << 20
"""Parameters per chunk of a saved directions array (one direction per chunk row)."""

MANIFEST_KEY = "landscapes_directions"
_FORMAT = 1
_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class DirectionsRecord:
    """What a directions store holds, as its manifest records it (and its check confirmed).

    Attributes:
        path: the store.
        shape: ``(k, n)``.
        dtype: ``"float32"`` or ``"float64"``.
        chunk: parameters per chunk.
        sha256: digest of the whole array (see the module docstring).
        chunk_sha256: per direction, per chunk, the digest of its values.
        norms: Euclidean norm of each direction.
        attrs: the caller's attributes (provenance), without the manifest.
        written: True when this call wrote the store, False when an identical one was kept.
    """

    path: Path
    shape: tuple[int, int]
    dtype: str
    chunk: int
    sha256: str
    chunk_sha256: tuple[tuple[str, ...], ...]
    norms: tuple[float, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    written: bool = False


def _fix(path: Path) -> str:
    return f"delete {path} and re-run; the directions stage makes them again"


def _manifest(flat: np.ndarray, chunk: int) -> dict[str, Any]:
    k, n = flat.shape
    le = flat.dtype.newbyteorder("<")
    digests: list[list[str]] = []
    norms: list[float] = []
    for r in range(k):
        row_digests = []
        sq = 0.0
        for a in range(0, n, chunk):
            block = np.ascontiguousarray(flat[r, a : a + chunk], dtype=le)
            row_digests.append(hashlib.sha256(memoryview(block).cast("B")).hexdigest())
            sq += float(np.square(block, dtype=np.float64).sum())
        digests.append(row_digests)
        norms.append(math.sqrt(sq))
    return {
        "format": _FORMAT,
        "shape": [k, n],
        "dtype": str(flat.dtype),
        "chunks": [1, chunk],
        "algorithm": "sha256",
        "chunk_sha256": digests,
        "sha256": _root_digest(k, n, str(flat.dtype), digests),
        "norms": norms,
    }


def _root_digest(k: int, n: int, dtype: str, digests: list[list[str]]) -> str:
    text = f"{k},{n},{dtype}:" + ",".join(d for row in digests for d in row)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_flat(flat: Any) -> np.ndarray:
    arr = np.asarray(flat)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ConfigurationError(
            f"save_directions: flat has shape {arr.shape}; pass a (k, n) array: one row per "
            "direction, one column per parameter."
        )
    if arr.dtype.name not in _DTYPES:
        raise ConfigurationError(
            f"save_directions: flat has dtype {arr.dtype}; pass float32 (or float64)."
        )
    for r in range(arr.shape[0]):
        row = arr[r]
        if not np.isfinite(row).all():
            bad = int(np.size(row) - np.count_nonzero(np.isfinite(row)))
            raise ConfigurationError(
                f"save_directions: direction {r} holds {bad} NaN/inf value(s); a landscape along "
                "it would be meaningless. Check the model's parameters and the normalization."
            )
        if not np.any(row):
            raise ConfigurationError(
                f"save_directions: direction {r} is all zeros (norm 0), so a landscape along it "
                "would be flat. Check the directions' source (two identical checkpoints? every "
                "parameter ignored?)."
            )
    return arr


def _user_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    out = jsonable(dict(attrs or {}), "attrs")
    if MANIFEST_KEY in out:
        raise ConfigurationError(
            f"save_directions: attrs key {MANIFEST_KEY!r} is reserved for the manifest; rename it."
        )
    try:
        return json.loads(json.dumps(out, allow_nan=False))
    except ValueError as exc:
        raise ConfigurationError(
            f"save_directions: attrs hold NaN or inf ({exc}); JSON attributes cannot; store them "
            "as strings or None."
        ) from exc


def save_directions(
    path: str | os.PathLike,
    flat: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
    *,
    on_conflict: Literal["raise", "replace"] = "raise",
) -> DirectionsRecord:
    """Write a ``(k, n)`` directions array atomically, under a lock, with its manifest.

    Several processes may call this at once for the same path: the first writes the store
    to a temporary sibling and renames it into place; the others find it complete and equal to
    theirs and keep it. A store that fails its check (missing or altered chunks, no manifest)
    is replaced; a complete store holding other values (or other attrs) is a conflict.

    Args:
        path: the store directory (e.g. ``.../directions.zarr``).
        flat: ``(k, n)`` float32 (or float64) array, finite, no all-zero row.
        attrs: JSON-able provenance stored with it (seeds, normalization, ...).
        on_conflict: ``"raise"`` when ``path`` holds other complete directions, or
            ``"replace"`` them.

    Returns:
        The record of the stored array (``written`` says whether this call wrote it).

    Raises:
        ConfigurationError: a bad shape, dtype, a NaN/inf value, an all-zero direction, or
            attrs that are not JSON.
        StoreError: ``path`` holds other directions (``on_conflict="raise"``), or is not a
            directions store (never overwritten).
        StoreWriteError: the file system refused the write (disk full, ...); ``path`` is
            unchanged.

    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> rec = save_directions(f"{d}/dirs.zarr", np.ones((2, 3), np.float32), {"seed": 0})
    >>> load_directions(f"{d}/dirs.zarr")[0].tolist(), rec.norms[0] == 3 ** 0.5
    ([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], True)
    """
    if on_conflict not in ("raise", "replace"):
        raise ConfigurationError(
            f"save_directions: on_conflict={on_conflict!r}; choose 'raise' or 'replace'."
        )
    p = Path(os.fspath(path)).absolute()
    arr = _check_flat(flat)
    user = _user_attrs(attrs)
    chunk = min(arr.shape[1], DIRECTIONS_CHUNK)
    manifest = _manifest(arr, chunk)
    with file_lock(p):
        remove_leftovers(p)
        if p.exists():
            existing = _existing(p)
            if existing is not None:
                if existing.sha256 == manifest["sha256"] and existing.attrs == user:
                    return existing
                if on_conflict == "raise":
                    raise StoreError(
                        f"save_directions: {p} already holds other directions (sha256 "
                        f"{existing.sha256[:12]}…, shape {existing.shape}; these: "
                        f"{manifest['sha256'][:12]}…, shape {arr.shape}) or other attrs; another "
                        "run with other settings writes to the same path. Give this run its own "
                        f"directory, or delete {p} (or pass on_conflict='replace')."
                    )
        try:
            with atomic_directory(p, replace=True) as tmp:
                _write(tmp, arr, chunk, {**user, MANIFEST_KEY: manifest})
        except OSError as err:  # a full disk, a read-only folder: named, and nothing half-written is left
            raise write_error(err, p, "save_directions: cannot write the directions",
                              kept="nothing was left half-written") from err
    return _record(p, manifest, user, written=True)


def _existing(p: Path) -> DirectionsRecord | None:
    """The record of a sound store at ``p``; None when it is damaged (and may be replaced)."""
    if not p.is_dir():
        raise StoreError(
            f"save_directions: {p} is a file, not a directions store; it is never overwritten. "
            "Choose another path or remove it."
        )
    foreign = sorted(
        e.name
        for e in p.iterdir()
        if e.name not in ("zarr.json", "c") and not e.name.endswith(".partial")
    )
    if foreign:
        raise StoreError(
            f"save_directions: {p} holds {foreign[:5]}, so it is not a directions store and is "
            "never overwritten; choose another path or empty it."
        )
    try:
        return verify_directions(p)
    except IntegrityError:
        return None


def _write(tmp: Path, arr: np.ndarray, chunk: int, attributes: dict[str, Any]) -> None:
    import zarr

    z = zarr.create_array(
        store=str(tmp),
        shape=arr.shape,
        dtype=arr.dtype.name,
        chunks=(1, chunk),
        dimension_names=("direction", "parameter"),
        fill_value=np.nan,
        attributes=attributes,
        zarr_format=3,
        config={"write_empty_chunks": True},
    )
    z[...] = arr
    missing = [key for key in _chunk_keys(z, arr.shape, chunk) if not (tmp / key).is_file()]
    if missing:  # write_empty_chunks=True writes them all; never publish a store without them
        raise StoreError(
            f"save_directions: zarr did not write chunk(s) {missing[:5]} of {tmp}; nothing was "
            "published. Re-run; if it repeats, report it with the zarr version."
        )


def _chunk_keys(z: Any, shape: tuple[int, int], chunk: int) -> list[str]:
    k, n = shape
    return [
        z.metadata.encode_chunk_key((r, j)) for r in range(k) for j in range(math.ceil(n / chunk))
    ]


def _record(p: Path, manifest: dict[str, Any], user: dict[str, Any], *, written: bool):
    return DirectionsRecord(
        path=p,
        shape=(int(manifest["shape"][0]), int(manifest["shape"][1])),
        dtype=str(manifest["dtype"]),
        chunk=int(manifest["chunks"][1]),
        sha256=str(manifest["sha256"]),
        chunk_sha256=tuple(tuple(row) for row in manifest["chunk_sha256"]),
        norms=tuple(float(x) for x in manifest["norms"]),
        attrs=user,
        written=written,
    )


def load_directions(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a directions store after checking it completely (see :func:`verify_directions`).

    Args:
        path: a store written by :func:`save_directions`.

    Returns:
        ``(flat, attrs)``: the ``(k, n)`` array and the caller's attributes (no manifest).

    Raises:
        StoreError: no store at ``path``.
        IntegrityError: a chunk is missing, truncated, undecodable or altered; a direction is
            not finite or all zeros; the manifest is missing. The message names the file and
            the fix (delete the store and re-run the directions stage).
    """
    flat, record = _load(Path(os.fspath(path)).absolute())
    return flat, dict(record.attrs)


def verify_directions(path: str | os.PathLike) -> DirectionsRecord:
    """Check a directions store completely (every chunk read and digested); return its record.

    Raises:
        StoreError, IntegrityError: as :func:`load_directions`.
    """
    return _load(Path(os.fspath(path)).absolute())[1]


def _load(p: Path) -> tuple[np.ndarray, DirectionsRecord]:
    if not p.parent.is_dir():
        return _load_unlocked(p)  # raises: no store there (and no lock file made)
    with contextlib.ExitStack() as stack:
        try:  # readers wait while a writer publishes
            stack.enter_context(file_lock(p, shared=True))
        except OSError:  # a read-only copy: nobody writes it, nothing to wait for
            pass
        return _load_unlocked(p)


def _load_unlocked(p: Path) -> tuple[np.ndarray, DirectionsRecord]:
    import zarr

    if not p.exists():
        raise StoreError(
            f"no directions store at {p}: the path does not exist; run the directions stage "
            "(or save_directions) first."
        )
    meta_path = p / "zarr.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise IntegrityError(
            f"directions store {p} has no zarr.json (it was not finished, or was damaged); "
            f"{_fix(p)}."
        ) from None
    except (OSError, ValueError) as exc:
        raise IntegrityError(
            f"directions store {p}: {meta_path} is unreadable ({exc}); {_fix(p)}."
        ) from exc
    attrs = meta.get("attributes") or {}
    manifest = attrs.get(MANIFEST_KEY)
    if meta.get("node_type") != "array" or not isinstance(manifest, dict):
        raise IntegrityError(
            f"directions store {p} has no integrity manifest ('{MANIFEST_KEY}' attribute): it "
            "was written by an older version of landscapes or not finished, so its content "
            f"cannot be trusted; {_fix(p)}."
        )
    user = {k: v for k, v in attrs.items() if k != MANIFEST_KEY}
    try:
        k, n = (int(x) for x in manifest["shape"])
        chunk = int(manifest["chunks"][1])
        dtype = str(manifest["dtype"])
        digests = [list(row) for row in manifest["chunk_sha256"]]
        record = _record(p, manifest, user, written=False)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise IntegrityError(
            f"directions store {p} has a malformed manifest ({type(exc).__name__}: {exc}); "
            f"{_fix(p)}."
        ) from exc
    try:
        z = zarr.open_array(str(p), mode="r", zarr_format=3)
    except Exception as exc:  # noqa: BLE001 - any failure here means damaged metadata
        raise IntegrityError(
            f"directions store {p}: its metadata cannot be opened ({type(exc).__name__}: {exc}); "
            f"{_fix(p)}."
        ) from exc
    if (
        tuple(z.shape) != (k, n)
        or str(z.dtype) != dtype
        or tuple(z.chunks) != (1, chunk)
        or len(digests) != k
        or any(len(row) != math.ceil(n / chunk) for row in digests)
    ):
        raise IntegrityError(
            f"directions store {p}: its array (shape {tuple(z.shape)}, dtype {z.dtype}, chunks "
            f"{tuple(z.chunks)}) does not match its manifest (shape {(k, n)}, dtype {dtype}, "
            f"chunks {(1, chunk)}); {_fix(p)}."
        )
    keys = _chunk_keys(z, (k, n), chunk)
    missing = [key for key in keys if not (p / key).is_file()]
    if missing:
        raise IntegrityError(
            f"directions store {p} lacks {len(missing)} of {len(keys)} chunk file(s) "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); they would read "
            f"as NaN. {_fix(p).capitalize()}."
        )
    out = np.empty((k, n), dtype=dtype)
    problems = []
    le = out.dtype.newbyteorder("<")
    for r in range(k):
        for j, a in enumerate(range(0, n, chunk)):
            key = z.metadata.encode_chunk_key((r, j))
            try:
                block = np.asarray(z[r, a : a + chunk])
            except Exception as exc:  # noqa: BLE001 - codec errors come in many types
                problems.append(f"{key}: undecodable ({type(exc).__name__}: {exc})")
                continue
            out[r, a : a + chunk] = block
            got = hashlib.sha256(
                memoryview(np.ascontiguousarray(block, dtype=le)).cast("B")
            ).hexdigest()
            if got != digests[r][j]:
                problems.append(f"{key}: checksum mismatch (the values were altered)")
    if problems:
        raise IntegrityError(
            f"directions store {p} is damaged: {'; '.join(problems[:5])}"
            f"{'; ...' if len(problems) > 5 else ''}. {_fix(p).capitalize()}."
        )
    for r in range(k):
        finite = bool(np.isfinite(out[r]).all())
        if not finite or not np.any(out[r]):
            what = "all zeros (norm 0)" if finite else "not finite"
            raise IntegrityError(f"directions store {p}: direction {r} is {what}; {_fix(p)}.")
    return out, record
