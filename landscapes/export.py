"""A 2-D landscape as files other tools open: NetCDF (xarray, Panoply, ncview) and VTK (ParaView).

- :func:`to_netcdf` writes every metric, its coordinates and the provenance. NetCDF-4 through
  ``netCDF4`` or ``h5netcdf`` when installed, else NetCDF-3 (64-bit offsets) through scipy,
  which scikit-learn already brings. NetCDF attributes hold only strings and numbers, so
  nested provenance (dicts, lists, booleans, None) is written as JSON strings whose names
  are listed in the attribute ``landscapes_json_attrs``; :func:`read_netcdf` decodes them.
- :func:`to_vtk` writes a VTK XML structured grid (``.vts``): the points are
  ``(x, y, height)`` with the height the chosen metric (optionally ``log10``, scaled), and
  every metric is a point-data array (the chosen one active). Arrays are inline base64
  binary in VTK's uncompressed framing (a UInt64 byte count, then the little-endian
  values), so values round-trip bit for bit, NaN included. No VTK library is needed.

Files are written to a temporary name in the target folder and renamed into place.
"""

from __future__ import annotations

import base64
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from landscapes.errors import ConfigurationError
from landscapes.integrity import atomic_file

__all__ = ["JSON_ATTRS", "read_netcdf", "read_vtk", "to_netcdf", "to_vtk"]

#: Attribute listing (comma-separated) the attributes :func:`to_netcdf` wrote as JSON.
JSON_ATTRS = "landscapes_json_attrs"
Engine = Literal["netcdf4", "h5netcdf", "scipy"]
_VTK_TYPES = {np.dtype("<f8"): "Float64", np.dtype("<f4"): "Float32", np.dtype("u1"): "UInt8"}


def to_netcdf(landscape_or_ds: Any, path: str | os.PathLike, *, engine: Engine | None = None) -> Path:
    """Write a landscape to a NetCDF file that ``xarray.open_dataset`` reads back.

    Args:
        landscape_or_ds: an ``xarray.Dataset`` or an object with ``to_xarray()``
            (``Landscape``, ``LandscapeStore``, ``PathValues``); any number of dims.
        path: the file to write (``.nc``); its folder is created.
        engine: ``"netcdf4"``, ``"h5netcdf"`` (NetCDF-4) or ``"scipy"`` (NetCDF-3); default
            the first installed, in that order.

    Returns:
        The path written.

    Raises:
        ConfigurationError: not a dataset, or the engine is not installed.

    >>> import tempfile, xarray
    >>> ds = xarray.Dataset({"loss": (("x",), [1.0, 2.0])}, coords={"x": [0.0, 1.0]})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     float(read_netcdf(to_netcdf(ds, d + "/l.nc"))["loss"][1])
    2.0
    """
    ds = _as_dataset(landscape_or_ds, "to_netcdf")
    engine = _engine(engine)
    out = ds.load().copy()
    out = out.drop_encoding() if hasattr(out, "drop_encoding") else out
    out.attrs = _netcdf_attrs(out.attrs)
    for name in out.variables:
        out[name].attrs = _netcdf_attrs(out[name].attrs)
    fmt = "NETCDF3_64BIT" if engine == "scipy" else "NETCDF4"
    target = Path(path)
    with atomic_file(target) as tmp:
        out.to_netcdf(tmp, engine=engine, format=fmt)
    return target


def read_netcdf(path: str | os.PathLike) -> Any:
    """Read a file written by :func:`to_netcdf` into memory, JSON attributes decoded.

    Returns:
        An ``xarray.Dataset`` (loaded; the file is closed).
    """
    import xarray as xr

    with xr.open_dataset(path) as ds:
        ds = ds.load()
    ds.attrs = _decode_attrs(ds.attrs)
    for name in ds.variables:
        ds[name].attrs = _decode_attrs(ds[name].attrs)
    return ds


