"""``python -m pipelines.verify <store> [<store> ...] [--repair]``: check stored outputs against their records.

A landscape store (``landscape.zarr``) is checked tile by tile against its per-tile checksum
records (sizes and SHA-256 of the chunk files, no recomputation) and its ``done`` mask;
``--repair`` clears the damaged tiles and rebuilds a lost ``done`` mask, so that re-running the
command that made the store recomputes exactly those tiles. A directions store
(``directions.zarr``) is checked against its manifest (every chunk present and matching its
digest, finite, non-zero rows); a damaged one is repaired by deleting it and re-running.
Exits 0 when everything is intact (or was repaired), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from landscapes.directions_store import verify_directions
from landscapes.errors import StoreError
from landscapes.integrity import file_lock
from landscapes.store import verify_store

__all__ = ["main", "verify_path"]


def verify_path(path: Path, *, repair: bool = False) -> tuple[bool, list[str]]:
    """``(intact or repaired, report lines)`` for a landscape or directions store at ``path``."""
    path = Path(path).expanduser().absolute()
    if (path / "landscape.zarr" / "zarr.json").exists():
        path = path / "landscape.zarr"
    if _is_directions(path):
        try:
            record = verify_directions(path)
        except StoreError as err:
            return False, [f"directions store {path}: DAMAGED", f"  {err}"]
        return True, [f"directions store {path}: ok ({record.shape[0]} x {record.shape[1]}, sha256 {record.sha256[:16]})"]
    try:
        with file_lock(path):  # not while a run is evaluating it
            report = verify_store(path, repair=repair)
    except StoreError as err:
        return False, [f"{path}: {err}"]
    return report.ok or report.repaired and not report.problems, report.summary()


def _is_directions(path: Path) -> bool:
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError):
        return path.name == "directions.zarr"
    return "landscapes_directions" in attrs or path.name == "directions.zarr"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", type=Path, help="landscape.zarr or directions.zarr folders")
    parser.add_argument("--repair", action="store_true", help="clear damaged tiles so a re-run recomputes them")
    args = parser.parse_args(argv)
    good = True
    for store in args.stores:
        ok, lines = verify_path(store, repair=args.repair)
        print("\n".join(lines))
        good &= ok
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
