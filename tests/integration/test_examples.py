"""The examples in examples/ run and write what they promise."""

from __future__ import annotations

import runpy
import sys

import pytest


@pytest.mark.slow
def test_quickstart_writes_a_contour_plot(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--out", str(tmp_path), "--steps", "9"])
    runpy.run_path("examples/quickstart.py", run_name="__main__")
    png = tmp_path / "quickstart_contour.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "loss at θ0 = " in out and "minimum" in out
