"""Lightning side of the step replay: capture a training step, rebuild its loss, run it silently.

Shared by the probing callbacks (:class:`~lightning_norm.callbacks.ICSDrift`, the loss-landscape
callback). A callback captures the step at ``on_train_batch_start`` (batch, batch index, random
generator state, ``trainer.global_step``) with :func:`capture_step`, and after the optimizer step
builds a :class:`~lightning_norm.probes.replay.StepReplay` with :func:`make_replay`:

- the loss is the module's own ``training_step(batch, batch_idx)`` (a tensor, or a dict with
  ``"loss"``) or a user-given ``loss_fn(module, batch) -> Tensor``;
- the forward runs in the Trainer's precision context
  (``trainer.strategy.precision_plugin.train_step_context()``: autocast for mixed precision,
  float64 default dtype for ``"64-true"``);
- ``self.log``/``self.log_dict`` are silenced during the replay (shadowed on the instance, so
  nothing reaches the loop's result collection, ``trainer.callback_metrics`` or a logger), and
  the state of every ``torchmetrics.Metric`` attribute is restored after it;
- under DDP the probe runs on the bare ``LightningModule`` (outside DDP's reducer, which never
  sees the probe's detached leaves), so the loss and gradients are averaged across processes
  with :func:`~lightning_norm.probes.replay.all_reduce_mean`: the gradient of the global batch.

:func:`check_probe_support` refuses, before the first step, the setups a replay cannot reproduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from lightning_norm.errors import ConfigurationError
from lightning_norm.probes.replay import ReplayError, RngState, StepReplay, all_reduce_mean

__all__ = [
    "StepCapture",
    "capture_step",
    "check_no_accumulation",
    "check_probe_support",
    "make_replay",
    "silenced_logging",
]

UserLossFn = Callable[[nn.Module, Any], Tensor]

# Strategies whose LightningModule does not hold full, unsharded parameters on every process.
_SHARDED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


@dataclass(frozen=True)
class StepCapture:
    """What a replay needs from the real training step, captured before its forward pass.

    Attributes:
        batch: the batch as ``training_step`` receives it (already on the device).
        batch_idx: its index in the epoch.
        rng: the random generators' state at ``on_train_batch_start``.
        step: ``trainer.global_step`` before the step's optimizer update (t in S18's notation).
    """

    batch: Any
    batch_idx: int
    rng: RngState
    step: int


def capture_step(trainer: pl.Trainer, batch: Any, batch_idx: int) -> StepCapture:
    """Capture the step about to run; call it from ``on_train_batch_start``.

    The generator state is read here, so a hook that draws random numbers between this
    callback's ``on_train_batch_start`` and the forward pass (a later callback, the module's own
    ``on_train_batch_start``) would make the replay draw different dropout masks; list probing
    callbacks before such callbacks.
    """
    return StepCapture(
        batch=batch,
        batch_idx=batch_idx,
        rng=RngState.capture(trainer.lightning_module),
        step=trainer.global_step,
    )


def _extract_loss(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise ReplayError(
        "`training_step` returned "
        + ("None (the step was skipped)" if output is None else f"a {type(output).__name__}")
        + " for the probed batch; a probe needs the loss tensor (or a dict with 'loss'). Return "
        "it, or pass `loss_fn=lambda module, batch: ...` to the callback."
    )


def _metric_modules(module: nn.Module) -> list[nn.Module]:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a Lightning dependency
        return []
    return [m for m in module.modules() if isinstance(m, Metric)]


def _clone_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_clone_state(v) for v in value]
    return value


_METRIC_FIELDS = ("_update_count", "_computed", "_forward_cache")


@contextlib.contextmanager
def silenced_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Within the block, ``pl_module.log``/``log_dict`` do nothing and metrics keep their state.

    ``log`` and ``log_dict`` are shadowed by instance attributes (``LightningModule.log_dict``
    goes through ``self.log``; a subclass's own override is shadowed too), removed on exit, also
    on an exception. ``torchmetrics.Metric`` attributes updated inside ``training_step`` get their
    states and counters back on exit.
    """
    saved_attrs = {k: pl_module.__dict__[k] for k in ("log", "log_dict") if k in pl_module.__dict__}
    metrics = _metric_modules(pl_module)
    saved_metrics = [
        (
            m,
            {k: _clone_state(getattr(m, k)) for k in getattr(m, "_defaults", {})},
            {k: m.__dict__[k] for k in _METRIC_FIELDS if k in m.__dict__},
        )
        for m in metrics
    ]

    def _no_log(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.__dict__["log"] = _no_log
    pl_module.__dict__["log_dict"] = _no_log
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            pl_module.__dict__.pop(k, None)
        pl_module.__dict__.update(saved_attrs)
        for m, states, fields in saved_metrics:
            for k, v in {**states, **fields}.items():
                setattr(m, k, v)


def make_replay(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    capture: StepCapture,
    loss_fn: UserLossFn | None = None,
) -> StepReplay:
    """A :class:`StepReplay` of the captured step, as the Trainer ran it.

    Args:
        trainer: the running Trainer (its precision plugin and world size are used).
        pl_module: the LightningModule (not the DDP wrapper).
        capture: from :func:`capture_step` at this step's ``on_train_batch_start``.
        loss_fn: ``loss_fn(module, batch) -> Tensor`` to use instead of ``training_step``.

    Returns:
        A replay whose ``loss``/``loss_and_grad`` give the global-batch loss and gradients (the
        average over DDP processes), with logging silenced and the precision context on.

    Example::

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            replay = make_replay(trainer, pl_module, self._capture)
            loss, grads = replay.loss_and_grad(wrt=["net.0.weight"])
    """
    batch, batch_idx = capture.batch, capture.batch_idx
    if loss_fn is not None:

        def compute_loss(module: nn.Module) -> Tensor:
            return loss_fn(module, batch)
    else:

        def compute_loss(module: nn.Module) -> Tensor:
            return _extract_loss(module.training_step(batch, batch_idx))

    precision = trainer.strategy.precision_plugin

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with silenced_logging(pl_module), precision.train_step_context():
            yield

    reduce = all_reduce_mean if trainer.world_size > 1 else None
    return StepReplay(
        pl_module, compute_loss, rng_state=capture.rng, context=context, reduce=reduce
    )


def check_no_accumulation(trainer: pl.Trainer, who: str) -> None:
    """Refuse gradient accumulation; also call from ``on_train_batch_start``, because a
    ``GradientAccumulationScheduler`` changes ``trainer.accumulate_grad_batches`` mid-fit.

    Raises:
        ConfigurationError: ``trainer.accumulate_grad_batches`` is not 1.
    """
    if trainer.accumulate_grad_batches != 1:
        raise ConfigurationError(
            f"{who} replays one batch per optimizer step, but `accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}` (the Trainer's, or set by a "
            f"GradientAccumulationScheduler) spreads a step over several batches. Use "
            f"`Trainer(accumulate_grad_batches=1)` (a larger batch size instead) while probing."
        )


def check_probe_support(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> None:
    """Refuse setups a step replay cannot reproduce; call from ``setup`` and ``on_fit_start``.

    Refused: manual optimization, gradient accumulation, a ``training_step`` taking
    ``dataloader_iter``, sharded strategies (FSDP, DeepSpeed, model parallel, XLA) and, once the
    optimizers exist (``on_fit_start``), several optimizers.

    Raises:
        ConfigurationError: with the setting to change.
    """
    if not pl_module.automatic_optimization:
        raise ConfigurationError(
            f"{who} needs automatic optimization (one optimizer step per training batch) to know "
            "which update a step applied; this module sets `automatic_optimization = False`. "
            f"Remove {who} or use automatic optimization."
        )
    check_no_accumulation(trainer, who)
    if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
        raise ConfigurationError(
            f"{who} replays the batch `training_step` received, but this `training_step` takes "
            "`dataloader_iter` and fetches its own batches. Use `training_step(batch, batch_idx)`."
        )
    strategy = type(trainer.strategy).__name__
    if any(s in strategy for s in _SHARDED_STRATEGIES):
        raise ConfigurationError(
            f"{who} needs the full parameters on every process; {strategy} shards them. Use "
            "`strategy='ddp'` (or 'ddp_spawn') or a single device while probing."
        )
    if len(trainer.optimizers) > 1:
        raise ConfigurationError(
            f"{who} supports one optimizer; configure_optimizers returned "
            f"{len(trainer.optimizers)}. Probe a model with a single optimizer (use parameter "
            "groups for different learning rates)."
        )
