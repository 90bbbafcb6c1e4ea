"""JSON-ready copies of attributes (numpy scalars and arrays, tuples, paths), refusing the rest."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from landscapes.errors import ConfigurationError

__all__ = ["jsonable"]


def jsonable(value: Any, where: str) -> Any:
    """Convert numpy scalars/arrays and tuples to JSON types; raise on anything else."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigurationError(
                    f"{where}: key {k!r} is not a string; attrs must be JSON objects with "
                    "string keys."
                )
            out[k] = jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ConfigurationError(
        f"{where}={value!r} ({type(value).__name__}) is not JSON-serializable; store plain "
        "str/int/float/bool/None, lists or dicts (convert objects to strings first)."
    )
