"""Who evaluates the tiles: in this process (``local``), or later on dask workers."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Protocol

from landscapes.evaluate import Evaluator
from landscapes.grid import Tile
from landscapes.store import LandscapeStore


class Backend(Protocol):
    def run(self, evaluator: Evaluator, store: LandscapeStore, tiles: Sequence[Tile], *, progress: bool) -> float:
        """Evaluate ``tiles``, write them to ``store``, mark them done; return the seconds spent."""


class LocalBackend:
    """Tiles one after another in this process; each tile is written and marked done at once."""

    def run(self, evaluator: Evaluator, store: LandscapeStore, tiles: Sequence[Tile], *, progress: bool) -> float:
        started = time.perf_counter()
        total = sum(t.size for t in tiles)
        bar = _bar(total, progress)
        try:
            for tile in tiles:
                values = evaluator.evaluate_tile(store.grid, tile)
                store.write_tile(tile, values)
                store.mark_done([tile])
                bar.update(tile.size)
        finally:
            bar.close()
        return time.perf_counter() - started


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # quiet when not on a terminal (disable=None), or when switched off
    return tqdm(total=total, unit="pt", desc="evaluate", smoothing=0.1, file=sys.stderr, disable=None if enabled else True)


def make_backend(compute_cfg: dict) -> Backend:
    backend = compute_cfg.get("backend", "local")
    if backend == "local":
        return LocalBackend()
    from landscapes.errors import ConfigurationError

    raise ConfigurationError(
        f"compute.backend={backend!r} is not available yet in this version; use compute.backend=local."
    )
