"""ICSDrift: S18's internal covariate shift (gradient drift, Definition 2.1) while training."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_norm.callbacks._base import Measurement, MonitorCallback, ScheduleOptions
from lightning_norm.callbacks._probe import (
    StepCapture,
    capture_step,
    check_no_accumulation,
    check_probe_support,
    make_replay,
)
from lightning_norm.errors import ConfigurationError, SelectionError
from lightning_norm.probes.ics import ics_drift
from lightning_norm.selection import WEIGHT_LAYER_TYPES, LayerSelection

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger(__name__)


def _step_loss(outputs: Any) -> Tensor | None:
    """The loss the training step returned, as ``on_train_batch_end`` receives it, or None."""
    real = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return real if isinstance(real, Tensor) else None


class ICSDrift(MonitorCallback):
    """Logs each selected layer's gradient drift ``||G - G'||`` and ``cos(G, G')`` (S18 Def. 2.1).

    On a due step t, with the step's batch (x_t, y_t), for each selected layer i:
    ``G = grad_{W_i} L(W^t)`` and ``G' = grad_{W_i} L(W^{t+1}_{<i}, W^t_{>=i})``, where
    ``W^{t+1}`` is the update the Trainer's optimizer actually applied (learning rate, momentum,
    Adam moments, weight decay, clipping and schedule included) and "< i" means the modules whose
    forward started before layer i's in the step (recorded by hooks). Both gradients are
    recomputed by replaying the step (:mod:`lightning_norm.probes.replay`): same batch, same
    ``training_step`` (or ``loss_fn``), same dropout/noise draws, same precision context, with
    ``self.log`` silenced; they are the raw loss gradients (before clipping, which only shapes
    the update). Under DDP both are the gradients of the global batch. The model, its buffers,
    ``.grad``, the optimizer and the random streams are exactly as without the callback.

    Cost per due step: one forward+backward for G plus one per selected layer (the first layer
    in the forward has nothing before it: G' = G, no pass). Extra memory: one copy of the
    trainable parameters (W^t, taken before the optimizer step and freed after the probe) plus
    the selected layers' gradients during the probe.

    Logged metrics (``step`` = ``trainer.global_step`` before the update, i.e. t):

    - ``ics/<layer>/l2``: ``||G - G'||_2`` (loss units per parameter unit);
    - ``ics/<layer>/cosine``: ``cos(G, G')`` (NaN if a gradient is zero);
    - ``ics/<layer>/relative``: ``||G - G'||_2 / ||G||_2`` (only with ``relative=True``).

    Args:
        layers: the layers to probe: a :class:`~lightning_norm.selection.LayerSelection`, a
            qualified module name (relative to the LightningModule, e.g. ``"net.0"``) or a list
            of names. ``None``: every Conv/Linear layer. A layer's G concatenates all trainable
            parameters in its subtree.
        relative: also log ``ics/<layer>/relative``.
        loss_fn: ``loss_fn(module, batch) -> Tensor`` to use instead of ``training_step``.
        **schedule: :class:`~lightning_norm.callbacks._base.MonitorCallback`'s
            ``every_n_steps`` (probe every N optimizer steps), ``log_spaced`` (double the
            interval every octave of steps) and ``points_per_octave``.

    Raises:
        ConfigurationError: bad schedule, ``layers`` or ``loss_fn`` (construction); manual
            optimization, gradient accumulation or a sharded strategy (``setup``); several
            optimizers (``on_fit_start``); accumulation turned on mid-fit by a
            ``GradientAccumulationScheduler`` (the first batch it applies to).
        SelectionError: a layer name does not exist or a layer owns no trainable parameter
            (``setup``); a layer does not run in the forward pass (first probe).

    Example::

        trainer = L.Trainer(callbacks=[ICSDrift(layers=["net.8", "net.16"], every_n_steps=10)])
    """

    def __init__(
        self,
        layers: LayerSelection | str | Sequence[str] | None = None,
        *,
        relative: bool = False,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        **schedule: Unpack[ScheduleOptions],
    ) -> None:
        names: tuple[str, ...] | None = None
        if isinstance(layers, str):
            names = (layers,)
        elif layers is not None and not isinstance(layers, LayerSelection):
            if not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
                raise ConfigurationError(
                    f"`layers` must be a LayerSelection, a module name or a list of module names, "
                    f"got {layers!r}. Pass e.g. layers=['net.0', 'net.4']."
                )
            names = tuple(layers)
            if not names:
                raise ConfigurationError("`layers` is empty; give at least one module name.")
        super().__init__(layers=None if names is not None else layers, **schedule)
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigurationError(
                f"`loss_fn` must be a callable `loss_fn(module, batch) -> Tensor`, got {loss_fn!r}."
            )
        self.names = names
        self.relative = bool(relative)
        self.loss_fn = loss_fn
        self.probes_run = 0
        self.last_step: int | None = None
        #: the metrics of the latest probe (tensors), as logged
        self.last_metrics: dict[str, Tensor] = {}
        self._capture: StepCapture | None = None
        self._before: dict[str, Tensor] | None = None
        self._warned_mismatch = False

    # -- configuration -------------------------------------------------------------------------
    def default_selection(self) -> LayerSelection:
        """Every Conv/Linear layer (the modules owning the model's weights)."""
        return LayerSelection(types=WEIGHT_LAYER_TYPES)

    def state_key_settings(self) -> dict[str, Any]:
        settings = super().state_key_settings()
        settings.update(layers=repr(self.names or self.selection), relative=self.relative)
        return settings

    def resolve_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        if self.names is None:
            layers = super().resolve_layers(model)
        else:
            modules = dict(model.named_modules())
            unknown = [n for n in self.names if n not in modules]
            if unknown:
                weight = [n for n, m in modules.items() if isinstance(m, WEIGHT_LAYER_TYPES)]
                raise SelectionError(
                    f"ICSDrift layers {unknown} are not modules of the LightningModule. Use "
                    f"qualified names relative to it, e.g. {weight[:8]}."
                )
            layers = [(n, modules[n]) for n in dict.fromkeys(self.names)]
        empty = [n for n, m in layers if not any(p.requires_grad for p in m.parameters())]
        if empty:
            raise SelectionError(
                f"ICSDrift layers {empty} own no trainable parameter, so they have no gradient "
                "to drift. Select Conv/Linear (or other weight) layers."
            )
        return layers

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_probe_support(trainer, pl_module, "ICSDrift")
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        check_probe_support(trainer, pl_module, "ICSDrift")

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_no_accumulation(trainer, "ICSDrift")
        self._capture = self._before = None
        if self.is_due(trainer.global_step):
            self._capture = capture_step(trainer, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if self._capture is not None:
            # W^t, read after backward and before clipping/step: exactly what the step starts from
            self._before = {
                n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad
            }

    def measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any
    ) -> Measurement | None:
        capture, before = self._capture, self._before
        self._capture = self._before = None
        if capture is None or before is None:
            return None  # not due, or no optimizer step ran
        if self.loss_fn is None and _step_loss(outputs) is None:
            return None  # training_step returned None: Lightning skipped the step, no replay
        replay = make_replay(trainer, pl_module, capture, self.loss_fn)
        result = ics_drift(replay, before, [n for n, _ in self.layers])
        del before
        self._check_replay(trainer, outputs, result.loss)
        metrics: dict[str, Tensor] = {}
        for name, drift in result.layers.items():
            metrics[f"ics/{name}/l2"] = drift.l2
            metrics[f"ics/{name}/cosine"] = drift.cosine
            if self.relative:
                metrics[f"ics/{name}/relative"] = drift.relative
        self.probes_run += 1
        self.last_step = capture.step
        self.last_metrics = metrics
        values = [v.detach().float().reshape(1) for v in metrics.values()]
        return Measurement(capture.step, list(metrics), torch.cat(values or [torch.zeros(0)]))

    def _check_replay(self, trainer: L.Trainer, outputs: Any, replayed: Tensor) -> None:
        """Warn once if the replayed loss at W^t differs from the real step's (single process)."""
        real = _step_loss(outputs)
        if self._warned_mismatch or self.loss_fn is not None or trainer.world_size > 1:
            return
        if real is None:
            return
        real64, rep64 = real.detach().double(), replayed.double()
        if not torch.isclose(real64, rep64, rtol=1e-4, atol=1e-6):
            self._warned_mismatch = True
            log.warning(
                "ICSDrift: the replayed loss at W^t (%.6g) differs from the training step's "
                "(%.6g): the step is not reproducible (a callback or hook drawing random "
                "numbers after ICSDrift's on_train_batch_start, or state changed by the forward). "
                "List ICSDrift after such callbacks.",
                float(rep64),
                float(real64),
            )

    def release(self) -> None:
        super().release()
        self._capture = self._before = None

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"probes_run": self.probes_run, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probes_run = int(state_dict.get("probes_run", 0))
        self.last_step = state_dict.get("last_step")
