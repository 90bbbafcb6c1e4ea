"""Where the project lives and where its outputs go: the lowest module of ``pipelines``.

Every other module may import it; it imports nothing of ``pipelines``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PROJECT_ROOT", "CONF_DIR", "project_root", "stores_dir"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The repository: ``conf/`` and the default ``paths.root_dir``."""

CONF_DIR = PROJECT_ROOT / "conf"


def project_root() -> Path:
    """``$LANDSCAPES_ROOT`` if set, else the repository (the default ``paths.root_dir``)."""
    return Path(os.environ.get("LANDSCAPES_ROOT", PROJECT_ROOT))


def stores_dir(root_dir: str | os.PathLike[str]) -> Path:
    """Shared outputs of a project root (directions, landscape stores): ``<root>/outputs/stores``."""
    return Path(root_dir) / "outputs" / "stores"
