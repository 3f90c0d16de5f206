"""A small base for lightning_norm's monitoring callbacks: when, on what, and where to write.

Every monitor shares the same four chores, and :class:`MonitorCallback` does them once:

* **schedule** -- a :class:`~lightning_norm.schedule.StepSchedule` built from ``every_n_steps``,
  ``log_spaced`` and ``points_per_octave`` (checked at construction);
* **selection** -- a :class:`~lightning_norm.selection.LayerSelection` resolved against the
  LightningModule in ``setup("fit")``, so a bad type or a glob that matches nothing fails before
  the first step; the result is ``self.layers``, a list of ``(qualified_name, module)``;
* **sink** -- a :class:`~lightning_norm.sink.LogSink` over ``trainer.loggers`` (``self.sink``),
  created in ``setup``; :meth:`log_scalars` writes through it at a given step;
* **state** -- ``state_key`` built from :meth:`state_key_settings`, so two instances with
  different settings coexist in one Trainer and each restores its own ``state_dict``.

**When**: :meth:`on_train_batch_end` asks :meth:`measure` for what the batch that just ended
completes (a :class:`Measurement`: a step, names and one device vector of values, histograms)
and writes it; subclasses only say how to measure. Subclasses take the four settings above as
``**options`` (:class:`MonitorOptions`) and pass them on to :class:`MonitorCallback`.

It also owns the forward/backward hook handles: subclasses append the handles they register to
``self._handles`` and override :meth:`release` for any other per-fit state; :meth:`release` runs at
``on_fit_end``, ``teardown`` and ``on_exception`` (KeyboardInterrupt included, which Lightning
routes through ``on_exception`` without calling ``teardown``), so nothing leaks into a later
``validate``/``test``/``predict`` or a second ``fit``.

Subclass recipe::

    class MyMonitor(MonitorCallback):
        def __init__(self, *, my_setting=1, **options: Unpack[MonitorOptions]):
            super().__init__(**options)

        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)  # final layer resolution
            for name, module in self.layers:
                self._handles.append(module.register_forward_hook(...))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.step = trainer.global_step  # the optimizer step this batch makes

        def measure(self, trainer, pl_module, outputs):
            if not self.is_due(self.step):
                return None
            return Measurement(self.step, ["my_group/total/metric"], value.reshape(1))

(``Unpack`` from ``typing_extensions``, under ``TYPE_CHECKING``, lets type checkers and IDEs see
the keywords.)

Only the ``fit`` stage is monitored: ``setup`` for ``validate``/``test``/``predict`` does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_norm.errors import ConfigurationError
from lightning_norm.schedule import StepSchedule
from lightning_norm.selection import LayerSelection
from lightning_norm.sink import Histogram, LogSink


class ScheduleOptions(TypedDict, total=False):
    """The schedule keywords of :class:`MonitorCallback`, for a subclass's ``**options``."""

    every_n_steps: int
    log_spaced: bool
    points_per_octave: int


class MonitorOptions(ScheduleOptions, total=False):
    """All keywords of :class:`MonitorCallback`: the schedule and ``layers``."""

    layers: LayerSelection | None


@dataclass
class Measurement:
    """What a monitor measured at one step, to be written in one go.

    Attributes:
        step: the x-axis value (``trainer.global_step`` of the measured step).
        names: the scalar metric names, ``values[i]`` is logged under ``names[i]``.
        values: one device vector (moved to the host in one transfer).
        histograms: full metric name -> a :class:`~lightning_norm.sink.Histogram` or a tensor
            (TensorBoard and W&B only).
    """

    step: int
    names: list[str]
    values: Tensor
    histograms: dict[str, Histogram | Tensor] = field(default_factory=dict)


