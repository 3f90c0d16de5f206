"""The loss landscape along the gradient (S18 Sec. 3.2, App. A.2.2, Fig. 4), in plain PyTorch.

Written against an oracle ``loss_and_grad(params) -> (loss, {name: grad})`` that evaluates the
training loss and its gradient on one fixed batch (same RNG replay, same autocast) with the
parameters replaced by ``params`` (name -> tensor): for a Lightning training step
:class:`~lightning_norm.probes.replay.StepReplay`'s ``loss_and_grad``; for any differentiable
closure ``loss_fn(params) -> loss``, :func:`autograd_loss_and_grad`.

At parameters ``w`` with gradient ``g = grad L(w)``, for every step length ``eta`` of a grid,
the probe point is ``w_eta = w - eta * s * g`` (``s`` an optional per-parameter multiplier,
1 by default, used to follow per-group learning rates) and:

- loss variation: ``L(w_eta)``; its spread ``min..max`` over the grid (units of the loss);
- gradient predictiveness: ``||grad L(w) - grad L(w_eta)||_2`` (loss per parameter unit);
- effective beta-smoothness: ``max_eta ||grad L(w) - grad L(w_eta)||_2 / ||eta * s * g||_2``
  (loss per squared parameter unit).

Cost per probe: one forward and one backward per grid point. Memory: the probe point (one
parameter-sized copy) and its gradient (one more, transient); the parameters are never written.

Grid points whose loss or gradient is not finite (a step far beyond the stable learning rate)
are *diverged*: counted in ``nonfinite`` and left out of every statistic, never raised.

Also here: loss slices along (filter-normalized random) directions, ``L(w + a d1 + b d2)``, one
forward per point under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_norm.errors import ConfigurationError

LossFn = Callable[[Mapping[str, Tensor]], Tensor]
LossAndGrad = Callable[[Mapping[str, Tensor]], tuple[Tensor, Mapping[str, Tensor]]]
Reduce = Callable[[list[Tensor]], list[Tensor]]
Spacing = Literal["linear", "log"]

#: The metric names :meth:`GradientLandscape.summary` returns (logged as ``landscape/total/<m>``).
SUMMARY_METRICS = (
    "loss_min",
    "loss_max",
    "loss_range",
    "grad_pred_max",
    "grad_pred_mean",
    "beta_eff",
    "nonfinite",
)


def _positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"`{name}` must be a positive number, got {value!r}.")
    if not math.isfinite(value):
        raise ConfigurationError(f"`{name}` must be finite, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class EtaGrid:
    """The step lengths ``eta`` a probe evaluates, relative to the learning rate or absolute.

    ``num`` points from ``low`` to ``high`` (both included), evenly spaced (``"linear"``) or
    evenly spaced in ``log(eta)`` (``"log"``). With ``relative=True`` (default) the points are
    multiples of the learning rate: ``eta_i = lr * m_i``; with ``relative=False`` they are
    absolute step lengths (units of parameter per unit of gradient, like a learning rate).
    The default is S18's VGG range: 8 points over ``[1/2, 4] x lr``; S18 uses
    ``[1/100, 30] x lr`` for the deep linear network (``EtaGrid(0.01, 30, spacing="log")``).

    Args:
        low: the smallest point (> 0).
        high: the largest point (>= low).
        num: number of points (>= 1; with 1 point only ``low`` is used).
        spacing: ``"linear"`` or ``"log"``.
        relative: multiply by the learning rate at the probe.

    Raises:
        ConfigurationError: a bound is not a positive finite number, ``high < low``, ``num`` is
            not a positive int, or ``spacing`` is unknown.

    Example::

        EtaGrid(0.5, 4.0, 8).etas(lr=0.1)  # [0.05, 0.1, ..., 0.4]
    """

    low: float = 0.5
    high: float = 4.0
    num: int = 8
    spacing: Spacing = "linear"
    relative: bool = True

    def __post_init__(self) -> None:
        low = _positive_number("low", self.low)
        high = _positive_number("high", self.high)
        if high < low:
            raise ConfigurationError(
                f"The eta range must satisfy low <= high, got low={low}, high={high}; swap them."
            )
        if isinstance(self.num, bool) or not isinstance(self.num, int) or self.num < 1:
            raise ConfigurationError(
                f"`num` (grid points) must be a positive int, got {self.num!r}."
            )
        if self.spacing not in ("linear", "log"):
            raise ConfigurationError(f"`spacing` must be 'linear' or 'log', got {self.spacing!r}.")

    def points(self) -> list[float]:
        """The grid before scaling by the learning rate (multipliers when ``relative``)."""
        if self.num == 1:
            return [float(self.low)]
        if self.spacing == "log":
            lo, hi = math.log(self.low), math.log(self.high)
            return [math.exp(lo + (hi - lo) * i / (self.num - 1)) for i in range(self.num)]
        return [self.low + (self.high - self.low) * i / (self.num - 1) for i in range(self.num)]

    def etas(self, lr: float = 1.0) -> list[float]:
        """The step lengths at learning rate ``lr`` (ignored when not ``relative``)."""
        scale = lr if self.relative else 1.0
        return [scale * m for m in self.points()]


def _acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _sq_norm_of(tensors: Iterable[Tensor], dtype: torch.dtype) -> Tensor:
    """Squared L2 norm of the concatenation, consuming one tensor at a time."""
    total: Tensor | None = None
    for t in tensors:
        sq = torch.linalg.vector_norm(t, dtype=dtype) ** 2
        total = sq if total is None else total + sq
    return total if total is not None else torch.zeros((), dtype=dtype)


@dataclass(frozen=True)
class GradientLandscape:
    """The loss and gradient along ``-g`` at each grid point (tensors on the loss's device).

    Attributes:
        etas: the step lengths ``eta`` (host floats).
        losses: ``L(w - eta s g)`` per point, shape ``(K,)``.
        grad_diff: ``||grad L(w) - grad L(w - eta s g)||_2`` per point.
        step_norm: ``||eta s g||_2`` per point (parameter units).
        beta: ``grad_diff / step_norm`` per point.
        finite: whether the point's loss and gradient are finite (not diverged).
    """

    etas: list[float]
    losses: Tensor
    grad_diff: Tensor
    step_norm: Tensor
    beta: Tensor
    finite: Tensor

    def summary(self) -> dict[str, Tensor]:
        """The S18 Fig. 4 statistics over the finite points (NaN when none is finite).

        ``loss_min``, ``loss_max``, ``loss_range = loss_max - loss_min``, ``grad_pred_max``,
        ``grad_pred_mean`` (of ``grad_diff``), ``beta_eff`` (max of ``beta`` over points with a
        non-zero step) and ``nonfinite`` (number of diverged points). All 0-d tensors on the
        loss's device; no host sync.
        """
        ok = self.finite
        any_ok = ok.any()
        nan = torch.full_like(self.losses, float("nan"))
        inf = torch.full_like(self.losses, float("inf"))

        def masked(values: Tensor, mask: Tensor, fn: str) -> Tensor:
            has = mask.any()
            if fn == "min":
                out = torch.where(mask, values, inf).min()
            elif fn == "max":
                out = torch.where(mask, values, -inf).max()
            else:
                count = mask.sum().clamp_min(1).to(values.dtype)
                out = torch.where(mask, values, torch.zeros_like(values)).sum() / count
            return torch.where(has, out, nan[0])

        loss_min = masked(self.losses, ok, "min")
        loss_max = masked(self.losses, ok, "max")
        beta_ok = ok & (self.step_norm > 0)
        return {
            "loss_min": loss_min,
            "loss_max": loss_max,
            "loss_range": torch.where(any_ok, loss_max - loss_min, nan[0]),
            "grad_pred_max": masked(self.grad_diff, ok, "max"),
            "grad_pred_mean": masked(self.grad_diff, ok, "mean"),
            "beta_eff": masked(self.beta, beta_ok, "max"),
            "nonfinite": (~ok).sum().to(self.losses.dtype),
        }


def autograd_loss_and_grad(loss_fn: LossFn, reduce: Reduce | None = None) -> LossAndGrad:
    """A ``loss_and_grad`` oracle from a differentiable closure ``loss_fn(params) -> loss``.

    The returned function evaluates ``loss_fn`` at fresh leaves equal to ``params`` (no copy of
    the values, never written) and returns ``(loss, {name: grad})`` from one forward and one
    backward (:func:`torch.autograd.grad`, so no ``.grad`` is touched), averaged over processes
    by ``reduce`` when given. :class:`~lightning_norm.probes.replay.StepReplay`'s
    ``loss_and_grad`` is the same kind of oracle for a Lightning training step.

    Args:
        loss_fn: ``params -> scalar loss`` (deterministic on a fixed batch).
        reduce: mean over processes of a list of tensors, returning new ones (DDP:
            :func:`~lightning_norm.probes.replay.all_reduce_mean`), or ``None``.

    Returns:
        ``loss_and_grad(params) -> (loss, grads)``; a parameter the loss does not use gets zeros.

    Example::

        oracle = autograd_loss_and_grad(lambda p: F.mse_loss(functional_call(net, p, (x,)), y))
        loss, grads = oracle({n: p.detach() for n, p in net.named_parameters()})
    """

    def loss_and_grad(params: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        names = list(params)
        leaves = [params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            loss = loss_fn(dict(zip(names, leaves, strict=True))).reshape(())
            found = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [
            torch.zeros_like(x) if q is None else q for x, q in zip(leaves, found, strict=True)
        ]
        loss = loss.detach()
        if reduce is not None:
            loss, *grads = reduce([loss, *grads])
        return loss, dict(zip(names, grads, strict=True))

    return loss_and_grad


def gradient_landscape(
    loss_and_grad: LossAndGrad,
    params: Mapping[str, Tensor],
    grad: Mapping[str, Tensor],
    etas: Sequence[float],
    scale: Mapping[str, float] | None = None,
) -> GradientLandscape:
    """Loss, gradient predictiveness and effective smoothness along ``-g`` (S18 Fig. 4).

    For each ``eta``: ``w_eta = w - eta * s * g``; ``L(w_eta)`` and ``grad L(w_eta)`` from one
    call of ``loss_and_grad`` (one forward and one backward); ``grad_diff = ||g - grad
    L(w_eta)||_2``, ``step_norm = ||eta s g||_2``, ``beta = grad_diff / step_norm``. Norms are
    taken over all parameters together (accumulated in float32, or float64 when a parameter is
    float64). Parameters are never written; the probe point is a fresh tensor per parameter.

    Args:
        loss_and_grad: ``params -> (loss, {name: grad})`` on the probed batch, deterministic
            (same RNG replay) and describing the global batch under DDP: a
            :class:`~lightning_norm.probes.replay.StepReplay`'s ``loss_and_grad`` or
            :func:`autograd_loss_and_grad`.
        params: name -> parameter tensor ``w`` (the parameters that move; others stay put).
        grad: name -> ``grad L(w)`` (the step's own gradient); a missing name counts as zero.
        etas: the step lengths.
        scale: name -> multiplier ``s`` of the step for that parameter (per-group learning rates
            relative to the reference one); missing names use 1.

    Returns:
        :class:`GradientLandscape`.

    Raises:
        ConfigurationError: ``etas`` is empty, or ``grad`` has a name ``params`` lacks, or a
            gradient's shape differs from its parameter's.

    Example::

        def loss_fn(p):
            return F.cross_entropy(torch.func.functional_call(net, p, (x,)), y)

        oracle = autograd_loss_and_grad(loss_fn)
        w = {n: p.detach() for n, p in net.named_parameters()}
        _, g = oracle(w)
        res = gradient_landscape(oracle, w, g, EtaGrid().etas(lr=0.1))
        res.summary()["beta_eff"]
    """
    if len(etas) == 0:
        raise ConfigurationError("`etas` is empty; give at least one step length.")
    extra = set(grad) - set(params)
    if extra:
        raise ConfigurationError(f"`grad` has names that are not parameters: {sorted(extra)}.")
    names = list(params)
    scale = scale or {}
    w = [params[n].detach() for n in names]
    g = [grad[n].detach() if n in grad else torch.zeros_like(params[n]) for n in names]
    for n, wi, gi in zip(names, w, g, strict=True):
        if wi.shape != gi.shape:
            raise ConfigurationError(
                f"The gradient of `{n}` has shape {tuple(gi.shape)}, the parameter "
                f"{tuple(wi.shape)}."
            )
    acc = _acc_dtype(w)
    # Norms accumulate tensor by tensor, so no second parameter-sized buffer is ever held.
    dir_norm = _sq_norm_of(((gi * scale.get(n, 1.0)) for n, gi in zip(names, g, strict=True)), acc)
    dir_norm = dir_norm.sqrt()

    losses, diffs, step_norms = [], [], []
    # A diverged probe must not trip the user's anomaly detection and stop training.
    with torch.autograd.set_detect_anomaly(False):
        for eta in etas:
            point = {
                n: wi - (eta * scale.get(n, 1.0)) * gi
                for n, wi, gi in zip(names, w, g, strict=True)
            }
            loss, grads = loss_and_grad(point)
            del point
            diffs.append(
                _sq_norm_of((gi - grads[n] for n, gi in zip(names, g, strict=True)), acc).sqrt()
            )
            del grads
            losses.append(loss.detach().reshape(()).to(acc))
            step_norms.append(abs(eta) * dir_norm)
    loss_t = torch.stack(losses)
    diff_t = torch.stack(diffs).to(loss_t.device)
    step_t = torch.stack(step_norms).to(loss_t.device)
    beta = diff_t / step_t
    finite = torch.isfinite(loss_t) & torch.isfinite(diff_t)
    return GradientLandscape(list(map(float, etas)), loss_t, diff_t, step_t, beta, finite)


def loss_slice(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coords: Sequence[Sequence[float]],
) -> Tensor:
    """``L(w + a_1 d_1 + ... + a_k d_k)`` on the grid of coordinates ``coords`` (no gradients).

    A 1-D slice is ``directions=[d]``, ``coords=[alphas]`` -> shape ``(A,)``; a 2-D slice is
    ``[d1, d2]``, ``[alphas, betas]`` -> shape ``(A, B)`` with ``out[i, j] = L(w + alphas[i] d1 +
    betas[j] d2)``. Cost: one forward per grid point. Memory: the point (one parameter copy).
    Non-finite losses are kept as they are (inf/NaN).

    Args:
        loss_fn: ``params -> scalar loss`` on a fixed batch (for DDP, already the global-batch
            mean, as :class:`~lightning_norm.probes.replay.StepReplay`'s ``loss`` is).
        params: name -> parameter tensor ``w``.
        directions: one mapping name -> direction per axis (names missing from a direction do
            not move along it).
        coords: one sequence of coordinates per axis.

    Returns:
        Tensor of losses with one dimension per direction (on the loss's device).

    Raises:
        ConfigurationError: ``directions`` and ``coords`` differ in length or are empty, or an
            axis has no coordinates.

    Example::

        d = filter_normalized_direction(w, gen)
        losses = loss_slice(loss_fn, w, [d], [torch.linspace(-1, 1, 21).tolist()])
    """
    if not directions or len(directions) != len(coords):
        raise ConfigurationError(
            f"Give one coordinate list per direction; got {len(directions)} direction(s) and "
            f"{len(coords)} coordinate list(s)."
        )
    if any(len(c) == 0 for c in coords):
        raise ConfigurationError("Every slice axis needs at least one coordinate.")
    names = list(params)
    w = {n: params[n].detach() for n in names}
    shape = [len(c) for c in coords]
    values = []
    with torch.no_grad():
        for flat in range(math.prod(shape)):
            idx = []
            rest = flat
            for size in reversed(shape):
                idx.append(rest % size)
                rest //= size
            idx.reverse()
            point = {}
            for n in names:
                p = w[n]
                for axis, d in enumerate(directions):
                    if n in d:
                        p = p + coords[axis][idx[axis]] * d[n]
                point[n] = p
            values.append(loss_fn(point).detach().reshape(()))
    return torch.stack(values).reshape(shape)
