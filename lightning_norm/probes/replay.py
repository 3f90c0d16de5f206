"""Replay one training step's loss at other parameter values, leaving no trace (plain PyTorch).

Probes such as ICS drift (S18 Definition 2.1) and the loss landscape along the gradient (S18
Sec. 3.2) need the loss of *the* training step, and its gradient, at parameter values the model
never held: same batch, same loss function, same random draws (dropout masks, noisy-BN noise),
same precision context. :class:`StepReplay` does that with :func:`torch.func.functional_call`:

- parameters are overridden per call (a mapping from qualified name to tensor); names left out
  use the module's current values, detached. The module is never copied.
- every buffer is passed as a clone, so BatchNorm's running statistics and
  ``num_batches_tracked`` receive the replay's in-place updates on the clones, not the module.
- the random-number generators (torch CPU and every initialised CUDA device, Python ``random``
  and NumPy's global generator) are set to the captured state before each replay, and the
  caller's state is restored afterwards, also when the replay raises.
- gradients come from :func:`torch.autograd.grad` on fresh leaves, so no ``.grad`` is touched.
- optionally, the loss and gradients are averaged across processes (``reduce``), for probes that
  run outside DDP's reducer.
- while a replay's forward pass runs, :func:`is_replaying` is true, so forward hooks that
  measure the real step (``ActivationRecorder``) can ignore the probes' passes.

No Lightning import; :mod:`lightning_norm.callbacks._probe` adapts it to a Trainer.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_norm.errors import LightningNormError

__all__ = [
    "ReplayError",
    "RngState",
    "StepReplay",
    "all_reduce_mean",
    "is_replaying",
    "module_generators",
    "preserved_rng",
    "trainable_parameters",
]

LossFn = Callable[[nn.Module], Tensor]
Reduce = Callable[[list[Tensor]], list[Tensor]]

_replay_state = threading.local()


def is_replaying() -> bool:
    """Whether a :class:`StepReplay` forward pass is running in this thread.

    Monitors that hook the model's forward read it to keep the probes' extra passes (at other
    parameter values) out of the statistics of the real training step.
    """
    return getattr(_replay_state, "depth", 0) > 0


@contextlib.contextmanager
def _replaying() -> Iterator[None]:
    _replay_state.depth = getattr(_replay_state, "depth", 0) + 1
    try:
        yield
    finally:
        _replay_state.depth -= 1


class ReplayError(LightningNormError):
    """A step cannot be replayed (the loss is not a scalar tensor, a name is not a parameter)."""


def _numpy_random() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return None
    return numpy.random


@dataclass(frozen=True)
class RngState:
    """A snapshot of every random-number generator a training step may draw from.

    Holds torch's CPU generator, each CUDA device's generator (only when CUDA is initialised, so
    capturing never initialises CUDA), Python's ``random`` and NumPy's global generator, and,
    when a module is given, every ``torch.Generator`` its submodules hold as attributes (e.g.
    ``NoisyBatchNorm(generator=...)``), so a layer's private noise stream is replayed and
    restored like the global ones.

    Example::

        state = RngState.capture()
        a = torch.rand(3)
        state.restore()
        assert torch.equal(a, torch.rand(3))
    """

    cpu: Tensor
    cuda: tuple[Tensor, ...] | None
    python: Any
    numpy: Any
    generators: tuple[tuple[torch.Generator, Tensor], ...] = ()

    @classmethod
    def capture(cls, module: nn.Module | None = None) -> RngState:
        """The generators' current state (also those held by ``module``'s submodules)."""
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = tuple(torch.cuda.get_rng_state_all())
        np_random = _numpy_random()
        return cls(
            cpu=torch.get_rng_state(),
            cuda=cuda,
            python=random.getstate(),
            numpy=np_random.get_state() if np_random is not None else None,
            generators=tuple((g, g.get_state()) for g in module_generators(module)),
        )

    def restore(self) -> None:
        """Set every generator back to this state."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(list(self.cuda))
        random.setstate(self.python)
        np_random = _numpy_random()
        if self.numpy is not None and np_random is not None:
            np_random.set_state(self.numpy)
        for generator, state in self.generators:
            generator.set_state(state)


def module_generators(module: nn.Module | None) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects held as attributes by ``module``'s submodules."""
    if module is None:
        return []
    found: dict[int, torch.Generator] = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Generator):
                found.setdefault(id(value), value)
    return list(found.values())


@contextlib.contextmanager
def preserved_rng(module: nn.Module | None = None) -> Iterator[RngState]:
    """Run a block and put every random-number generator back as it was, even on an exception.

    ``module``: also preserve the generators its submodules hold (see :class:`RngState`).

    Example::

        with preserved_rng():
            torch.rand(3)  # the caller's stream does not advance
    """
    saved = RngState.capture(module)
    try:
        yield saved
    finally:
        saved.restore()


