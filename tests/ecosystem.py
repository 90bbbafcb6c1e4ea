"""Real models from the ecosystem (torchvision, timm, transformers), built offline with random weights.

Import these through the helpers here, never directly in a test module: a test that needs one of
them is skipped (``requires_models``) when the optional extra ``models`` is not installed.

torchvision's wheels on PyPI are CUDA builds; beside the CPU build of torch its C++ operators
(``nms``, ``roi_align``...) do not load, and ``import torchvision`` then fails while registering
fake kernels for ``torchvision::nms`` and ``torchvision::qnms``. The model zoo is pure Python
and never calls those operators, so when the extension is missing we declare the two schemas
(without kernels: calling them still fails loudly) before importing torchvision.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest
import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY: list[torch.library.Library] = []  # keep the declarations alive


def _declare_torchvision_ops() -> None:
    if _LIBRARY:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    from pathlib import Path

    so = next(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"), None)
    if so is not None:
        try:
            torch.ops.load_library(str(so))
            return  # a matching build: its own operators are there
        except (OSError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        lib.define(schema)
    _LIBRARY.append(lib)


def require(name: str) -> ModuleType:
    """Import ``torchvision``, ``timm`` or ``transformers``, or skip the test without the extra."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[models]')")
    _declare_torchvision_ops()  # transformers and timm import torchvision when it is installed
    return importlib.import_module(name)
