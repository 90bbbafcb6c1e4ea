"""NetCDF and VTK files of a landscape, read back by xarray and by parsing the XML."""

from __future__ import annotations

import base64
import importlib.util
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import xarray as xr

from landscapes import ConfigurationError, Landscape, LandscapeStore
from landscapes.export import JSON_ATTRS, read_netcdf, read_vtk, to_netcdf, to_vtk
from landscapes.grid import axis

X = axis(-1.0, 1.0, 5)
Y = np.array([0.5, 0.75, 1.5, 2.0, 3.0, 3.5, 4.0])  # uneven, without 0
META = {"strategy": "loop", "tile_shape": [2, 3], "nested": {"lr": 0.1, "ok": True, "none": None}, "seconds": 1.5}


def _landscape(nan: bool = True) -> Landscape:
    xx, yy = np.meshgrid(X, Y, indexing="ij")
    loss = 1.0 + xx**2 + 0.5 * yy + 100.0 * np.arange(xx.size).reshape(xx.shape) * 1e-3
    acc = 1.0 / (1.0 + loss)
    if nan:
        loss[4, 6] = np.nan  # an unfinished tile
    return Landscape(values={"loss": loss, "accuracy": acc}, axes=(X, Y), metadata=META)


# --------------------------------------------------------------------------- NetCDF
@pytest.mark.parametrize("engine", [None, "scipy"])
def test_netcdf_round_trip(tmp_path, engine):
    land = _landscape()
    path = to_netcdf(land, tmp_path / "sub" / "plane.nc", engine=engine)
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    with xr.open_dataset(path) as ds:
        np.testing.assert_array_equal(ds["loss"].values, land.values["loss"])  # NaN where NaN
        np.testing.assert_array_equal(ds["accuracy"].values, land.values["accuracy"])
        np.testing.assert_array_equal(ds["x"].values, X)
        np.testing.assert_array_equal(ds["y"].values, Y)
        assert ds["loss"].dims == ("x", "y")
        assert ds.attrs["strategy"] == "loop" and ds.attrs["seconds"] == 1.5
        assert set(ds.attrs[JSON_ATTRS].split(",")) == {"tile_shape", "nested"}
    back = read_netcdf(path)
    assert back.attrs["nested"] == {"lr": 0.1, "ok": True, "none": None}
    assert back.attrs["tile_shape"] == [2, 3] and JSON_ATTRS not in back.attrs


def test_netcdf_of_a_store_and_of_a_line(tmp_path):
    store = LandscapeStore.create(
        tmp_path / "s.zarr", axes=[X, Y], metrics=["loss"], tile_shape=(5, 7), attrs={"seeds": [1, 2]}
    )
    block = np.arange(35.0).reshape(5, 7)
    store.write_tile((0, 0), {"loss": block})
    path = to_netcdf(store, tmp_path / "store.nc")
    with xr.open_dataset(path) as ds:
        np.testing.assert_array_equal(ds["loss"].values, block)
    line = Landscape(values={"loss": np.array([3.0, 1.0, 2.0])}, axes=(np.array([-1.0, 0.0, 1.0]),))
    with xr.open_dataset(to_netcdf(line, tmp_path / "line.nc")) as ds:
        np.testing.assert_array_equal(ds["loss"].values, [3.0, 1.0, 2.0])