def to_vtk(
    landscape_or_ds: Any,
    path: str | os.PathLike,
    *,
    metric: str = "loss",
    log: bool = False,
    z_scale: float = 1.0,
) -> Path:
    """Write a 2-D landscape as a VTK XML structured grid (``.vts``) for ParaView.

    Point ``(i, j)`` is at ``(x[i], y[j], z_scale·h[i, j])`` with ``h`` the metric (its
    ``log10`` with ``log``); points where ``h`` is not finite sit at the lowest finite
    height and are marked 0 in the point-data array ``valid``. Every data variable with the
    grid's dims is a point-data array of its raw values; ``metric`` is the active scalar.

    Args:
        landscape_or_ds: an ``xarray.Dataset`` or an object with ``to_xarray()``; 2-D.
        path: the file to write (``.vts``).
        metric: the variable that sets the height.
        log: height ``log10(metric)`` (non-positive values count as missing).
        z_scale: factor on the height (a loss of 1e3 next to coordinates of 1: try 1e-3).

    Returns:
        The path written.

    Raises:
        ConfigurationError: unknown metric, not 2-D, no finite height, or a bad ``z_scale``.
    """
    ds = _as_dataset(landscape_or_ds, "to_vtk")
    if metric not in ds.data_vars:
        raise ConfigurationError(
            f"to_vtk: metric={metric!r} is not in the dataset; choose one of {sorted(map(str, ds.data_vars))}."
        )
    da = ds[metric]
    if da.ndim != 2:
        raise ConfigurationError(
            f"to_vtk: metric {metric!r} has {da.ndim} dims {da.dims}; a VTK surface needs a 2-D "
            "landscape (use to_netcdf for other shapes)."
        )
    if not (isinstance(z_scale, (int, float)) and np.isfinite(z_scale)) or isinstance(z_scale, bool):
        raise ConfigurationError(f"to_vtk: z_scale={z_scale!r}: expected a finite number.")
    dims = [str(d) for d in da.dims]
    values = np.asarray(da.values, dtype=np.float64)
    x, y = (
        np.asarray(ds[d].values, dtype=np.float64) if d in ds.coords else np.arange(n, dtype=np.float64)
        for d, n in zip(dims, values.shape, strict=True)
    )
    height = values
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            height = np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)
    valid = np.isfinite(height)
    if not valid.any():
        raise ConfigurationError(
            f"to_vtk: metric {metric!r} has no {'positive' if log else 'finite'} value to draw; "
            f"{'pass log=False or ' if log else ''}evaluate the landscape first."
        )
    height = np.where(valid, height, np.nanmin(np.where(valid, height, np.nan))) * float(z_scale)
    nx, ny = values.shape
    # VTK orders points with the first index fastest: point (i, j) at i + nx·j
    xx, yy = np.meshgrid(x, y, indexing="ij")
    points = np.stack([xx.T.ravel(), yy.T.ravel(), height.T.ravel()], axis=1)

    extent = f"0 {nx - 1} 0 {ny - 1} 0 0"
    root = ET.Element(
        "VTKFile", type="StructuredGrid", version="1.0", byte_order="LittleEndian", header_type="UInt64"
    )
    grid = ET.SubElement(root, "StructuredGrid", WholeExtent=extent)
    field = ET.SubElement(grid, "FieldData")  # the axes, as VTK writers place it: first
    _data_array(field, "x", x)
    _data_array(field, "y", y)
    piece = ET.SubElement(grid, "Piece", Extent=extent)
    point_data = ET.SubElement(piece, "PointData", Scalars=metric)
    arrays = {metric: values}
    for name, var in ds.data_vars.items():
        if str(name) != metric and [str(d) for d in var.dims] == dims:
            arrays[str(name)] = np.asarray(var.values, dtype=np.float64)
    for name, arr in arrays.items():
        _data_array(point_data, name, arr.T.ravel())
    _data_array(point_data, "valid", valid.T.ravel().astype(np.uint8))
    ET.SubElement(piece, "CellData")
    pts = ET.SubElement(piece, "Points")
    _data_array(pts, "Points", points.ravel(), components=3)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    target = Path(path)
    with atomic_file(target) as tmp:
        tree.write(tmp, encoding="utf-8", xml_declaration=True)
    return target


