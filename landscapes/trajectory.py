"""The plane of a training trajectory: PCA directions of checkpoints, and projection onto it.

Li et al. (2018, §7) draw a training run in the plane spanned by the first two principal
components of the checkpoints' displacements ``θᵢ − θ_ref`` from the final checkpoint, with
the final checkpoint at the origin. Here:

- Rows are the displacements of *every* checkpoint (the reference's own row, all zeros, is
  kept when the reference is one of them, as Li et al. do).
- ``center=False`` (default): the rows are not centered, so the directions span the plane
  *through the origin* that is closest to the checkpoints, which is the plane the landscape
  is drawn in. Its explained-variance ratios are then exactly the share of
  ``Σᵢ ‖θᵢ − θ_ref‖²`` the plane explains, the measure :func:`project_trajectory` reports per
  checkpoint. ``center=True`` is Li et al.'s (``sklearn.decomposition.PCA``) convention:
  the rows' mean is removed first, the plane is fitted through the checkpoints' mean and
  drawn through the origin parallel to it; the reference then only sets the origin.
- Nothing of size n × n is formed: the m × m Gram matrix of the m displacements accumulates
  in float64 tensor by tensor (``method="gram"``), or the m × n stack goes to an SVD
  (``method="svd"``); ``"auto"`` takes the SVD while the stack is small.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from landscapes._checks import check_choice, check_positive_int
from landscapes.directions import (
    IGNORES,
    NORMALIZATIONS,
    Ignore,
    Normalization,
    normalize_direction,
)
from landscapes.errors import ConfigurationError, ShapeMismatchError
from landscapes.params import ParameterSpace, TensorSpec

__all__ = ["PCADirections", "Projection", "pca_directions", "project_trajectory"]

Checkpoint = Mapping[str, torch.Tensor] | nn.Module
Reference = Literal["last"] | int | Mapping[str, torch.Tensor] | nn.Module
Method = Literal["auto", "svd", "gram"]
METHODS = ("auto", "svd", "gram")
#: With ``method="auto"``, the SVD of the stacked displacements while it takes at most this
#: many bytes in float64; the Gram matrix above.
SVD_MAX_BYTES = 256 << 20
#: Bytes of float64 displacements handled at once (a large tensor goes in column chunks).
CHUNK_BYTES = 64 << 20
#: A singular value below this fraction of the largest counts as zero (Gram eigenvalues are
#: accurate to about 1e-16 of the largest, so singular values to about 1e-8).
RANK_TOL = 1e-7


@dataclass(frozen=True)
class PCADirections:
    """Principal directions of a set of checkpoints.

    Attributes:
        directions: k directions keyed like the model's parameters, on the origin's devices
            and dtypes; orthonormal in parameter space unless ``normalization`` rescaled them.
            Pass ``list(pca.directions)`` (and ``origin=pca.origin``) to :func:`evaluate`.
        explained_variance: ``(k,)`` variance along each direction: ``s²/(m − 1)`` centered
            (as sklearn), ``s²/m`` (the mean squared coordinate) uncentered.
        explained_variance_ratio: ``(k,)`` share of the total (``s²/‖X‖²_F``); sums to ≤ 1.
            Both describe the unit directions, before any ``normalization``.
        singular_values: ``(k,)`` singular values ``s`` of the ``(m, n)`` displacement stack.
        origin: the reference's parameters (θ_ref, the origin of the plane).
        reference_index: which checkpoint is the reference (None: a separate state).
        center: whether the rows' mean was removed.
        normalization, ignore: as passed.
        num_checkpoints: m.
    """

    directions: tuple[dict[str, torch.Tensor], ...]
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    singular_values: np.ndarray
    origin: dict[str, torch.Tensor]
    reference_index: int | None
    center: bool
    normalization: Normalization
    ignore: Ignore
    num_checkpoints: int

    def describe(self) -> dict:
        """JSON-able provenance (no tensors)."""
        return {
            "kind": "pca",
            "k": len(self.directions),
            "explained_variance": self.explained_variance.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "singular_values": self.singular_values.tolist(),
            "reference_index": self.reference_index,
            "center": self.center,
            "normalization": self.normalization,
            "ignore": self.ignore,
            "num_checkpoints": self.num_checkpoints,
        }


@dataclass(frozen=True)
class Projection:
    """Checkpoints in the coordinates of a plane (or any k-dimensional subspace).

    Attributes:
        coords: ``(m, k)`` least-squares coordinates ``c`` of ``θᵢ − origin`` in the directions.
        distance: ``(m,)`` ``‖θᵢ − origin − Σⱼ cᵢⱼ dⱼ‖``, each checkpoint's distance from the plane.
        norm: ``(m,)`` ``‖θᵢ − origin‖``.
        explained: ``(m,)`` ``1 − distance²/norm²``: the share of the squared displacement the
            plane explains (1 for a checkpoint at the origin).
    """

    coords: np.ndarray
    distance: np.ndarray
    norm: np.ndarray
    explained: np.ndarray


def pca_directions(
    checkpoints: Sequence[Checkpoint],
    *,
    reference: Reference = "last",
    k: int = 2,
    ignore: Ignore = "biasbn",
    normalization: Normalization = None,
    center: bool = False,
    model: nn.Module | None = None,
    method: Method = "auto",
) -> PCADirections:
    """The first ``k`` principal directions of the checkpoints' displacements from a reference.

    Args:
        checkpoints: m checkpoints in training order: models, or mappings name → tensor
            (state dicts; entries that are not parameters are skipped when the parameter
            names are known from ``model`` or from a model among the checkpoints).
        reference: the origin: ``"last"`` (Li et al.), the index of a checkpoint, or a state.
        k: number of directions (at most the rank of the displacements).
        ignore: ``"biasbn"`` zeroes biases and norm-layer parameters in every displacement
            (and so in the directions), as for random directions; ``None`` keeps them.
        normalization: ``None`` (default: unit directions, coordinates in parameter units),
            or ``"filter"``, ``"layer"``, ``"model"``: each direction rescaled to the origin's
            scale afterwards, as :func:`normalize_direction` does.
        center: remove the rows' mean first (Li et al. / sklearn); see the module docstring.
        model: the architecture, when the checkpoints are state dicts carrying buffers.
        method: ``"gram"`` (m × m Gram matrix, memory of one tensor at a time), ``"svd"``
            (SVD of the ``(m, n)`` float64 stack) or ``"auto"``.

    Returns:
        A :class:`PCADirections`. Each direction's sign makes the checkpoints' coordinates
        grow with their order on average (training runs toward +).

    Raises:
        ConfigurationError: bad options, fewer than two checkpoints, or displacements of
            rank below ``k``.
        ShapeMismatchError: checkpoints of different architectures.

    >>> import torch
    >>> states = [{"w": torch.tensor([[float(i), float(i * i)]])} for i in range(4)]
    >>> pca = pca_directions(states, k=1, ignore=None)
    >>> pca.explained_variance_ratio.round(3).tolist()
    [0.998]
    """
    where = "pca_directions"
    ignore = check_choice("ignore", ignore, IGNORES, where=where)
    normalization = check_choice("normalization", normalization, NORMALIZATIONS, where=where)
    method = check_choice("method", method, METHODS, where=where)
    k = check_positive_int("k", k, where=where)
    if isinstance(checkpoints, (Mapping, nn.Module)) or len(checkpoints) < 2:
        raise ConfigurationError(
            f"{where}: checkpoints must be a sequence of at least two models or state dicts; "
            "give the checkpoints of a training run in order."
        )
    space = _space(checkpoints, model, where)
    states = [_state(c, space, f"{where}: checkpoints[{i}]") for i, c in enumerate(checkpoints)]
    ref_index, ref = _reference(reference, states, space, where)
    m = len(states)
    rows_needed = k + 1 if center else k
    if m < rows_needed:
        raise ConfigurationError(
            f"{where}: k={k} directions need at least {rows_needed} checkpoints"
            f"{' (centering removes one dimension)' if center else ''}, got {m}; lower k or "
            "give more checkpoints."
        )
    specs = [s for s in space.specs if not (ignore == "biasbn" and s.kind != "weight")]
    if not specs:
        raise ConfigurationError(
            f"{where}: ignore='biasbn' leaves no parameters (the model has only biases and "
            "norm-layer parameters); use ignore=None."
        )

    step = max(1, CHUNK_BYTES // (8 * m))

    def block(s: TensorSpec, lo: int, hi: int) -> torch.Tensor:  # (m, hi - lo) float64 displacements
        r = ref[s.name].detach().reshape(-1)[lo:hi].to(torch.float64)
        return torch.stack([st[s.name].detach().reshape(-1)[lo:hi].to(r.device, torch.float64) - r for st in states])

    numel = sum(s.numel for s in specs)
    if method == "svd" or (method == "auto" and m * numel * 8 <= SVD_MAX_BYTES):
        x = torch.cat([block(s, 0, s.numel).cpu() for s in specs], dim=1)
        if center:
            x = x - x.mean(dim=0, keepdim=True)
        u, sv, _ = torch.linalg.svd(x, full_matrices=False)
        total = float(x.pow(2).sum())
        eig = sv.pow(2)
    else:
        gram = torch.zeros(m, m, dtype=torch.float64)
        for s, lo, hi in _chunks(specs, step):
            b = block(s, lo, hi)
            gram += (b @ b.T).cpu()
        if center:
            h = torch.eye(m, dtype=torch.float64) - 1.0 / m
            gram = h @ gram @ h
        total = float(torch.trace(gram))
        eig, u = torch.linalg.eigh(gram)
        eig, u = eig.flip(0).clamp_min(0.0), u.flip(1)
        sv = eig.sqrt()
    sv, eig, u = sv[:k], eig[:k], u[:, :k].contiguous()
    if total <= 0 or float(sv[0]) == 0.0:
        raise ConfigurationError(
            f"{where}: every checkpoint equals the reference{' after centering' if center else ''} "
            "(no displacement); give checkpoints from different training steps."
        )
    rank = int((sv > RANK_TOL * sv[0]).sum())
    if rank < k:
        raise ConfigurationError(
            f"{where}: the displacements span only {rank} dimension(s), so k={k} directions are "
            f"not defined; use k={rank}."
        )
    u = u * _signs(u)
    # direction j = X_cᵀ uⱼ / sⱼ, with X_cᵀ u = Xᵀ (H u) when centered
    coef = (u - u.mean(dim=0, keepdim=True) if center else u) / sv
    directions: list[dict[str, torch.Tensor]] = [
        {s.name: torch.zeros(s.shape, dtype=ref[s.name].dtype, device=ref[s.name].device) for s in space.specs}
        for _ in range(k)
    ]
    for s, lo, hi in _chunks(specs, step):
        v = coef.to(ref[s.name].device).T @ block(s, lo, hi)  # (k, hi - lo)
        for j in range(k):
            directions[j][s.name].view(-1)[lo:hi] = v[j].to(ref[s.name].dtype)
    if normalization is not None:
        directions = [
            normalize_direction(d, ref, normalization=normalization, ignore=ignore) for d in directions
        ]
    eig_np = eig.numpy()
    return PCADirections(
        directions=tuple(directions),
        explained_variance=eig_np / (m - 1 if center else m),
        explained_variance_ratio=eig_np / total,
        singular_values=sv.numpy(),
        origin={n: t.detach().clone() for n, t in ref.items()},
        reference_index=ref_index,
        center=bool(center),
        normalization=normalization,
        ignore=ignore,
        num_checkpoints=m,
    )


def project_trajectory(
    checkpoints: Sequence[Checkpoint],
    origin: Checkpoint,
    directions: Sequence[Mapping[str, torch.Tensor]] | PCADirections,
    *,
    ignore: Ignore = None,
) -> Projection:
    """Coordinates of each checkpoint in the subspace ``origin + span(directions)``.

    Least squares in float64 (the directions need not be orthogonal or normalized): with
    ``A`` the ``(n, k)`` directions and ``δᵢ = θᵢ − origin``, ``cᵢ = argmin ‖A c − δᵢ‖``. Only
    the parameters the directions are keyed by count; other entries of state dicts (buffers)
    are skipped.

    Args:
        checkpoints: m models or state dicts.
        origin: the origin of the plane (a model or a state dict).
        directions: k directions, or a :class:`PCADirections`.
        ignore: ``"biasbn"`` leaves biases and norm-layer parameters out of the displacements
            (distances then measure weights only); ``None`` (default) counts every parameter,
            so a checkpoint whose biases moved is off a plane whose directions have none.

    Returns:
        A :class:`Projection`.

    Raises:
        ConfigurationError: no directions, or linearly dependent ones.
        ShapeMismatchError: a checkpoint or the origin does not fit the directions.

    >>> import torch
    >>> d = [{"w": torch.tensor([1.0, 0.0])}]
    >>> project_trajectory([{"w": torch.tensor([3.0, 4.0])}], {"w": torch.zeros(2)}, d).coords
    array([[3.]])
    """
    where = "project_trajectory"
    ignore = check_choice("ignore", ignore, IGNORES, where=where)
    if isinstance(directions, PCADirections):
        directions = directions.directions
    if isinstance(directions, Mapping) or len(directions) == 0:
        raise ConfigurationError(
            f"{where}: directions must be a non-empty sequence of direction dicts (or a "
            "PCADirections); wrap a single direction in a list."
        )
    if isinstance(checkpoints, (Mapping, nn.Module)) or len(checkpoints) == 0:
        raise ConfigurationError(f"{where}: checkpoints must be a non-empty sequence of models or state dicts.")
    space = _mapping_space(directions[0])
    for j, d in enumerate(directions):
        space.check(d, what=f"{where}: directions[{j}]")
    ref = _state(origin, space, f"{where}: origin")
    states = [_state(c, space, f"{where}: checkpoints[{i}]") for i, c in enumerate(checkpoints)]
    specs = [s for s in space.specs if not (ignore == "biasbn" and s.kind != "weight")]
    k, m = len(directions), len(states)

    step = max(1, CHUNK_BYTES // (8 * (m + k)))

    def blocks(s: TensorSpec, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = ref[s.name].detach().reshape(-1)[lo:hi].to(torch.float64)
        a = torch.stack([d[s.name].detach().reshape(-1)[lo:hi].to(r.device, torch.float64) for d in directions])
        delta = torch.stack([st[s.name].detach().reshape(-1)[lo:hi].to(r.device, torch.float64) - r for st in states])
        return a, delta

    ata = torch.zeros(k, k, dtype=torch.float64)
    atd = torch.zeros(k, m, dtype=torch.float64)
    norm2 = torch.zeros(m, dtype=torch.float64)
    for s, lo, hi in _chunks(specs, step):
        a, delta = blocks(s, lo, hi)
        ata += (a @ a.T).cpu()
        atd += (a @ delta.T).cpu()
        norm2 += delta.pow(2).sum(dim=1).cpu()
    evals = torch.linalg.eigvalsh(ata)
    if float(evals[0]) <= RANK_TOL**2 * max(float(evals[-1]), 0.0) or float(evals[-1]) == 0.0:
        raise ConfigurationError(
            f"{where}: the directions are linearly dependent (or zero"
            f"{' once biases and norm parameters are ignored' if ignore else ''}); give "
            "independent directions."
        )
    coords = torch.linalg.solve(ata, atd).T  # (m, k)
    resid2 = torch.zeros(m, dtype=torch.float64)
    for s, lo, hi in _chunks(specs, step):  # the residual itself: ‖δ‖² − ‖Ac‖² cancels near the plane
        a, delta = blocks(s, lo, hi)
        resid2 += (delta - coords.to(a.device) @ a).pow(2).sum(dim=1).cpu()
    norm2_np, resid2_np = norm2.numpy(), resid2.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        explained = np.where(norm2_np > 0, 1.0 - resid2_np / np.where(norm2_np > 0, norm2_np, 1.0), 1.0)
    return Projection(
        coords=coords.numpy(),
        distance=np.sqrt(resid2_np),
        norm=np.sqrt(norm2_np),
        explained=np.clip(explained, 0.0, 1.0),
    )


# ------------------------------------------------------------------------------- helpers
def _space(checkpoints: Sequence[Checkpoint], model: nn.Module | None, where: str) -> ParameterSpace:
    """Parameter names, shapes and kinds: from ``model``, else a model among the checkpoints,
    else the floating-point entries of the first state dict."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"{where}: model must be an nn.Module, got {type(model).__name__}.")
        return ParameterSpace.from_module(model)
    for c in checkpoints:
        if isinstance(c, nn.Module):
            return ParameterSpace.from_module(c)
    first = checkpoints[0]
    if not isinstance(first, Mapping):
        raise ConfigurationError(
            f"{where}: checkpoints[0] is a {type(first).__name__}; give models or mappings name -> tensor."
        )
    return _mapping_space(first)