class MonitorCallback(Callback):
    """Base of lightning_norm's monitoring callbacks: schedule, layer selection, sink, state key.

    Args:
        every_n_steps: measure every N optimizer steps (``trainer.global_step``), N >= 1.
        log_spaced: double the interval every octave of steps (dense early, sparse late).
        points_per_octave: measurements per doubling of the step count when ``log_spaced``.
        layers: which modules to look at; ``None`` uses :meth:`default_selection`.

    Raises:
        ConfigurationError: a schedule setting is not a positive integer, or ``layers`` is not a
            :class:`~lightning_norm.selection.LayerSelection` (at construction).
        SelectionError: the selection matches no module of the LightningModule (at ``setup``).

    Example::

        class Counter(MonitorCallback):
            def measure(self, trainer, pl_module, outputs):
                step = trainer.global_step
                if self.is_due(step):
                    return Measurement(step, ["count/total"], torch.tensor([len(self.layers)]))
                return None
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 1,
        log_spaced: bool = False,
        points_per_octave: int = 10,
        layers: LayerSelection | None = None,
    ) -> None:
        super().__init__()
        self.schedule = StepSchedule(every_n_steps, log_spaced, points_per_octave)
        if layers is not None and not isinstance(layers, LayerSelection):
            raise ConfigurationError(
                f"`layers` must be a lightning_norm.LayerSelection or None, got {layers!r}. "
                f"Pass e.g. layers=LayerSelection(include='features.*')."
            )
        self.selection = layers
        self.layers: list[tuple[str, nn.Module]] = []
        self.sink: LogSink | None = None
        self.is_global_zero = True
        self._handles: list[RemovableHandle] = []

    # -- configuration -------------------------------------------------------------------------
    def default_selection(self) -> LayerSelection:
        """The selection used when ``layers=None`` (norm layers, else Conv/Linear)."""
        return LayerSelection()

    def state_key_settings(self) -> dict[str, Any]:
        """The settings that tell two instances apart in a checkpoint; extend in subclasses."""
        return {
            "every_n_steps": self.schedule.every_n_steps,
            "log_spaced": self.schedule.log_spaced,
            "layers": repr(self.selection),
        }

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_settings())

    def resolve_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Resolve the selection on ``model`` (raises ``SelectionError`` if nothing matches)."""
        selection = self.selection if self.selection is not None else self.default_selection()
        return selection.resolve(model)

    def is_due(self, step: int) -> bool:
        """Whether the schedule measures at optimizer step ``step``."""
        return self.schedule.is_due(step)

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.layers = self.resolve_layers(pl_module)
        self.sink = LogSink(trainer.loggers)
        self.is_global_zero = trainer.is_global_zero

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callbacks' ``setup`` hooks run in list order, so a NormSurgery listed after this
        # callback (or any later setup that changes the model) swaps modules after ``setup``
        # resolved them, and hooks would sit on orphaned modules. Every setup has run by now:
        # resolve again against the final model (``setup`` already validated the selection).
        self.layers = self.resolve_layers(pl_module)

    def warn_if_no_logger(self, trainer: L.Trainer) -> None:
        """Tell the user once (rank zero) that nothing will be written: no logger is attached."""
        if not trainer.loggers:
            rank_zero_warn(
                f"{type(self).__name__} has no logger to write to (Trainer(logger=False)); its "
                f"measurements are discarded. Attach one, e.g. "
                f"Trainer(logger=TensorBoardLogger('logs')).",
                category=UserWarning,
            )

    def measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any
    ) -> Measurement | None:
        """What the training batch that just ended completes (``None``: nothing to log).

        Called by :meth:`on_train_batch_end` on every rank (collectives are allowed); override
        it rather than ``on_train_batch_end``. The default measures nothing.
        """
        return None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.log_measurement(self.measure(trainer, pl_module, outputs))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.release()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.release()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.release()

    # -- helpers -------------------------------------------------------------------------------
    def log_scalars(self, metrics: dict[str, float | Tensor], step: int) -> None:
        """Write ``metrics`` through the sink (one host transfer for all tensors).

        Only rank zero writes (Lightning's loggers ignore other ranks anyway); skipping the other
        ranks here also saves their host transfer.
        """
        if self.sink is not None and self.sink.loggers and metrics and self.is_global_zero:
            self.sink.log_scalars(metrics, step=step)

    def log_vector(self, names: list[str], values: Tensor, step: int) -> None:
        """Write ``values[i]`` under ``names[i]``: one host transfer for the whole vector.

        Cheaper than :meth:`log_scalars` with hundreds of 0-d tensors (each would be one more
        kernel when stacked); rank zero only.
        """
        if self.sink is None or not self.sink.loggers or not self.is_global_zero or not names:
            return
        host = values.detach().float().reshape(-1).cpu().tolist()
        self.sink.log_scalars(dict(zip(names, host, strict=True)), step=step)

    def log_measurement(self, measurement: Measurement | None) -> None:
        """Write a :class:`Measurement`: its scalars (:meth:`log_vector`), then its histograms."""
        if measurement is None:
            return
        self.log_vector(measurement.names, measurement.values, measurement.step)
        if self.sink is not None and self.is_global_zero:
            for name, hist in measurement.histograms.items():
                self.sink.log_histogram(name, hist, measurement.step)

    def release(self) -> None:
        """Remove every registered hook; subclasses extend it to drop per-fit buffers."""
        while self._handles:
            self._handles.pop().remove()
