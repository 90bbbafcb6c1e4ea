"""Zarr (format 3) layout of one landscape: metric arrays, coordinates, directions, done-mask.

Layout of a store at ``path``::

    zarr.json              root group; attrs = provenance + landscapes_store_version,
                           tile_shape, metrics, dims (plus consolidated metadata)
    <dim>                  one float64 coordinate array per axis, dims (<dim>,)
    <metric>               float64, shape = grid shape, chunks = tile_shape, fill NaN, dims = dims
    done                   bool, one element per tile, dims ("tile_<dim>", ...); driver-only
    directions             optional, (k, n) float, chunked along n, dims ("direction", "parameter");
                           fill NaN, attribute ``landscapes_directions`` = its manifest (digests)
    integrity/             a Zarr group (attrs describe the records) holding
      tiles/<i>.<j>.json   one checksum record per written tile (written by the tile's writer)

One tile is exactly one chunk of every metric array, so workers in different processes can
write different tiles at once. Completion lives only in ``done``: NaN and inf are legitimate
metric values, and a chunk that exists is not a finished tile.

Integrity. :meth:`LandscapeStore.write_tile` writes every chunk of the tile (even an all-NaN
one), then reads each chunk file back and records its size and SHA-256 in the tile's record,
written atomically (temporary name, then rename) by the process that wrote the tile: one file
per tile, so workers in several processes never write the same file, and the driver's
:meth:`~LandscapeStore.mark_done` is unchanged. A record is a claim, checked before reuse by
:meth:`LandscapeStore.verify` (sizes and digests of the chunk files, no decoding, no
recomputation); ``verify(repair=True)`` clears the done flag of damaged tiles (and deletes their
damaged chunks) so that a resume recomputes exactly those, and rebuilds a missing or unreadable
``done`` mask from the records. Digests are of the encoded chunk files rather than of the
values, so a check needs no codec, and a matching digest proves the file is byte for byte
what the writer produced (so it also decodes). Record format::

    {"format": 1, "tile": [i, j],
     "chunks": {"<metric>": {"file": "<metric>/c/<i>/<j>", "bytes": <int>, "sha256": <hex>}, ...}}

Stores written before records existed (no root attribute ``landscapes_integrity``) open and
read as before; ``verify`` checks their done tiles' chunks for presence and decoding only.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from landscapes._json import jsonable as _jsonable
from landscapes.errors import ConfigurationError, IntegrityError, StoreError
from landscapes.grid import Grid, Tile
from landscapes.integrity import (
    atomic_directory,
    atomic_write_bytes,
    sha256_file,
    write_error,
)

if TYPE_CHECKING:
    import xarray
    import zarr

__all__ = [
    "DIRECTIONS_CHUNK_ELEMENTS",
    "INTEGRITY_ATTR",
    "LandscapeStore",
    "STORE_VERSION",
    "TileDamage",
    "VerifyReport",
    "verify_store",
]

STORE_VERSION = 1
"""Layout version written to the root attribute ``landscapes_store_version``."""

DIRECTIONS_CHUNK_ELEMENTS = 1 << 20
"""Parameters per chunk of the ``directions`` array (all k directions share a chunk)."""

INTEGRITY_ATTR = "landscapes_integrity"
"""Root attribute of stores that keep per-tile checksum records (absent in older stores)."""

_INTEGRITY = {
    "format": 1,
    "algorithm": "sha256",
    "of": "encoded chunk files",
    "records": "integrity/tiles",
}
_RECORDS_DIR = ("integrity", "tiles")
_DEFAULT_DIMS = {1: ("x",), 2: ("x", "y"), 3: ("x", "y", "z")}
_RESERVED_NAMES = ("done", "directions", "integrity")
_RESERVED_ATTRS = ("landscapes_store_version", "tile_shape", "metrics", "dims")
_LAYOUT_ATTRS = (*_RESERVED_ATTRS, INTEGRITY_ATTR)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


Reason = Literal[
    "missing chunk",
    "truncated chunk",
    "size mismatch",
    "checksum mismatch",
    "undecodable chunk",
    "done but no record",
    "unreadable record",
]


@dataclass(frozen=True)
class TileDamage:
    """One problem found by :meth:`LandscapeStore.verify` in one tile.

    Attributes:
        tile: the tile's index in the tile grid.
        reason: what is wrong (``"missing chunk"``, ``"truncated chunk"``, ``"size mismatch"``,
            ``"checksum mismatch"``, ``"undecodable chunk"``, ``"done but no record"``,
            ``"unreadable record"``).
        file: the damaged (or missing) file, relative to the store.
        metric: the metric whose chunk it is (None for a record).
        detail: sizes, digests or the decoder's message.
    """

    tile: tuple[int, ...]
    reason: Reason
    file: str
    metric: str | None = None
    detail: str = ""

    def line(self) -> str:
        """``tile (i, j): <reason>: <file> (metric 'm'): <detail>``."""
        metric = f" (metric {self.metric!r})" if self.metric else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"tile {self.tile}: {self.reason}: {self.file}{metric}{detail}"


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`LandscapeStore.verify` found (and repaired).

    Attributes:
        path: the store.
        records: True when the store keeps per-tile checksum records; False for a store
            written before them (its chunks are checked for presence and decoding only).
        done_mask: the ``done`` mask as found: ``"ok"``, ``"missing"`` or ``"unreadable"``.
        tiles: number of tiles of the grid.
        tiles_done: tiles marked done (after the repair, when repairing).
        damaged: every problem found, tile by tile.
        problems: damage that a repair cannot fix (the store's directions).
        repaired: True when ``repair=True`` acted on the findings.
        notes: what the repair did, and other remarks.
    """

    path: Path
    records: bool
    done_mask: Literal["ok", "missing", "unreadable"]
    tiles: int
    tiles_done: int
    damaged: tuple[TileDamage, ...] = ()
    problems: tuple[str, ...] = ()
    repaired: bool = False
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is damaged and the done mask was readable."""
        return not self.damaged and not self.problems and self.done_mask == "ok"

    @property
    def damaged_tiles(self) -> list[tuple[int, ...]]:
        """Indices of the damaged tiles, sorted, each once."""
        return sorted({d.tile for d in self.damaged})

    def summary(self) -> list[str]:
        """Human-readable lines: the verdict, then one line per problem and per note."""
        head = f"landscape store {self.path}: "
        if self.ok:
            head += f"ok ({self.tiles_done}/{self.tiles} tiles done"
            head += ", checksums match)" if self.records else ")"
        else:
            n = len(self.damaged_tiles)
            parts = [f"{n} damaged tile(s)"] if n else []
            if self.done_mask != "ok":
                parts.append(f"done mask {self.done_mask}")
            if self.problems:
                parts.append(f"{len(self.problems)} problem(s) a repair cannot fix")
            head += "DAMAGED: " + ", ".join(parts)
            head += " (repaired)" if self.repaired else ""
        lines = [head]
        if not self.records:
            lines.append(
                "no checksum records (older store): done tiles' chunks were checked for "
                "presence and decoding only"
            )
        lines += ["  " + d.line() for d in self.damaged]
        lines += ["  " + p for p in self.problems]
        lines += self.notes
        if not self.ok and not self.repaired:
            lines.append(
                f"repair: landscapes.verify_store({str(self.path)!r}, repair=True) clears the "
                "damaged tiles (and rebuilds the done mask); re-running the same command then "
                "recomputes exactly those tiles."
            )
        return lines


def _import_zarr():
    import zarr

    return zarr


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"{what}={name!r} is not a valid name; use letters, digits, '_', '.' or '-', "
            "starting with a letter or '_'."
        )
    return name


class LandscapeStore:
    """One landscape on disk as a Zarr (format 3) group that ``xarray.open_zarr`` opens.

    Create it once on the driver with :meth:`create`, open it anywhere with :meth:`open`,
    write tiles from any process with :meth:`write_tile`, and record completion on the driver
    with :meth:`mark_done`. Instances pickle as ``(path, mode)`` and reopen on unpickling.
    """

    def __init__(self, group: zarr.Group, path: Path, mode: str):
        """Use :meth:`create` or :meth:`open`; this wraps an already validated group."""
        self._group = group
        self._path = path
        self._mode = mode
        attrs = dict(group.attrs)
        self._dims = tuple(attrs["dims"])
        self._metrics = tuple(attrs["metrics"])
        self._tile_shape = tuple(int(t) for t in attrs["tile_shape"])
        self._axes = tuple(np.asarray(group[d][...], dtype=np.float64) for d in self._dims)
        self._grid = Grid(self._axes)
        self._arrays: dict[str, Any] = {}
        self._integrity = attrs.get(INTEGRITY_ATTR)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        axes: Sequence[np.ndarray],
        metrics: Sequence[str],
        tile_shape: Sequence[int],
        dims: Sequence[str] | None = None,
        directions: np.ndarray | None = None,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> LandscapeStore:
        """Create an empty store (metrics all NaN, no tile done).

        Args:
            path: local directory of the store.
            axes: one 1-D coordinate array per grid axis (``ij`` order).
            metrics: names of the metric arrays, e.g. ``("loss", "accuracy")``.
            tile_shape: points per tile along each axis; also the chunk shape of every
                metric array. Sizes larger than an axis are clipped to it.
            dims: dimension names; default ``("x",)``, ``("x", "y")`` or ``("x", "y", "z")``.
            directions: optional ``(k, n)`` array, k = number of axes; float64 stays
                float64, anything else is stored as float32. Chunked along n.
            attrs: JSON-able provenance stored as root attributes.
            overwrite: replace an existing landscape store at ``path``.

        Returns:
            The store opened in ``"r+"`` mode.

        Raises:
            ConfigurationError: invalid axes, dims, metrics, tile shape, directions or attrs.
            StoreError: ``path`` exists and ``overwrite`` is false, or it is not a landscape
                store (never deleted).
        """
        grid = Grid(axes)
        ndim = grid.ndim
        if dims is None:
            if ndim not in _DEFAULT_DIMS:
                raise ConfigurationError(
                    f"a grid with {ndim} axes has no default dims; pass dims=(...) with "
                    f"{ndim} names."
                )
            dims = _DEFAULT_DIMS[ndim]
        if isinstance(dims, str):
            dims = (dims,)
        dims = tuple(_check_name(d, "dims entry") for d in dims)
        if len(dims) != ndim or len(set(dims)) != ndim:
            raise ConfigurationError(
                f"dims={dims} does not fit a grid with {ndim} axes; give {ndim} distinct names."
            )
        if isinstance(metrics, str):
            metrics = (metrics,)
        metrics = tuple(_check_name(m, "metrics entry") for m in metrics)
        if not metrics or len(set(metrics)) != len(metrics):
            raise ConfigurationError(
                f"metrics={metrics}: give at least one metric name, each once."
            )
        tile_dims = tuple(f"tile_{d}" for d in dims)
        clash = set(metrics) & (set(dims) | set(tile_dims) | set(_RESERVED_NAMES))
        if clash:
            raise ConfigurationError(
                f"metric name(s) {sorted(clash)} collide with dims {dims} or reserved arrays "
                f"{_RESERVED_NAMES}; rename the metric(s)."
            )
        if set(dims) & set(_RESERVED_NAMES):
            raise ConfigurationError(
                f"dims={dims} uses a reserved array name {_RESERVED_NAMES}; rename the dim."
            )
        grid.tile_grid_shape(tile_shape)  # validates length and positivity
        tile_shape = tuple(min(int(t), n) for t, n in zip(tile_shape, grid.shape, strict=True))
        counts = grid.tile_grid_shape(tile_shape)

        dir_array = None
        if directions is not None:
            dir_array = np.asarray(directions)
            if dir_array.ndim != 2 or dir_array.shape[0] != ndim or dir_array.shape[1] < 1:
                raise ConfigurationError(
                    f"directions has shape {dir_array.shape}; expected (k, n) with k={ndim} "
                    "(one direction per grid axis) and n the number of parameters."
                )
            if not np.issubdtype(dir_array.dtype, np.floating):
                raise ConfigurationError(
                    f"directions has dtype {dir_array.dtype}; pass a float32 or float64 array."
                )
            if dir_array.dtype != np.float64:
                dir_array = dir_array.astype(np.float32, copy=False)

        user_attrs = _jsonable(dict(attrs or {}), "attrs")
        reserved = sorted(set(user_attrs) & set(_LAYOUT_ATTRS))
        if reserved:
            raise ConfigurationError(
                f"attrs keys {reserved} are reserved by the store layout; rename them."
            )
        root_attrs = {
            **user_attrs,
            "landscapes_store_version": STORE_VERSION,
            "tile_shape": list(tile_shape),
            "metrics": list(metrics),
            "dims": list(dims),
            INTEGRITY_ATTR: dict(_INTEGRITY),
        }
        try:
            json.dumps(root_attrs, allow_nan=False)
        except ValueError as exc:
            raise ConfigurationError(
                f"attrs hold NaN or inf ({exc}); JSON attributes cannot; store them as strings."
            ) from exc

        p = Path(os.fspath(path)).absolute()
        replace = cls._prepare_path(p, overwrite)
        # built under a temporary sibling and renamed into place: never seen half-created
        with atomic_directory(p, replace=replace) as tmp:
            _build(tmp, root_attrs, grid, dims, metrics, tile_shape, counts, tile_dims, dir_array)
        return cls.open(p, mode="r+")

    @staticmethod
    def _prepare_path(p: Path, overwrite: bool) -> bool:
        """Check that ``p`` may be (re)created; True when an existing store is replaced."""
        if not p.exists():
            return False
        if not p.is_dir():
            raise StoreError(
                f"cannot create a landscape store at {p}: a file is there; choose another path."
            )
        if not any(p.iterdir()):
            return False
        try:
            _read_root_attrs(p)
            is_store = True
        except StoreError:
            is_store = False
        if not is_store:
            raise StoreError(
                f"cannot create a landscape store at {p}: the directory is not empty and is not "
                "a landscape store, so it is never overwritten; choose another path or empty it."
            )
        if not overwrite:
            raise StoreError(
                f"a landscape store already exists at {p}; pass overwrite=True to replace it, "
                "or LandscapeStore.open(path) to resume it."
            )
        return True

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> LandscapeStore:
        """Open an existing store.

        Args:
            path: directory of the store.
            mode: ``"r"`` (read-only) or ``"r+"`` (read and write tiles).

        Raises:
            ConfigurationError: unknown mode.
            StoreError: ``path`` is missing or is not a (complete) landscape store.
            IntegrityError: the ``done`` mask is missing or its metadata unreadable; the
                message says how to rebuild it (:func:`verify_store` with ``repair=True``).
        """
        store = cls._open(path, mode)
        state = _array_state(store.path, "done")
        if state != "ok":
            raise IntegrityError(_done_mask_message(store.path, state))
        return store

    @classmethod
    def _open(cls, path: str | os.PathLike, mode: str) -> LandscapeStore:
        """Open with every array but ``done`` checked (``verify_store`` repairs ``done``)."""
        if mode not in ("r", "r+"):
            raise ConfigurationError(f"mode={mode!r}: use 'r' (read-only) or 'r+' (read/write).")
        p = Path(os.fspath(path)).absolute()
        attrs = _read_root_attrs(p)
        expected = [*attrs["dims"], *attrs["metrics"]]
        missing = [name for name in expected if _array_state(p, name) != "ok"]
        if missing:
            raise StoreError(
                f"landscape store at {p} lacks (or cannot read the metadata of) array(s) "
                f"{missing}; it was not fully created or was damaged, and cannot be repaired. "
                "Delete it and re-run (or recreate it with LandscapeStore.create(..., "
                "overwrite=True))."
            )
        zarr = _import_zarr()
        group = zarr.open_group(str(p), mode=mode, zarr_format=3, use_consolidated=False)
        return cls(group, p, mode)

    def __reduce__(self):
        return (type(self).open, (str(self._path), self._mode))

    def __repr__(self) -> str:
        total = len(self.tiles())
        try:
            done = f"{int(self.done_mask().sum())}/{total}"
        except StoreError:
            done = f"?/{total} (done mask unreadable)"
        return (
            f"LandscapeStore({str(self._path)!r}, dims={self._dims}, shape={self.shape}, "
            f"metrics={self._metrics}, tiles done={done})"
        )

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._path

    @property
    def axes(self) -> tuple[np.ndarray, ...]:
        return tuple(a.copy() for a in self._axes)

    @property
    def dims(self) -> tuple[str, ...]:
        return self._dims

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return self._tile_shape

    @property
    def shape(self) -> tuple[int, ...]:
        return self._grid.shape

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (provenance plus the layout keys), read fresh from disk."""
        return _read_root_attrs(self._path)

    @property
    def grid(self) -> Grid:
        return self._grid

    def tiles(self) -> list[Tile]:
        """All tiles in C order; tile ``t`` is exactly one chunk of every metric array."""
        return self._grid.tiles(self._tile_shape)

    # ------------------------------------------------------------------ writing
    def write_tile(
        self, tile: Tile | tuple[int, ...], values: Mapping[str, np.ndarray]
    ) -> dict[str, Any] | None:
        """Write every metric's block of one tile (whole chunks; safe across processes).

        Then records the size and SHA-256 of each chunk file in the tile's checksum record
        (``integrity/tiles/<i>.<j>.json``, written atomically), unless the store is older than
        checksum records.

        Args:
            tile: a tile of :meth:`tiles` or its index in the tile grid.
            values: one array per metric (all metrics of the store), of shape ``tile.shape``
                or flat ``(tile.size,)`` in C order (as ``Grid.coordinates`` lists points).

        Returns:
            The tile's checksum record (see the module docstring), or None for an older store.

        Raises:
            StoreError: read-only store, unknown/missing metric, wrong block shape, or a tile
                that does not belong to this store's tiling.
            StoreWriteError: the file system refused the write (disk full, ...); the message
                names the store and says to free space and re-run to resume.

        Does not mark the tile done; the driver calls :meth:`mark_done` afterwards.
        """
        if self._mode == "r":
            raise StoreError(
                f"write_tile: store {self._path} is open read-only; open it with mode='r+'."
            )
        t = self._resolve_tile(tile, "write_tile")
        unknown = sorted(set(values) - set(self._metrics))
        missing = [m for m in self._metrics if m not in values]
        if unknown or missing:
            raise StoreError(
                f"write_tile: tile {t.index} got metrics {sorted(values)}; the store holds "
                f"{list(self._metrics)} (unknown: {unknown}, missing: {missing}). Pass one "
                "block per store metric."
            )
        blocks = {}
        for name in self._metrics:
            block = np.asarray(values[name])
            if block.dtype.kind not in "biuf":
                raise StoreError(
                    f"write_tile: metric {name!r} has dtype {block.dtype}; pass real numbers."
                )
            if block.shape == (t.size,) and block.shape != t.shape:
                block = block.reshape(t.shape)
            if block.shape != t.shape:
                raise StoreError(
                    f"write_tile: metric {name!r} block has shape {block.shape}, tile "
                    f"{t.index} needs {t.shape} (or flat ({t.size},)); pass one value per "
                    "point of the tile."
                )
            blocks[name] = block.astype(np.float64, copy=False)
        try:
            for name, block in blocks.items():
                self._array(name)[t.slices] = block
            return self._record_tile(t) if self._has_records else None
        except OSError as err:
            raise write_error(err, self._path, f"write_tile: cannot write tile {t.index}") from err

    def _record_tile(self, t: Tile) -> dict[str, Any]:
        chunks = {}
        for name in self._metrics:
            key = self._chunk_key(name, t)
            size, digest = sha256_file(self._path / key)
            chunks[name] = {"file": key, "bytes": size, "sha256": digest}
        record = {"format": 1, "tile": list(t.index), "chunks": chunks}
        where = self._record_path(t.index)
        where.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(where, json.dumps(record, indent=1).encode())
        return record

    def mark_done(self, tiles: Iterable[Tile | tuple[int, ...]]) -> None:
        """Record tiles as finished in the ``done`` mask (driver only: one writer).

        Raises:
            StoreError: read-only store, or a tile outside this store's tiling.
            IntegrityError: the done mask cannot be read (see :func:`verify_store`).
            StoreWriteError: the file system refused the write (disk full, ...); tiles marked
                before stay marked, and re-running resumes.
        """
        if self._mode == "r":
            raise StoreError(
                f"mark_done: store {self._path} is open read-only; open it with mode='r+'."
            )
        indices = [self._resolve_tile(t, "mark_done").index for t in tiles]
        if not indices:
            return
        mask = self.done_mask()
        for idx in indices:
            mask[idx] = True
        try:
            self._array("done")[...] = mask
        except OSError as err:
            raise write_error(err, self._path, "mark_done: cannot write the done mask") from err

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Merge JSON-able provenance into the root attributes (layout keys are read-only)."""
        if self._mode == "r":
            raise StoreError(
                f"update_attrs: store {self._path} is open read-only; open it with mode='r+'."
            )
        new = _jsonable(dict(attrs), "attrs")
        reserved = sorted(set(new) & set(_LAYOUT_ATTRS))
        if reserved:
            raise ConfigurationError(
                f"update_attrs: keys {reserved} are fixed by the store layout; rename them."
            )
        try:
            json.dumps(new, allow_nan=False)
        except ValueError as exc:
            raise ConfigurationError(
                f"update_attrs: attrs hold NaN or inf ({exc}); store them as strings."
            ) from exc
        try:
            self._group.update_attributes(new)
            _consolidate(self._path)
        except OSError as err:
            raise write_error(err, self._path, "update_attrs: cannot write the attributes") from err

    # ------------------------------------------------------------------ reading
    def done_mask(self) -> np.ndarray:
        """Boolean mask of finished tiles, shape = tile grid shape.

        Raises:
            IntegrityError: the mask is missing or cannot be decoded; the message says how to
                rebuild it (:func:`verify_store` with ``repair=True``).
        """
        if not (self._path / "done" / "zarr.json").is_file():  # deleted since opening
            self._arrays.pop("done", None)
            raise IntegrityError(_done_mask_message(self._path, "missing"))
        try:
            return np.asarray(self._array("done")[...], dtype=bool)
        except (KeyError, FileNotFoundError):
            raise IntegrityError(_done_mask_message(self._path, "missing")) from None
        except Exception as exc:  # noqa: BLE001 - codec errors come in many types
            detail = f"file {self._chunk_key_of('done', (0,) * len(self._dims))}: "
            raise IntegrityError(
                _done_mask_message(self._path, "unreadable", detail + _describe(exc))
            ) from exc

    def missing_tiles(self) -> list[Tile]:
        """Tiles not marked done, in C order."""
        mask = self.done_mask()
        return [t for t in self.tiles() if not mask[t.index]]

    def is_complete(self) -> bool:
        """True when every tile is marked done."""
        return bool(self.done_mask().all())

    def read(self, name: str) -> np.ndarray:
        """The full float64 array of one metric (NaN where no tile was written)."""
        if name not in self._metrics:
            raise StoreError(
                f"read: no metric {name!r} in store {self._path}; it holds {list(self._metrics)}."
            )
        return self._read_checked(name)

    def _read_checked(self, name: str) -> np.ndarray:
        """Read a whole metric; a chunk that fails to decode is named, never a bare codec error."""
        arr = self._array(name)
        try:
            return np.asarray(arr[...])
        except Exception as exc:  # noqa: BLE001 - codec errors come in many types
            bad = exc
        for t in self.tiles():  # find the culprit (rare: only after a failure)
            try:
                arr[t.slices]
            except Exception as exc:  # noqa: BLE001
                raise IntegrityError(self._bad_chunk_message(name, t, exc)) from exc
        raise IntegrityError(  # failed as a whole, but no single chunk fails: name the array
            f"read: array {name!r} of landscape store {self._path} cannot be read "
            f"({_describe(bad)}); check the store with landscapes.verify_store"
            f"({str(self._path)!r})."
        ) from bad

    def _bad_chunk_message(self, name: str, t: Tile, exc: BaseException) -> str:
        return (
            f"read: chunk file {self._chunk_key(name, t)} (metric {name!r}, tile {t.index}) of "
            f"landscape store {self._path} cannot be decoded ({_describe(exc)}); it is damaged. "
            f"Run landscapes.verify_store({str(self._path)!r}, repair=True) to clear the "
            "damaged tiles, then re-run the same command to recompute them."
        )

    def read_directions(self) -> np.ndarray | None:
        """The ``(k, n)`` directions, or None when the store has none.

        Stores that record the directions' digests (``landscapes_directions`` attribute) are
        checked: every chunk file present, values equal to the recorded digests.

        Raises:
            IntegrityError: a chunk is missing, undecodable or altered.
        """
        if _array_state(self._path, "directions") == "missing":
            return None
        arr = self._array("directions")
        manifest = dict(arr.attrs).get("landscapes_directions")
        fix = "the store's copy of the directions is damaged; delete the store and re-run"
        if manifest is not None:
            missing = _missing_chunk_files(self._path, "directions", arr)
            if missing:
                raise IntegrityError(
                    f"read_directions: landscape store {self._path} lacks chunk file(s) "
                    f"{missing[:5]} of its directions; {fix}."
                )
        try:
            out = np.asarray(arr[...])
        except Exception as exc:  # noqa: BLE001 - codec errors come in many types
            raise IntegrityError(
                f"read_directions: the directions of landscape store {self._path} cannot be "
                f"decoded ({_describe(exc)}); {fix}."
            ) from exc
        if manifest is not None:
            from landscapes.directions_store import _manifest

            if _manifest(out, int(manifest["chunks"][1]))["sha256"] != manifest["sha256"]:
                raise IntegrityError(
                    f"read_directions: the directions of landscape store {self._path} do not "
                    f"match their recorded sha256 (values altered); {fix}."
                )
        return out

    def to_xarray(self) -> xarray.Dataset:
        """``xarray.Dataset``: metrics as data vars, axes as coords, root attrs as attrs.

        Values load lazily on first access (numpy-backed, not dask: call ``.chunk()`` for
        dask); ``done`` and ``directions`` are left out.
        """
        import xarray

        drop = [n for n in _RESERVED_NAMES if n in set(self._group.array_keys())]
        return xarray.open_zarr(
            str(self._path), consolidated=False, zarr_format=3, drop_variables=drop, chunks=None
        )

    # ------------------------------------------------------------------ integrity
    def verify(self, *, repair: bool = False) -> VerifyReport:
        """Check the done tiles against their checksum records; optionally repair.

        Cheap: per done tile, a ``stat`` and a SHA-256 of each chunk file (a few hundred KB);
        nothing is recomputed. Stores without records (older ones) have each done tile's
        chunks checked for presence and decoding.

        Args:
            repair: clear the done flag of every damaged tile, delete its damaged chunk files
                and its record, so that a resume (``missing_tiles()``) recomputes exactly
                those; rebuild a missing or unreadable ``done`` mask from the records (tiles
                whose chunks match their records are done; an older store's mask is rebuilt
                empty). Needs mode ``"r+"``; hold the store's lock
                (:func:`landscapes.integrity.file_lock`) when other processes may write it.

        Returns:
            A :class:`VerifyReport`; ``report.summary()`` lists the damage file by file.

        Raises:
            StoreError: ``repair=True`` on a store opened read-only.
            StoreWriteError: the repair could not write (disk full, ...).
        """
        if repair and self._mode == "r":
            raise StoreError(
                f"verify: store {self._path} is open read-only; open it with mode='r+' to repair."
            )
        tiles = self.tiles()
        state = _array_state(self._path, "done")
        mask = None
        if state == "ok":
            try:
                mask = self.done_mask()
            except IntegrityError:
                state = "unreadable"
        damaged: list[TileDamage] = []
        rebuilt: list[tuple[int, ...]] = []
        for t in tiles:
            if mask is not None and not mask[t.index]:
                continue  # not done: recomputed anyway
            if not self._has_records:
                if mask is not None:
                    damaged += self._check_decodable(t)
                continue
            record, problem = self._load_record(t)
            if problem is not None:
                if mask is not None or problem.reason == "unreadable record":
                    damaged.append(problem)
                continue
            found = self._check_record(t, record)
            damaged += found
            if mask is None and not found:
                rebuilt.append(t.index)
        problems = self._check_directions_files()
        report = VerifyReport(
            path=self._path,
            records=self._has_records,
            done_mask=state,
            tiles=len(tiles),
            tiles_done=int(mask.sum()) if mask is not None else 0,
            damaged=tuple(damaged),
            problems=tuple(problems),
        )
        if not repair or report.ok:
            return report
        try:
            return self._repair(report, mask, rebuilt)
        except OSError as err:
            raise write_error(err, self._path, "verify: cannot repair") from err

    def _load_record(self, t: Tile) -> tuple[dict[str, Any] | None, TileDamage | None]:
        where = self._record_path(t.index)
        rel = str(where.relative_to(self._path))
        try:
            record = json.loads(where.read_text())
        except FileNotFoundError:
            return None, TileDamage(t.index, "done but no record", rel)
        except (OSError, ValueError) as exc:
            return None, TileDamage(t.index, "unreadable record", rel, detail=_describe(exc))
        ok = (
            isinstance(record, dict)
            and record.get("tile") == list(t.index)
            and isinstance(record.get("chunks"), dict)
        )
        if not ok:
            return None, TileDamage(
                t.index, "unreadable record", rel, detail="not a record of this tile"
            )
        return record, None

    def _check_record(self, t: Tile, record: dict[str, Any]) -> list[TileDamage]:
        found = []
        for name in self._metrics:
            key = self._chunk_key(name, t)
            entry = record["chunks"].get(name)
            if not isinstance(entry, dict) or entry.get("file") != key:
                rel = str(self._record_path(t.index).relative_to(self._path))
                found.append(
                    TileDamage(t.index, "unreadable record", rel, detail=f"no entry for {key}")
                )
                continue
            f = self._path / key
            try:
                size = f.stat().st_size
            except FileNotFoundError:
                found.append(TileDamage(t.index, "missing chunk", key, name))
                continue
            want = int(entry.get("bytes", -1))
            if size != want:
                reason = "truncated chunk" if size < want else "size mismatch"
                detail = f"{size} bytes, recorded {want}"
                found.append(TileDamage(t.index, reason, key, name, detail))
                continue
            _, digest = sha256_file(f)
            if digest != entry.get("sha256"):
                detail = f"sha256 {digest[:12]}…, recorded {str(entry.get('sha256'))[:12]}…"
                found.append(TileDamage(t.index, "checksum mismatch", key, name, detail))
        return found

    def _check_decodable(self, t: Tile) -> list[TileDamage]:
        found = []
        for name in self._metrics:
            key = self._chunk_key(name, t)
            if not (self._path / key).is_file():
                found.append(TileDamage(t.index, "missing chunk", key, name))
                continue
            try:
                self._array(name)[t.slices]
            except Exception as exc:  # noqa: BLE001 - codec errors come in many types
                found.append(TileDamage(t.index, "undecodable chunk", key, name, _describe(exc)))
        return found

    def _check_directions_files(self) -> list[str]:
        if _array_state(self._path, "directions") != "ok":
            return []
        arr = self._array("directions")
        if "landscapes_directions" not in dict(arr.attrs):
            return []  # an older store: its directions chunks may legitimately be absent
        missing = _missing_chunk_files(self._path, "directions", arr)
        if not missing:
            return []
        return [
            f"directions: chunk file(s) {missing[:5]} missing; the store's copy of the "
            "directions is damaged (a repair cannot restore it): delete the store and re-run"
        ]

    def _repair(
        self, report: VerifyReport, mask: np.ndarray | None, rebuilt: list[tuple[int, ...]]
    ) -> VerifyReport:
        notes = []
        damaged = set(report.damaged_tiles)
        for d in report.damaged:
            if d.metric is not None and d.reason != "missing chunk":
                (self._path / d.file).unlink(missing_ok=True)
        for index in damaged:
            self._record_path(index).unlink(missing_ok=True)
        if mask is None:
            counts = self._grid.tile_grid_shape(self._tile_shape)
            new = np.zeros(counts, dtype=bool)
            for index in rebuilt:
                new[index] = True
            self._recreate_done(new)
            how = (
                "from the checksum records"
                if self._has_records
                else "empty (an older store has no records: every tile is recomputed)"
            )
            notes.append(
                f"rebuilt the done mask {how}: {int(new.sum())}/{report.tiles} tile(s) done"
            )
            mask = new
        else:
            for index in damaged:
                mask[index] = False
            self._array("done")[...] = mask
        if damaged:
            notes.append(
                f"cleared {len(damaged)} damaged tile(s) {sorted(damaged)}: re-run the same "
                "command to recompute them"
            )
        tmp = self._path.joinpath(*_RECORDS_DIR)
        for leftover in tmp.glob(".*.tmp-*") if tmp.is_dir() else ():
            leftover.unlink(missing_ok=True)
        return VerifyReport(
            path=report.path,
            records=report.records,
            done_mask=report.done_mask,
            tiles=report.tiles,
            tiles_done=int(mask.sum()),
            damaged=report.damaged,
            problems=report.problems,
            repaired=True,
            notes=tuple(notes),
        )

    def _recreate_done(self, mask: np.ndarray) -> None:
        import shutil

        shutil.rmtree(self._path / "done", ignore_errors=True)
        self._arrays.pop("done", None)
        arr = self._group.create_array(
            "done",
            shape=mask.shape,
            dtype="bool",
            chunks=mask.shape,
            fill_value=False,
            dimension_names=tuple(f"tile_{d}" for d in self._dims),
            attributes={
                "description": "True where the tile's values are final (set by the "
                "driver after a tile's write_tile returned)."
            },
            overwrite=True,
        )
        arr[...] = mask
        _consolidate(self._path)

    # ------------------------------------------------------------------ helpers
    def _array(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._group[name]
            if name in self._metrics:  # every tile gets a chunk file, even an all-NaN one
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return arr

    @property
    def _has_records(self) -> bool:
        return self._integrity is not None

    def _chunk_key(self, name: str, t: Tile) -> str:
        """The chunk file of metric ``name`` for tile ``t``, relative to the store."""
        return self._chunk_key_of(name, t.index)

    def _chunk_key_of(self, name: str, index: tuple[int, ...]) -> str:
        try:
            encode = self._array(name).metadata.encode_chunk_key
        except Exception:  # noqa: BLE001 - metadata unreadable: the default v3 encoding
            return f"{name}/c/" + "/".join(str(i) for i in index)
        return f"{name}/{encode(tuple(index))}"

    def _record_path(self, index: tuple[int, ...]) -> Path:
        return self._path.joinpath(*_RECORDS_DIR, ".".join(str(i) for i in index) + ".json")

    def _resolve_tile(self, tile: Tile | tuple[int, ...], where: str) -> Tile:
        counts = self._grid.tile_grid_shape(self._tile_shape)
        index = tile.index if isinstance(tile, Tile) else tuple(int(i) for i in tile)
        if len(index) != len(counts) or any(
            not 0 <= i < c for i, c in zip(index, counts, strict=True)
        ):
            raise StoreError(
                f"{where}: tile index {index} is outside the tile grid {counts} of store "
                f"{self._path}; use an index from store.tiles()."
            )
        expected = Tile(
            index=index,
            slices=tuple(
                slice(i * t, min((i + 1) * t, n))
                for i, t, n in zip(index, self._tile_shape, self.shape, strict=True)
            ),
        )
        if isinstance(tile, Tile) and tile.slices != expected.slices:
            raise StoreError(
                f"{where}: tile {index} covers {tile.slices}, but this store's tile_shape "
                f"{self._tile_shape} puts it at {expected.slices}; take tiles from store.tiles()."
            )
        return expected


def verify_store(path: str | os.PathLike, *, repair: bool = False) -> VerifyReport:
    """Check a landscape store before reuse, even one whose ``done`` mask is gone.

    Like :meth:`LandscapeStore.verify`, but opens the store itself (mode ``"r+"`` when
    repairing, else ``"r"``), so it also works when :meth:`LandscapeStore.open` refuses a
    store with a missing or damaged ``done`` mask.

    Args:
        path: the store.
        repair: see :meth:`LandscapeStore.verify`.

    Raises:
        StoreError: no landscape store at ``path``, or one that cannot be repaired (a metric
            or coordinate array is missing).
    """
    store = LandscapeStore._open(path, "r+" if repair else "r")
    return store.verify(repair=repair)


def _build(tmp, root_attrs, grid, dims, metrics, tile_shape, counts, tile_dims, dir_array):
    """Write a new store's arrays into the (temporary) directory ``tmp``."""
    zarr = _import_zarr()
    group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=root_attrs)
    for d, a in zip(dims, grid.axes, strict=True):
        arr = group.create_array(
            d,
            shape=a.shape,
            dtype="float64",
            chunks=a.shape,
            dimension_names=(d,),
            fill_value=np.nan,
        )
        arr[...] = a
    for m in metrics:
        group.create_array(
            m,
            shape=grid.shape,
            dtype="float64",
            chunks=tile_shape,
            fill_value=np.nan,
            dimension_names=dims,
            attributes={"long_name": m},
        )
    group.create_array(
        "done",
        shape=counts,
        dtype="bool",
        chunks=counts,
        fill_value=False,
        dimension_names=tile_dims,
        attributes={
            "description": "True where the tile's values are final (set by the "
            "driver after a tile's write_tile returned)."
        },
    )
    if dir_array is not None:
        from landscapes.directions_store import MANIFEST_KEY, _manifest

        k, n = dir_array.shape
        chunk = min(n, DIRECTIONS_CHUNK_ELEMENTS)
        arr = group.create_array(
            "directions",
            shape=(k, n),
            dtype=dir_array.dtype,
            chunks=(k, chunk),
            fill_value=np.nan,  # a missing chunk reads as NaN, never as a silent zero
            dimension_names=("direction", "parameter"),
            attributes={MANIFEST_KEY: _manifest(dir_array, chunk)},
            config={"write_empty_chunks": True},
        )
        for a in range(0, n, chunk):  # a chunk at a time: writing it whole made copies of all of it at once
            arr[:, a : a + chunk] = dir_array[:, a : a + chunk]
    group.create_group(
        _RECORDS_DIR[0],
        attributes={
            **_INTEGRITY,
            "description": "tiles/<i>.<j>.json: size and sha256 of each metric's chunk file "
            "of a written tile, recorded by its writer; checked by LandscapeStore.verify.",
        },
    )
    (Path(tmp).joinpath(*_RECORDS_DIR)).mkdir()
    _consolidate(Path(tmp))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _missing_chunk_files(p: Path, name: str, arr: Any) -> list[str]:
    """Chunk files of array ``name`` (every chunk of its grid) that are absent."""
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    missing = []
    for index in np.ndindex(*grid):
        key = f"{name}/{arr.metadata.encode_chunk_key(tuple(int(i) for i in index))}"
        if not (p / key).is_file():
            missing.append(key)
    return missing


