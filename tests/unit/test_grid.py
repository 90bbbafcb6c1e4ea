"""Grid axes, coordinates in ij order, tiles."""

from __future__ import annotations

import numpy as np
import pytest

from landscapes.grid import Grid, axis, tile_shape_for


def test_axis_has_exact_zero_and_endpoints() -> None:
    a = axis(-1.0, 1.0, 41)
    assert a[20] == 0.0 and a[0] == -1.0 and a[-1] == 1.0
    b = axis(-0.3, 0.7, 11)
    assert 0.0 in b.tolist()


def test_coordinates_are_ij_ordered_for_non_square_grids() -> None:
    g = Grid([axis(0.5, 1.5, 3), axis(-2.0, -1.0, 5)])
    coords = g.coordinates().reshape(3, 5, 2)
    for i in range(3):
        for j in range(5):
            assert tuple(coords[i, j]) == (g.axes[0][i], g.axes[1][j])


@pytest.mark.parametrize("shape,tile", [((7, 5), (2, 3)), ((4,), (3,)), ((3, 4, 5), (2, 2, 2))])
def test_tiles_cover_the_grid_exactly_once(shape: tuple, tile: tuple) -> None:
    g = Grid([np.arange(n, dtype=float) for n in shape])
    hits = np.zeros(shape, dtype=int)
    for t in g.tiles(tile):
        hits[t.slices] += 1
        assert all(s <= ts for s, ts in zip(t.shape, tile, strict=False))
    assert (hits == 1).all()
    assert len(g.tiles(tile)) == int(np.prod(g.tile_grid_shape(tile)))


def test_tile_shape_for_prefers_whole_rows() -> None:
    assert tile_shape_for((41, 41), 100) == (2, 41)
    assert tile_shape_for((41, 41), 10) == (1, 10)
    assert tile_shape_for((10,), 50) == (10,)
