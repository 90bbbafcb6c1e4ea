"""Loss landscapes of PyTorch models: correct directions, a batched engine, labelled results.

The library is pure torch/numpy; the Hydra + MLflow pipeline lives in ``pipelines/``.
"""

from landscapes.adapters import Forward, Output
from landscapes.bn import recalibrate_bn
from landscapes.compat import (
    linear_interpolation,
    planar_interpolation,
    point,
    random_line,
    random_plane,
)
from landscapes.connectivity import (
    Barrier,
    BezierCurve,
    PathValues,
    barrier,
    evaluate_curve,
    fit_bezier,
    linear_path,
)
from landscapes.directions import (
    cosine,
    direction_between,
    normalize_direction,
    orthogonalize,
    random_direction,
)
from landscapes.directions_store import (
    DirectionsRecord,
    load_directions,
    save_directions,
    verify_directions,
)
from landscapes.errors import (
    AdapterError,
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    EvaluationError,
    FallbackWarning,
    IntegrityError,
    LandscapesError,
    LandscapesWarning,
    LockTimeoutError,
    MetricValueError,
    ShapeMismatchError,
    StoreError,
    StoreWriteError,
)
from landscapes.evaluate import Evaluator, evaluate, evaluate_tile
from landscapes.grid import Grid, Tile, axis
from landscapes.integrity import file_lock
from landscapes.landscape import Landscape
from landscapes.metrics import (
    Accuracy,
    DatasetMetric,
    Loss,
    Metric,
    MetricPipeline,
    ModelLoss,
    Perplexity,
)
from landscapes.params import ParameterSpace, TensorSpec
from landscapes.store import LandscapeStore, TileDamage, VerifyReport, verify_store
from landscapes.trajectory import (
    PCADirections,
    Projection,
    pca_directions,
    project_trajectory,
)
from landscapes.wrappers import GeneralModelWrapper, ModelWrapper, SimpleModelWrapper, wrap_model

__version__ = "0.1.0"

__all__ = [
    "Accuracy", "AdapterError", "Forward", "MetricValueError", "ModelLoss", "Output", "Perplexity",
    "recalibrate_bn", "CheckpointError", "CheckpointNotFoundError", "ConfigurationError", "DatasetMetric",
    "EvaluationError", "Evaluator", "FallbackWarning", "GeneralModelWrapper", "Grid", "Landscape",
    "LandscapesError", "LandscapesWarning", "Loss", "Metric", "MetricPipeline", "ModelWrapper",
    "ParameterSpace", "ShapeMismatchError", "SimpleModelWrapper", "StoreError", "TensorSpec", "Tile",
    "axis", "cosine", "direction_between", "evaluate", "evaluate_tile", "linear_interpolation",
    "normalize_direction", "orthogonalize", "planar_interpolation", "point", "random_direction",
    "random_line", "random_plane", "wrap_model",
    # integrity of stored outputs (issue 16)
    "DirectionsRecord", "IntegrityError", "LandscapeStore", "LockTimeoutError", "StoreWriteError",
    "TileDamage", "VerifyReport", "file_lock", "load_directions", "save_directions",
    "verify_directions", "verify_store",
    # comparing checkpoints (issue 14); files: landscapes.export, landscapes.animation
    "Barrier", "BezierCurve", "PCADirections", "PathValues", "Projection", "barrier",
    "evaluate_curve", "fit_bezier", "linear_path", "pca_directions", "project_trajectory",
]

# curvature and sharpness (issue 13); appended after __all__ so other additions do not collide
from landscapes.curvature import (  # noqa: E402
    CurvatureSummary,
    DirectionalCurvature,
    HessianEigen,
    LossGradient,
    SpectralDensity,
    TraceEstimate,
    curvature_summary,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    hessian_vector_product,
)
from landscapes.errors import ConvergenceWarning, DifferentiationError  # noqa: E402
from landscapes.sharpness import (  # noqa: E402
    SharpnessEstimate,
    average_sharpness,
    grid_sharpness,
    worst_case_sharpness,
)

__all__ += [
    "ConvergenceWarning", "CurvatureSummary", "DifferentiationError", "DirectionalCurvature",
    "HessianEigen", "LossGradient", "SharpnessEstimate", "SpectralDensity", "TraceEstimate",
    "average_sharpness", "curvature_summary", "grid_sharpness", "hessian_eigenvalues",
    "hessian_spectrum", "hessian_trace", "hessian_vector_product", "worst_case_sharpness",
]
