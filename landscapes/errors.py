"""Exception and warning classes. Each error also subclasses the matching builtin."""

from __future__ import annotations


class LandscapesError(Exception):
    """Base class of every error raised by `landscapes`."""


class ConfigurationError(LandscapesError, ValueError):
    """An argument or option has a value the library cannot use."""


class AdapterError(ConfigurationError):
    """A batch does not fit the model's call, or the output has nothing the metrics can read;
    the message names the ``forward`` or ``output`` adapter option to set."""


class MetricValueError(ConfigurationError):
    """A custom metric returned something that is not one number."""


class ShapeMismatchError(LandscapesError, ValueError):
    """Tensors (directions, checkpoints, coordinates) do not match the model's shapes."""


class CheckpointError(LandscapesError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class CheckpointNotFoundError(LandscapesError, FileNotFoundError):
    """A checkpoint path or URI does not exist."""


class StoreError(LandscapesError, ValueError):
    """A landscape store is missing, incomplete or belongs to another configuration."""


class IntegrityError(StoreError):
    """Stored data do not match what was recorded when they were written (a chunk is missing,
    truncated, undecodable or altered; a record or the done mask is missing). The message
    names the file and says how to repair or recompute it."""


class StoreWriteError(StoreError):
    """The file system refused a write to a store (disk full, quota, permissions, I/O error).

    Raised from the ``OSError`` (chained as ``__cause__``); ``errno`` holds its error number.
    What was written before stays valid, so freeing space and re-running resumes.
    """

    errno: int | None = None


class LockTimeoutError(StoreError):
    """Another process held a store's lock for longer than the given timeout."""


class EvaluationError(LandscapesError, RuntimeError):
    """A grid tile failed to evaluate."""


class LandscapesWarning(UserWarning):
    """Base class of every warning issued by `landscapes`."""


class FallbackWarning(LandscapesWarning):
    """The engine fell back to a slower strategy; the message says why."""


class DifferentiationError(LandscapesError, RuntimeError):
    """The model or the loss cannot be differentiated as curvature needs (twice, for
    Hessian-vector products); the message names the module or the loss."""


class ConvergenceWarning(LandscapesWarning):
    """An iterative estimate stopped at its iteration limit before meeting its tolerance."""
