"""The labelled result."""

from __future__ import annotations

import numpy as np
import pytest

from landscapes import Landscape


def test_to_xarray_has_dims_coords_and_attrs() -> None:
    x, y = np.array([-1.0, 0.0, 1.0]), np.array([0.5, 1.5])
    values = np.arange(6.0).reshape(3, 2)
    land = Landscape(values={"loss": values}, axes=(x, y), metadata={"strategy": "loop", "tile_shape": (1, 2)})
    ds = land.to_xarray()
    assert ds["loss"].dims == ("x", "y")
    assert float(ds["loss"].sel(x=1.0, y=0.5)) == values[2, 0]
    assert ds.attrs["strategy"] == "loop" and ds.attrs["tile_shape"] == [1, 2]


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"values\['loss'\] has shape \(2,\), grid is \(3,\)"):
        Landscape(values={"loss": np.zeros(2)}, axes=(np.zeros(3),))
