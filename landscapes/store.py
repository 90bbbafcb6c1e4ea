"""Zarr (format 3) layout of one landscape: metric arrays, coordinates, directions, done-mask.

Layout of a store at ``path``::

    zarr.json              root group; attrs = provenance + landscapes_store_version,
                           tile_shape, metrics, dims (plus consolidated metadata)
    <dim>                  one float64 coordinate array per axis, dims (<dim>,)
    <metric>               float64, shape = grid shape, chunks = tile_shape, fill NaN, dims = dims
    done                   bool, one element per tile, dims ("tile_<dim>", ...); driver-only
    directions             optional, (k, n) float, chunked along n, dims ("direction", "parameter")

One tile is exactly one chunk of every metric array, so workers in different processes can
write different tiles at once. Completion lives only in ``done``: NaN and inf are legitimate
metric values, and a chunk that exists is not a finished tile.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscapes.errors import ConfigurationError, StoreError
from landscapes.grid import Grid, Tile

if TYPE_CHECKING:
    import xarray
    import zarr

__all__ = ["LandscapeStore", "STORE_VERSION", "DIRECTIONS_CHUNK_ELEMENTS"]

STORE_VERSION = 1
"""Layout version written to the root attribute ``landscapes_store_version``."""

DIRECTIONS_CHUNK_ELEMENTS = 1 << 20
"""Parameters per chunk of the ``directions`` array (all k directions share a chunk)."""

_DEFAULT_DIMS = {1: ("x",), 2: ("x", "y"), 3: ("x", "y", "z")}
_RESERVED_NAMES = ("done", "directions")
_RESERVED_ATTRS = ("landscapes_store_version", "tile_shape", "metrics", "dims")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def _import_zarr():
    import zarr

    return zarr


def _jsonable(value: Any, where: str) -> Any:
    """Convert numpy scalars/arrays and tuples to JSON types; raise on anything else."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigurationError(
                    f"{where}: key {k!r} is not a string; attrs must be JSON objects with "
                    "string keys."
                )
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ConfigurationError(
        f"{where}={value!r} ({type(value).__name__}) is not JSON-serializable; store plain "
        "str/int/float/bool/None, lists or dicts (convert objects to strings first)."
    )


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
        reserved = sorted(set(user_attrs) & set(_RESERVED_ATTRS))
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
        }
        try:
            json.dumps(root_attrs, allow_nan=False)
        except ValueError as exc:
            raise ConfigurationError(
                f"attrs hold NaN or inf ({exc}); JSON attributes cannot; store them as strings."
            ) from exc

        p = Path(os.fspath(path))
        cls._prepare_path(p, overwrite)
        zarr = _import_zarr()
        group = zarr.create_group(store=str(p), zarr_format=3, attributes=root_attrs)
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
            k, n = dir_array.shape
            arr = group.create_array(
                "directions",
                shape=(k, n),
                dtype=dir_array.dtype,
                chunks=(k, min(n, DIRECTIONS_CHUNK_ELEMENTS)),
                fill_value=0.0,
                dimension_names=("direction", "parameter"),
            )
            arr[...] = dir_array
        _consolidate(p)
        return cls.open(p, mode="r+")

    @staticmethod
    def _prepare_path(p: Path, overwrite: bool) -> None:
        if not p.exists():
            return
        if not p.is_dir():
            raise StoreError(
                f"cannot create a landscape store at {p}: a file is there; choose another path."
            )
        if not any(p.iterdir()):
            return
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
        shutil.rmtree(p)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r+") -> LandscapeStore:
        """Open an existing store.

        Args:
            path: directory of the store.
            mode: ``"r"`` (read-only) or ``"r+"`` (read and write tiles).

        Raises:
            ConfigurationError: unknown mode.
            StoreError: ``path`` is missing or is not a (complete) landscape store.
        """
        if mode not in ("r", "r+"):
            raise ConfigurationError(f"mode={mode!r}: use 'r' (read-only) or 'r+' (read/write).")
        p = Path(os.fspath(path)).absolute()
        attrs = _read_root_attrs(p)
        zarr = _import_zarr()
        group = zarr.open_group(str(p), mode=mode, zarr_format=3, use_consolidated=False)
        expected = [*attrs["dims"], *attrs["metrics"], "done"]
        present = set(group.array_keys())
        missing = [name for name in expected if name not in present]
        if missing:
            raise StoreError(
                f"landscape store at {p} lacks array(s) {missing}; it was not fully created. "
                "Recreate it with LandscapeStore.create(..., overwrite=True)."
            )
        return cls(group, p, mode)

    def __reduce__(self):
        return (type(self).open, (str(self._path), self._mode))

    def __repr__(self) -> str:
        done = int(self.done_mask().sum())
        total = len(self.tiles())
        return (
            f"LandscapeStore({str(self._path)!r}, dims={self._dims}, shape={self.shape}, "
            f"metrics={self._metrics}, tiles done={done}/{total})"
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
    def write_tile(self, tile: Tile | tuple[int, ...], values: Mapping[str, np.ndarray]) -> None:
        """Write every metric's block of one tile (whole chunks; safe across processes).

        Args:
            tile: a tile of :meth:`tiles` or its index in the tile grid.
            values: one array per metric (all metrics of the store), of shape ``tile.shape``
                or flat ``(tile.size,)`` in C order (as ``Grid.coordinates`` lists points).

        Raises:
            StoreError: read-only store, unknown/missing metric, wrong block shape, or a tile
                that does not belong to this store's tiling.

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
        for name, block in blocks.items():
            self._array(name)[t.slices] = block

    def mark_done(self, tiles: Iterable[Tile | tuple[int, ...]]) -> None:
        """Record tiles as finished in the ``done`` mask (driver only: one writer)."""
        if self._mode == "r":
            raise StoreError(
                f"mark_done: store {self._path} is open read-only; open it with mode='r+'."
            )
        indices = [self._resolve_tile(t, "mark_done").index for t in tiles]
        if not indices:
            return
        arr = self._array("done")
        mask = np.asarray(arr[...], dtype=bool)
        for idx in indices:
            mask[idx] = True
        arr[...] = mask

    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Merge JSON-able provenance into the root attributes (layout keys are read-only)."""
        if self._mode == "r":
            raise StoreError(
                f"update_attrs: store {self._path} is open read-only; open it with mode='r+'."
            )
        new = _jsonable(dict(attrs), "attrs")
        reserved = sorted(set(new) & set(_RESERVED_ATTRS))
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
        self._group.update_attributes(new)
        _consolidate(self._path)

    # ------------------------------------------------------------------ reading
    def done_mask(self) -> np.ndarray:
        """Boolean mask of finished tiles, shape = tile grid shape."""
        return np.asarray(self._array("done")[...], dtype=bool)

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
        return np.asarray(self._array(name)[...])

    def read_directions(self) -> np.ndarray | None:
        """The ``(k, n)`` directions, or None when the store has none."""
        if "directions" not in set(self._group.array_keys()):
            return None
        return np.asarray(self._array("directions")[...])

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

    # ------------------------------------------------------------------ helpers
    def _array(self, name: str):
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._group[name]
            self._arrays[name] = arr
        return arr

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