def read_vtk(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the arrays of a ``.vts`` file written by :func:`to_vtk` (any inline binary or
    ascii arrays): name → flat array (``"Points"`` as ``(n, 3)``), plus ``"extent"``."""
    root = ET.parse(path).getroot()
    header = np.dtype("<u8") if root.get("header_type") == "UInt64" else np.dtype("<u4")
    out: dict[str, np.ndarray] = {}
    for el in root.iter("DataArray"):
        dtype = {v: k for k, v in _VTK_TYPES.items()}[el.get("type")]
        text = (el.text or "").strip()
        if el.get("format") == "binary":
            raw = base64.b64decode(text)
            size = int(np.frombuffer(raw[: header.itemsize], dtype=header)[0])
            arr = np.frombuffer(raw[header.itemsize : header.itemsize + size], dtype=dtype).copy()
        else:
            arr = np.array(text.split(), dtype=dtype)
        comps = int(el.get("NumberOfComponents", "1"))
        out[el.get("Name", "")] = arr.reshape(-1, comps) if comps > 1 else arr
    piece = root.find("./StructuredGrid/Piece")
    if piece is not None:
        out["extent"] = np.array(piece.get("Extent", "").split(), dtype=np.int64)
    return out


# ------------------------------------------------------------------------------- helpers
def _as_dataset(obj: Any, where: str) -> Any:
    import xarray as xr

    if isinstance(obj, xr.Dataset):
        return obj
    if isinstance(obj, xr.DataArray):
        return obj.to_dataset(name=obj.name or "value")
    to_xarray = getattr(obj, "to_xarray", None)
    if callable(to_xarray):
        return _as_dataset(to_xarray(), where)
    raise ConfigurationError(
        f"{where}: cannot export a {type(obj).__name__}; pass an xarray.Dataset or an object with "
        "a to_xarray() method (Landscape, LandscapeStore)."
    )


def _engine(engine: str | None) -> str:
    import importlib.util

    modules = {"netcdf4": "netCDF4", "h5netcdf": "h5netcdf", "scipy": "scipy"}
    if engine is None:
        for name, module in modules.items():
            if importlib.util.find_spec(module) is not None:
                return name
        raise ConfigurationError(
            "to_netcdf: no NetCDF backend is installed; install scipy (NetCDF-3) or netCDF4/h5netcdf (NetCDF-4)."
        )
    if engine not in modules:
        raise ConfigurationError(
            f"to_netcdf: engine={engine!r} is not an option; choose one of {sorted(modules)} or None."
        )
    if importlib.util.find_spec(modules[engine]) is None:
        raise ConfigurationError(
            f"to_netcdf: engine={engine!r} needs the package {modules[engine]!r}, which is not "
            "installed; install it or pass engine=None."
        )
    return engine


def _netcdf_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Strings and finite-typed numbers as they are; everything else as JSON, listed."""
    out: dict[str, Any] = {}
    encoded = []
    for key, value in attrs.items():
        key = str(key)
        if key == JSON_ATTRS:
            continue
        if isinstance(value, str) or (
            isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        ):
            out[key] = value.item() if isinstance(value, np.generic) else value
            if isinstance(out[key], int) and not -(2**31) <= out[key] < 2**31:
                out[key] = json.dumps(out[key])  # NetCDF-3 has no 64-bit integer attributes
                encoded.append(key)
        else:
            out[key] = json.dumps(_plain(value))
            encoded.append(key)
    if encoded:
        out[JSON_ATTRS] = ",".join(encoded)
    return out


def _decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(attrs)
    names = out.pop(JSON_ATTRS, "")
    for key in filter(None, str(names).split(",")):
        if key in out:
            out[key] = json.loads(out[key])
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _data_array(parent: ET.Element, name: str, values: np.ndarray, components: int = 1) -> None:
    data = np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<"), copy=False)
    raw = data.tobytes()
    el = ET.SubElement(
        parent, "DataArray", type=_VTK_TYPES[data.dtype], Name=name, format="binary",
        NumberOfComponents=str(components),
    )
    if parent.tag == "FieldData":
        el.set("NumberOfTuples", str(data.size // components))
    el.text = base64.b64encode(np.array(len(raw), dtype="<u8").tobytes() + raw).decode("ascii")
