"""GIF (and MP4 where ffmpeg exists) of landscapes on one plane with a growing trajectory."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from landscapes import ConfigurationError, Landscape, ShapeMismatchError
from landscapes.animation import animate
from landscapes.grid import axis

X, Y = axis(-1.0, 1.0, 9), axis(-0.5, 1.5, 7)


def _frames(values) -> list[Landscape]:
    return [Landscape(values={"loss": np.full((9, 7), v)}, axes=(X, Y)) for v in values]


def _bowl(shift: float) -> Landscape:
    xx, yy = np.meshgrid(X, Y, indexing="ij")
    return Landscape(values={"loss": 0.1 + (xx - shift) ** 2 + yy**2}, axes=(X, Y))


def _read(path) -> list[np.ndarray]:
    with Image.open(path) as im:
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append(np.asarray(im.convert("RGB")).copy())
    return out


def test_gif_has_one_frame_per_landscape(tmp_path):
    lands = [_bowl(s) for s in (-0.5, 0.0, 0.5, 0.8)]
    traj = np.array([[-0.8, 1.2], [-0.4, 0.6], [0.0, 0.3], [0.3, 0.0]])
    out = animate(lands, [f"epoch {i}" for i in range(4)], tmp_path / "a" / "run.gif", trajectory=traj, mp4=False)
    assert set(out) == {"gif"} and out["gif"].exists()
    frames = _read(out["gif"])
    assert len(frames) == 4
    assert frames[0].shape == (500, 600, 3)
    assert not list(out["gif"].parent.glob(".*"))  # no temporary file left


def test_one_colour_scale_across_frames(tmp_path):
    """Two constant landscapes: on a shared scale the low one is drawn with the bottom colour
    of viridis and the high one with the top (on per-frame scales both would look alike)."""
    from matplotlib import colormaps

    out = animate(_frames([1.0, 100.0]), ["low", "high"], tmp_path / "c.gif", log=True, mp4=False)
    low, high = (f[250, 300].astype(float) for f in _read(out["gif"]))  # inside the axes
    bottom, top = (np.array(colormaps["viridis"](v)[:3]) * 255 for v in (0.0, 1.0))
    assert np.abs(low - bottom).max() < 40, low
    assert np.abs(high - top).max() < 40, high


def test_trajectory_grows_frame_by_frame(tmp_path):
    """Same landscape and label in every frame: only the trajectory changes, so frames differ."""
    lands = _frames([2.0, 2.0, 2.0])
    traj = np.array([[-0.8, -0.3], [0.0, 0.5], [0.7, 1.2]])
    frames = _read(animate(lands, ["t"] * 3, tmp_path / "g.gif", trajectory=traj, mp4=False)["gif"])
    assert len(frames) == 3
    changed = [int((frames[i] != frames[i + 1]).any(axis=-1).sum()) for i in range(2)]
    assert all(c > 20 for c in changed), changed


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_mp4_next_to_the_gif(tmp_path):
    out = animate(_frames([1.0, 2.0]), ["a", "b"], tmp_path / "m.gif")
    assert out["mp4"] == tmp_path / "m.mp4" and out["mp4"].stat().st_size > 0


BAD = [
    pytest.param(dict(datasets=[]), ConfigurationError, "non-empty list", id="empty"),
    pytest.param(dict(labels=["only one"]), ConfigurationError, "2 datasets but 1 labels", id="labels"),
    pytest.param(dict(path="x.png"), ConfigurationError, "must end in .gif", id="suffix"),
    pytest.param(dict(metric="acc"), ConfigurationError, "metric='acc' is not in", id="metric"),
    pytest.param(dict(fps=0), ConfigurationError, "fps=0", id="fps"),
    pytest.param(dict(levels=1), ConfigurationError, "levels=1", id="levels"),
    pytest.param(dict(trajectory=np.zeros(3)), ShapeMismatchError, "trajectory has shape", id="trajectory"),
    pytest.param(dict(trajectory=np.zeros((3, 2)), upto=[0, 5]), ConfigurationError, "upto=", id="upto"),
    pytest.param(dict(other_grid=True), ShapeMismatchError, "another grid", id="other-plane"),
    pytest.param(dict(negative=True), ConfigurationError, "no positive value", id="log-of-negative"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input(tmp_path, change, error, match):
    kwargs = dict(datasets=_frames([1.0, 2.0]), labels=["a", "b"], path=tmp_path / "bad.gif", mp4=False)
    if change.pop("other_grid", False):
        kwargs["datasets"][1] = Landscape(values={"loss": np.ones((9, 7))}, axes=(X, Y + 1.0))
    if change.pop("negative", False):
        kwargs["datasets"] = _frames([-1.0, -2.0])
    kwargs.update(change)
    with pytest.raises(error, match=match):
        animate(kwargs.pop("datasets"), kwargs.pop("labels"), kwargs.pop("path"), **kwargs)
    assert not list(tmp_path.iterdir())
