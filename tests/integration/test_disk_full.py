"""A full disk in the middle of an evaluation: a clear message, nothing finished is lost.

The project root lives on a tiny tmpfs mounted by the test (skipped where mounting is not
allowed); the tracking store lives elsewhere, so only the landscape's files fill the disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from landscapes.store import LandscapeStore

REPO = Path(__file__).resolve().parents[2]
GRID = ["debug=default", "grid.steps=21", "compute.max_batch_points=3", "plot.enabled=false"]


def _mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path):
    mnt = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount(mnt, "600k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _run(root: Path, uri: str, ckpt: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LANDSCAPES_SWEEP_RUN_ID")}
    env["LANDSCAPES_ROOT"] = str(root)
    cmd = [sys.executable, "-m", "pipelines.run", *GRID, f"checkpoint.path={ckpt}", f"tracking.uri={uri}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_disk_full_then_resume(tiny_disk: Path, tmp_path: Path, project) -> None:
    ckpt = project.checkpoint(4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    full = _run(tiny_disk, uri, ckpt)
    assert full.returncode != 0, "the run should have filled the 600k disk"
    message = full.stderr.strip().splitlines()[-1] if full.stderr.strip() else ""
    stores = sorted((tiny_disk / "outputs" / "stores").glob("landscape-*/landscape.zarr"))
    assert stores, full.stderr[-3000:]
    store = stores[0]
    assert "No space left on device" in full.stderr and str(store) in full.stderr, full.stderr[-3000:]
    assert "re-run the same command to resume" in full.stderr, message
    assert full.stderr.lstrip().startswith("error: ") or "\nerror: " in full.stderr, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, "an environmental error is one line, not a traceback"
    done_before = int(LandscapeStore.open(store, mode="r").done_mask().sum())
    assert done_before > 0

    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    again = _run(tiny_disk, uri, ckpt)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = LandscapeStore.open(store, mode="r")
    assert resumed.is_complete()

    reference = project.run(*GRID, f"checkpoint.path={ckpt}")
    ref = LandscapeStore.open(reference["store"], mode="r")
    for m in ref.metrics:
        np.testing.assert_allclose(resumed.read(m), ref.read(m), rtol=1e-6, atol=1e-9, err_msg=m)
