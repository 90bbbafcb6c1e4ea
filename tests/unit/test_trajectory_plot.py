"""plots.plot_trajectory: checkpoints over a contour, and a plane that explains little says so."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from landscapes import plots
from landscapes.errors import ConfigurationError


def _plane() -> xr.Dataset:
    x = y = np.linspace(-1.0, 1.0, 5)
    xx, yy = np.meshgrid(x, y, indexing="ij")
    return xr.Dataset({"loss": (("x", "y"), 1.0 + xx**2 + yy**2)}, coords={"x": x, "y": y})


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


def test_points_labels_and_the_explained_note() -> None:
    coords = [[-1.0, 0.5], [-0.5, 0.2], [0.0, 0.0]]
    fig = plots.plot_trajectory(_plane(), coords, ["epoch_000", "epoch_005", "epoch_010"], explained=0.3)
    ax = fig.axes[0]
    line = next(ln for ln in ax.lines if ln.get_marker() == "o")
    np.testing.assert_array_equal(np.c_[line.get_xdata(), line.get_ydata()], coords)
    texts = _texts(fig)
    assert {"epoch_000", "epoch_005", "epoch_010"} <= set(texts)
    assert any(t.startswith("the plane explains only 30 % of the displacement") for t in texts)
    good = plots.plot_trajectory(_plane(), coords, ["a", "b", "c"], explained=0.9)
    assert "the plane explains 90 % of the displacement" in _texts(good)


@pytest.mark.parametrize(("coords", "labels"), [([[0.0, 0.0, 0.0]], ["a"]), ([[0.0, 0.0]], ["a", "b"])])
def test_bad_coordinates_are_refused(coords, labels) -> None:
    with pytest.raises(ConfigurationError, match=r"^plot_trajectory: coords have shape"):
        plots.plot_trajectory(_plane(), coords, labels)