def test_netcdf_bad_input(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot export a dict"):
        to_netcdf({"loss": 1}, tmp_path / "a.nc")
    with pytest.raises(ConfigurationError, match="engine='zarr'"):
        to_netcdf(_landscape(), tmp_path / "a.nc", engine="zarr")
    missing = next((e for e, m in (("netcdf4", "netCDF4"), ("h5netcdf", "h5netcdf")) if importlib.util.find_spec(m) is None), None)
    if missing:
        with pytest.raises(ConfigurationError, match="not installed"):
            to_netcdf(_landscape(), tmp_path / "a.nc", engine=missing)


# --------------------------------------------------------------------------- VTK
def _parse(path) -> tuple[ET.Element, dict[str, np.ndarray]]:
    """An independent reader: the XML tree and every DataArray decoded from base64."""
    root = ET.parse(path).getroot()
    types = {"Float64": "<f8", "Float32": "<f4", "UInt8": "u1"}
    arrays = {}
    for el in root.iter("DataArray"):
        assert el.get("format") == "binary"
        raw = base64.b64decode(el.text.strip())
        (nbytes,) = np.frombuffer(raw[:8], dtype="<u8")
        data = np.frombuffer(raw[8:], dtype=types[el.get("type")])
        assert data.nbytes == nbytes
        arrays[el.get("Name")] = data.reshape(-1, int(el.get("NumberOfComponents", 1)))
    return root, arrays


def test_vtk_round_trip(tmp_path):
    land = _landscape()
    path = to_vtk(land, tmp_path / "plane.vts", metric="loss")
    root, arrays = _parse(path)
    assert root.tag == "VTKFile" and root.get("type") == "StructuredGrid"
    piece = root.find("StructuredGrid/Piece")
    assert piece.get("Extent") == "0 4 0 6 0 0"
    assert root.find("StructuredGrid/Piece/PointData").get("Scalars") == "loss"
    loss = land.values["loss"]
    pts = arrays["Points"]
    assert pts.shape == (35, 3)
    for i, j in [(0, 0), (3, 2), (4, 0), (0, 6), (2, 5)]:
        p = i + 5 * j  # VTK: the first index runs fastest
        assert (pts[p, 0], pts[p, 1], pts[p, 2]) == (X[i], Y[j], loss[i, j])
        assert arrays["loss"][p, 0] == loss[i, j] and arrays["accuracy"][p, 0] == land.values["accuracy"][i, j]
    nan_point = 4 + 5 * 6
    assert np.isnan(arrays["loss"][nan_point, 0]) and arrays["valid"][nan_point, 0] == 0
    assert pts[nan_point, 2] == np.nanmin(loss)
    assert arrays["valid"].sum() == 34
    np.testing.assert_array_equal(arrays["x"].ravel(), X)
    np.testing.assert_array_equal(arrays["y"].ravel(), Y)
    # the library's own reader agrees
    mine = read_vtk(path)
    np.testing.assert_array_equal(mine["Points"], pts)
    np.testing.assert_array_equal(mine["extent"], [0, 4, 0, 6, 0, 0])


def test_vtk_reads_the_export(tmp_path):
    """VTK's own XML reader (what ParaView uses) opens the file: the grid's shape, points and values."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOXML import vtkXMLStructuredGridReader

    land = _landscape()
    reader = vtkXMLStructuredGridReader()
    reader.SetFileName(str(to_vtk(land, tmp_path / "plane.vts", metric="loss")))
    reader.Update()
    grid = reader.GetOutput()
    dims = [0, 0, 0]
    grid.GetDimensions(dims)
    assert dims == [5, 7, 1]
    loss = vtk_to_numpy(grid.GetPointData().GetArray("loss")).reshape(7, 5).T  # VTK: x runs fastest
    np.testing.assert_array_equal(loss, land.values["loss"])
    pts = vtk_to_numpy(grid.GetPoints().GetData()).reshape(7, 5, 3)
    np.testing.assert_array_equal(pts[:, 0, 1], Y)
    np.testing.assert_array_equal(pts[0, :, 0], X)


def test_vtk_log_height_and_scale(tmp_path):
    land = _landscape(nan=False)
    _, arrays = _parse(to_vtk(land.to_xarray(), tmp_path / "log.vts", metric="accuracy", log=True, z_scale=2.0))
    p = 3 + 5 * 4
    assert arrays["Points"][p, 2] == pytest.approx(2.0 * np.log10(land.values["accuracy"][3, 4]), rel=1e-15)
    assert arrays["accuracy"][p, 0] == land.values["accuracy"][3, 4]


VTK_BAD = [
    pytest.param(dict(metric="error"), "metric='error' is not in the dataset", id="metric"),
    pytest.param(dict(line=True), "needs a 2-D landscape", id="1-D"),
    pytest.param(dict(nan=True), "no finite value", id="all-nan"),
    pytest.param(dict(negative=True, log=True), "no positive value", id="log-negative"),
    pytest.param(dict(z_scale=float("inf")), "z_scale=inf", id="z-scale"),
]


@pytest.mark.parametrize("change, match", VTK_BAD)
def test_vtk_bad_input(tmp_path, change, match):
    land = _landscape()
    if change.pop("line", False):
        land = Landscape(values={"loss": np.ones(3)}, axes=(np.arange(3.0),))
    if change.pop("nan", False):
        land.values["loss"][:] = np.nan
    if change.pop("negative", False):
        land.values["loss"][:] = -1.0
    with pytest.raises(ConfigurationError, match=match):
        to_vtk(land, tmp_path / "bad.vts", **change)
    assert not list(tmp_path.iterdir())
