"""A user's own package: a model class, a dataset function and a metric, nothing of `landscapes`'s
pipeline in it. The config group in ``../conf`` names them by ``_target_``."""

from my_models.data import blobs
from my_models.metrics import margin
from my_models.net import SmallConvNet

__all__ = ["SmallConvNet", "blobs", "margin"]