def trainable_parameters(module: nn.Module) -> dict[str, Tensor]:
    """The module's parameters that require grad, by qualified name (shared ones listed once)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def all_reduce_mean(tensors: list[Tensor]) -> list[Tensor]:
    """Average tensors across the default process group in one collective call.

    The tensors are flattened into one float64 buffer (so the sum loses no digits; the results
    keep each input's dtype), summed with ``all_reduce`` and divided by the world size. With
    equal per-process batch sizes, averaging per-process mean-loss gradients gives the gradient
    of the global batch's mean loss, which is what DDP computes. Every process must call it with
    tensors of the same shapes. Without an initialised process group it returns the tensors
    unchanged.

    Args:
        tensors: tensors on the process group's device.

    Returns:
        New tensors, the average over processes.

    Example::

        loss, *grads = all_reduce_mean([loss, *grads])
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


class _Call(nn.Module):
    """Makes ``loss_fn(module)`` a forward pass, so ``functional_call`` can reparametrize it."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self._loss_fn = loss_fn

    def forward(self) -> Tensor:
        return self._loss_fn(self.module)


class StepReplay:
    """Recomputes one training step's loss (and gradients) at other parameter values.

    Each call sets the random generators to ``rng_state`` (the state the real step started
    with), runs ``compute_loss(module)`` under ``context()`` with the given parameter overrides
    and cloned buffers, and restores the caller's generators. The module's parameters, buffers,
    ``.grad`` fields and the caller's random streams are exactly as before the call.

    Args:
        module: the model (for Lightning, the ``LightningModule`` itself, not a DDP wrapper).
        compute_loss: ``compute_loss(module) -> Tensor``, the step's scalar loss; it must reach
            the parameters through ``module`` (e.g. ``lambda m: F.mse_loss(m(x), y)``).
        rng_state: generator state to replay from, captured before the real step's forward;
            ``None`` captures the current state at construction.
        context: a factory of the context manager the forward runs in (autocast, default
            dtype, log suppression), e.g. Lightning's ``precision_plugin.train_step_context``.
            The backward pass runs outside it, as in a normal training step.
        reduce: averages ``[loss, *grads]`` across processes (e.g. :func:`all_reduce_mean`);
            ``None`` for a single process. Every process must make the same calls.

    Raises:
        ReplayError: a parameter name is unknown, or ``compute_loss`` does not return a scalar
            floating-point tensor (when called).

    Example::

        replay = StepReplay(model, lambda m: F.cross_entropy(m(x), y))
        loss = replay.loss()                               # at the current parameters
        w = {n: p - 0.1 * p.grad for n, p in model.named_parameters()}
        loss, grads = replay.loss_and_grad(w, wrt=["0.weight"])
    """

    def __init__(
        self,
        module: nn.Module,
        compute_loss: LossFn,
        *,
        rng_state: RngState | None = None,
        context: Callable[[], AbstractContextManager[Any]] | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise ReplayError(f"`module` must be an nn.Module, got {type(module).__name__}.")
        if not callable(compute_loss):
            raise ReplayError("`compute_loss` must be a callable `compute_loss(module) -> Tensor`.")
        self.module = module
        self.compute_loss = compute_loss
        self.rng_state = rng_state if rng_state is not None else RngState.capture()
        self.context = context if context is not None else contextlib.nullcontext
        self.reduce = reduce
        self._wrapper = _Call(module, compute_loss)
        self._param_names = {n for n, _ in module.named_parameters()}

    def loss(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """The step's loss with ``params`` overriding the module's parameters (detached).

        Args:
            params: qualified name -> tensor; other parameters keep their current values.

        Returns:
            A 0-dim tensor (averaged across processes when ``reduce`` is set).
        """
        loss, _ = self._run(params, ())
        return loss

    def loss_and_grad(
        self, params: Mapping[str, Tensor] | None = None, wrt: Sequence[str] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and its gradient wrt the parameters named in ``wrt``, at ``params``.

        Args:
            params: qualified name -> tensor; other parameters keep their current values.
            wrt: parameter names to differentiate with respect to; ``None`` means every
                parameter that requires grad. A parameter the loss does not depend on gets a
                zero gradient.

        Returns:
            ``(loss, {name: grad})``, detached, averaged across processes when ``reduce`` is set.
        """
        if wrt is None:
            wrt = list(trainable_parameters(self.module))
        return self._run(params, tuple(wrt))

    def _run(
        self, params: Mapping[str, Tensor] | None, wrt: tuple[str, ...]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        params = dict(params or {})
        unknown = sorted((set(params) | set(wrt)) - self._param_names)
        if unknown:
            raise ReplayError(
                f"Not parameters of the module: {unknown[:5]}. Use names from "
                f"`module.named_parameters()` (e.g. {sorted(self._param_names)[:3]})."
            )
        values: dict[str, Tensor] = {}
        leaves: dict[str, Tensor] = {}
        for name, p in self.module.named_parameters():
            # detach(): a new leaf sharing storage, so neither the module's parameter nor a
            # caller's tensor joins the replay's graph or receives a gradient
            v = params.get(name, p).detach()
            if name in wrt:
                leaves[name] = v.requires_grad_(True)
            values["module." + name] = v
        for name, b in self.module.named_buffers():
            values["module." + name] = b.clone()
        with preserved_rng(self.module):
            self.rng_state.restore()
            with torch.enable_grad(), self.context(), _replaying():
                loss = torch.func.functional_call(self._wrapper, values, ())
        if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.is_floating_point()):
            raise ReplayError(
                "`compute_loss` must return a scalar floating-point tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}."
            )
        grads: list[Tensor] = []
        if wrt:
            order = list(leaves)
            if loss.requires_grad:
                found = torch.autograd.grad(loss, [leaves[n] for n in order], allow_unused=True)
            else:
                found = (None,) * len(order)
            grads = [
                torch.zeros_like(leaves[n]) if g is None else g.detach()
                for n, g in zip(order, found, strict=True)
            ]
            wrt = tuple(order)
        loss = loss.detach()
        if self.reduce is not None:
            loss, *grads = self.reduce([loss, *grads])
        return loss, dict(zip(wrt, grads, strict=True))