def _mapping_space(state: Mapping[str, torch.Tensor]) -> ParameterSpace:
    specs, offset = [], 0
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            kind = "weight" if t.dim() > 1 else "bias"
            specs.append(TensorSpec(name, tuple(t.shape), offset, t.numel(), kind))
            offset += t.numel()
    return ParameterSpace(tuple(specs), offset)


def _state(c: Checkpoint, space: ParameterSpace, what: str) -> dict[str, torch.Tensor]:
    """The entries of ``space`` in checkpoint ``c`` (detached), checked against it."""
    if isinstance(c, nn.Module):
        c = dict(c.named_parameters())
    elif not isinstance(c, Mapping):
        raise ConfigurationError(f"{what} is a {type(c).__name__}; give a model or a mapping name -> tensor.")
    missing = [n for n in space.names if n not in c]
    if missing:
        raise ShapeMismatchError(
            f"{what} lacks parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}; give "
            "checkpoints of one architecture."
        )
    picked = {n: c[n].detach() for n in space.names}
    space.check(picked, what=what)
    return picked


def _reference(
    reference: Reference, states: list[dict[str, torch.Tensor]], space: ParameterSpace, where: str
) -> tuple[int | None, dict[str, torch.Tensor]]:
    if isinstance(reference, str):
        if reference != "last":
            raise ConfigurationError(
                f"{where}: reference={reference!r} is not an option; use 'last', a checkpoint "
                "index or a state dict."
            )
        return len(states) - 1, states[-1]
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        m = len(states)
        if not -m <= int(reference) < m:
            raise ConfigurationError(
                f"{where}: reference={reference} is out of range for {m} checkpoints; give an "
                f"index in [{-m}, {m - 1}]."
            )
        index = int(reference) % m
        return index, states[index]
    if isinstance(reference, (Mapping, nn.Module)):
        return None, _state(reference, space, f"{where}: reference")
    raise ConfigurationError(
        f"{where}: reference is a {type(reference).__name__}; use 'last', an index or a state dict."
    )


def _chunks(specs: Sequence[TensorSpec], step: int) -> Iterator[tuple[TensorSpec, int, int]]:
    """(tensor, start, stop) over every tensor's flat entries, at most ``step`` at a time."""
    for s in specs:
        for lo in range(0, s.numel, step):
            yield s, lo, min(lo + step, s.numel)


def _signs(u: torch.Tensor) -> torch.Tensor:
    """±1 per column of the row coefficients ``u`` ``(m, k)``: coordinates grow with the
    checkpoints' order on average; ties go to the column's largest entry being positive."""
    order = torch.arange(u.shape[0], dtype=torch.float64)
    trend = (order - order.mean()) @ u
    largest = u.gather(0, u.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    tol = 1e-12 * u.abs().sum(dim=0).clamp_min(1e-300)
    sign = torch.where(trend.abs() > tol, trend.sign(), largest.sign())
    return torch.where(sign == 0, torch.ones_like(sign), sign)