def _array_state(p: Path, name: str) -> Literal["ok", "missing", "unreadable"]:
    """Whether ``<p>/<name>/zarr.json`` holds array metadata (cheap: one small file read)."""
    meta = p / name / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "unreadable"
    return "ok" if isinstance(doc, dict) and doc.get("node_type") == "array" else "unreadable"


def _done_mask_message(p: Path, state: str, detail: str = "") -> str:
    what = {
        "missing": "has no done mask (the array 'done' is missing)",
        "unreadable": "has a damaged done mask (the array 'done' cannot be read"
        + (f": {detail}" if detail else "")
        + ")",
    }[state]
    return (
        f"landscape store at {p} {what}, so which tiles are finished is unknown. Repair it with "
        f"landscapes.verify_store({str(p)!r}, repair=True), which rebuilds the mask from the "
        "tiles' checksum records (tiles that fail their check are left to recompute), then "
        "re-run the same command to resume."
    )


def _read_root_attrs(p: Path) -> dict[str, Any]:
    """Root attributes of a landscape store, with a clear StoreError when it is not one."""
    if not p.exists():
        raise StoreError(
            f"no landscape store at {p}: the path does not exist; create it with "
            "LandscapeStore.create(...) (or run the evaluate stage) first."
        )
    meta = p / "zarr.json"
    if not meta.is_file():
        hint = (
            " It looks like a Zarr format 2 store (.zgroup); recreate it with this version."
            if (p / ".zgroup").exists()
            else ""
        )
        raise StoreError(
            f"{p} is not a landscape store: no zarr.json (Zarr format 3 metadata) found.{hint} "
            "Pass the directory that LandscapeStore.create wrote."
        )
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{meta} is unreadable ({exc}); recreate the store.") from exc
    if doc.get("node_type") != "group":
        raise StoreError(
            f"{p} is a Zarr array, not a landscape store group; pass the store's root directory."
        )
    attrs = doc.get("attributes") or {}
    version = attrs.get("landscapes_store_version")
    if version is None:
        raise StoreError(
            f"{p} is a Zarr group but not a landscape store: root attribute "
            "'landscapes_store_version' is missing; create it with LandscapeStore.create(...)."
        )
    if not isinstance(version, int) or version > STORE_VERSION:
        raise StoreError(
            f"{p} has landscapes_store_version={version!r}, this library reads up to "
            f"{STORE_VERSION}; upgrade `landscapes`."
        )
    missing = [k for k in _RESERVED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(
            f"{p} lacks root attribute(s) {missing}; it was not written by "
            "LandscapeStore.create; recreate it."
        )
    if not (len(attrs["dims"]) == len(attrs["tile_shape"]) and math.prod(attrs["tile_shape"])):
        raise StoreError(
            f"{p} has inconsistent dims {attrs['dims']} / tile_shape {attrs['tile_shape']}; "
            "recreate the store."
        )
    return dict(attrs)


def _consolidate(p: Path) -> None:
    """Write consolidated metadata so ``xarray.open_zarr(path)`` opens without a warning."""
    zarr = _import_zarr()
    with warnings.catch_warnings():
        # zarr warns that consolidated metadata is not yet part of the v3 spec; xarray reads it.
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(p), zarr_format=3)
