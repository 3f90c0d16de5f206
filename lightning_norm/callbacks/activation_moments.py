"""Lightning adapter: activation moments, percentiles and their step-to-step change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor

from lightning_norm.callbacks._base import Measurement, MonitorCallback, MonitorOptions
from lightning_norm.errors import ConfigurationError
from lightning_norm.monitors.activations import FULL, UNITS, ActivationRecorder, LayerStats
from lightning_norm.stats import DEFAULT_QUANTILES

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: The forward passes ActivationMoments can record, in the order of ``stages``.
STAGES = ("train", "validate")


def _pname(q: float) -> str:
    return f"p{100 * q:g}".replace(".", "_")


class ActivationMoments(MonitorCallback):
    """Logs the distribution of selected layers' activations during training (S18 Fig. 1, 2, 8).

    On every due optimizer step ``t`` (training forward passes only) and for each selected layer
    (default: the normalization layers, else Conv/Linear), with ``x`` the layer's output (or input)
    over the global batch (all micro-batches of the step and all DDP ranks):

    * ``mean = sum(x) / n`` and ``std = sqrt(sum((x - mean)^2) / n)`` (population std), in the
      units of the activation; accumulated in float32 (bf16/fp16 activations are upcast);
    * ``p15, p50, p85``: percentiles (linear interpolation, as ``torch.quantile``);
    * ``nonfinite``: number of NaN/Inf values (a count);
    * for ``num_units`` units fixed at the first step (a unit is one index along ``channel_dim``,
      i.e. a channel for conv layers, whose sample is every (N, H, W) position): their mean, std
      and percentiles;
    * ``delta_mean = (1/k) sum_j |mean_j(t) - mean_j(t-1)|`` and
      ``delta_var = (1/k) sum_j |var_j(t) - var_j(t-1)|`` over the ``k`` sampled units, between
      step ``t`` and the optimizer step just before it (so the step before a due step is recorded
      too, with only the units' moments); ``var`` is the population variance (units squared).

    Percentiles are exact while a rank's tensor (or unit) has at most ``quantile_samples``
    values; beyond that they come from a fixed, seeded uniform subsample of that size per rank.
    Under DDP every rank's subsample is all-gathered and the percentiles are taken over their
    union (a sample of the global batch, not an average of per-rank percentiles, which would be
    biased for skewed distributions). Moments are merged exactly across ranks (Chan et al.).

    Only training forward passes are recorded by default; the sanity check, ``validate``,
    ``test`` and ``predict`` never are. With ``"validate"`` in ``stages``, every validation run
    inside ``fit`` (not the sanity check) is recorded too, as one sample: every batch of every
    validation dataloader and every DDP rank, the model in eval mode; it is logged at the
    ``trainer.global_step`` the validation ran at (so the weights are those that training step
    ``t = global_step`` starts from), under ``activation_val/``, whatever the schedule says. The
    same units are sampled; there are no deltas and no histograms for validation.

    Logged metrics (``<layer>`` is the qualified module name, x-axis ``trainer.global_step``):

    * ``activation/<layer>/mean``, ``std``, ``p15``, ``p50``, ``p85``, ``nonfinite``,
      ``delta_mean``, ``delta_var``;
    * ``activation/<layer>/unit<j>_mean``, ``unit<j>_std``, ``unit<j>_p15``, ``unit<j>_p50``,
      ``unit<j>_p85`` where ``j`` is the unit's channel index;
    * ``activation/<layer>/hist`` (histogram, TensorBoard and W&B only) when
      ``histogram_every_n_steps`` is set;
    * with ``"validate"`` in ``stages``: ``activation_val/<layer>/mean``, ``std``, ``p15``,
      ``p50``, ``p85``, ``nonfinite`` and ``activation_val/<layer>/unit<j>_mean``, ``unit<j>_std``,
      ``unit<j>_p15``, ``unit<j>_p50``, ``unit<j>_p85``, the same definitions over the validation
      run; without ``"train"``, no ``activation/`` metric.

    Args:
        stages: the forward passes to record: ``"train"`` (the default), ``"validate"``, or both.
        capture: ``"output"`` (default) or ``"input"`` of each module.
        num_units: units sampled per layer (S18 plots a few), 0 to skip per-unit metrics.
        channel_dim: the dim that indexes units (1 for ``(N, C, ...)``, -1 for ``(N, L, C)``).
        seed: seed of the private generator choosing units and subsample positions.
        quantile_samples: values per rank kept per layer and per unit for percentiles.
        quantiles: percentiles to log, as fractions; named ``p<100 q>``.
        deltas: also record the step before each due step to log ``delta_mean``/``delta_var``.
        histogram_every_n_steps: also log a histogram on due steps that are multiples of this
            (computed on the device, one host transfer per layer, rank zero's batch only).
        histogram_bins: bins of those histograms.
        **options: :class:`~lightning_norm.callbacks._base.MonitorCallback`'s ``every_n_steps``
            (log every N optimizer steps), ``log_spaced``, ``points_per_octave`` and ``layers``
            (``None``: normalization layers, else Conv/Linear).

    Raises:
        ConfigurationError: a setting is out of range (at construction).
        SelectionError: the selection matches no module (at ``setup``).

    Example::

        trainer = L.Trainer(callbacks=[ActivationMoments(every_n_steps=10)],
                            logger=TensorBoardLogger("logs"))
        # and the validation activations, at every validation run:
        ActivationMoments(every_n_steps=10, stages=("train", "validate"))
    """

    def __init__(
        self,
        *,
        stages: Sequence[str] = ("train",),
        capture: str = "output",
        num_units: int = 8,
        channel_dim: int = 1,
        seed: int = 0,
        quantile_samples: int = 1024,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        deltas: bool = True,
        histogram_every_n_steps: int | None = None,
        histogram_bins: int = 64,
        **options: Unpack[MonitorOptions],
    ) -> None:
        super().__init__(**options)
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        if not stages or not set(stages) <= set(STAGES):
            raise ConfigurationError(
                f"`stages` must name the forward passes to record, some of {STAGES} (e.g. "
                f"stages=('train', 'validate')), got {stages!r}."
            )
        if capture not in ("output", "input"):
            raise ConfigurationError(
                f"`capture` must be 'output' or 'input' (which tensor of the module to measure), "
                f"got {capture!r}."
            )
        for arg, value, lo in (
            ("num_units", num_units, 0),
            ("quantile_samples", quantile_samples, 1),
            ("histogram_bins", histogram_bins, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigurationError(f"`{arg}` must be an integer >= {lo}, got {value!r}.")
        if histogram_every_n_steps is not None and (
            isinstance(histogram_every_n_steps, bool)
            or not isinstance(histogram_every_n_steps, int)
            or histogram_every_n_steps < 1
        ):
            raise ConfigurationError(
                f"`histogram_every_n_steps` must be a positive integer or None (no histograms), "
                f"got {histogram_every_n_steps!r}."
            )
        quantiles = tuple(float(q) for q in quantiles)
        if not quantiles or not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ConfigurationError(
                f"`quantiles` must be fractions in [0, 1] such as (0.15, 0.5, 0.85), got "
                f"{quantiles!r}."
            )
        self.stages = tuple(s for s in STAGES if s in stages)
        self.capture = capture
        self.num_units = num_units
        self.channel_dim = channel_dim
        self.seed = seed
        self.quantile_samples = quantile_samples
        self.quantiles = quantiles
        self.deltas = deltas
        self.histogram_every_n_steps = histogram_every_n_steps
        self.histogram_bins = histogram_bins
        self.recorder: ActivationRecorder | None = None
        #: records validation inside fit, when "validate" is in ``stages``
        self.val_recorder: ActivationRecorder | None = None
        self._units_state: dict[str, list[int]] = {}
        self._armed_step: int | None = None
        self._paused_mode: str | None = None
        self._stride = 1
        # (global step after the recorded step, {layer: (unit means, unit vars)}) for deltas.
        self._prev: tuple[int, dict[str, tuple[Tensor, Tensor]]] | None = None
        # ``_prev`` from a checkpoint, put in place at ``on_train_start`` (Lightning may restore
        # callback state before or after ``on_fit_start``, which resets ``_prev``).
        self._loaded_prev: tuple[int, dict[str, tuple[Tensor, Tensor]]] | None = None

    def state_key_settings(self) -> dict[str, Any]:
        settings = {
            **super().state_key_settings(),
            "capture": self.capture,
            "num_units": self.num_units,
            "seed": self.seed,
        }
        if self.stages != ("train",):  # the default keeps the key older checkpoints were saved at
            settings["stages"] = self.stages
        return settings

    # -- lifecycle -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.warn_if_no_logger(trainer)
        # One recorder per stage, so validation never touches a training step's accumulators;
        # both draw the same units (a pure function of the seed, the layer name and its width).
        self.recorder = self._new_recorder() if "train" in self.stages else None
        self.val_recorder = self._new_recorder() if "validate" in self.stages else None
        self._armed_step = None
        self._prev = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run's first delta compares with the last step recorded before the checkpoint.
        loaded, self._loaded_prev = self._loaded_prev, None
        if loaded is not None:
            dev = pl_module.device
            self._prev = (loaded[0], {n: (m.to(dev), v.to(dev)) for n, (m, v) in loaded[1].items()})

    def _new_recorder(self) -> ActivationRecorder:
        rec = ActivationRecorder(
            self.layers,
            num_units=self.num_units,
            seed=self.seed,
            channel_dim=self.channel_dim,
            capture=self.capture,
            quantile_samples=self.quantile_samples,
            quantiles=self.quantiles,
        )
        rec.load_state_dict({"units": self._units_state})
        rec.attach()
        return rec

    def _units(self) -> dict[str, list[int]]:
        units = dict(self._units_state)
        for rec in (self.val_recorder, self.recorder):
            if rec is not None:
                units.update(rec.units)
        return units

    def release(self) -> None:
        super().release()
        self._units_state = self._units()
        for rec in (self.recorder, self.val_recorder):
            if rec is not None:
                rec.detach()
        self._armed_step = None
        if (
            self._prev is not None
        ):  # kept for a checkpoint saved after fit (trainer.save_checkpoint)
            self._loaded_prev = self._prev
        self._prev = None

    # Validation inside fit must not add to a step that is still accumulating micro-batches.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recorder is not None:
            self._paused_mode, self.recorder.mode = self.recorder.mode, None
        val = self.val_recorder
        if val is not None and val.attached and not trainer.sanity_checking:
            val.arm(FULL)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val = self.val_recorder
        if val is not None and val.mode is not None:
            stats = val.compute()  # every rank runs the validation loop: one all-gather
            val.disarm()
            names, values = self._metrics(stats, None, "activation_val")
            self.log_measurement(Measurement(trainer.global_step, names, values))
        if self.recorder is not None and self._paused_mode is not None:
            self.recorder.mode, self._paused_mode = self._paused_mode, None

    # -- per step ------------------------------------------------------------------------------
    def _mode_for(self, step: int) -> str | None:
        if self.is_due(step):
            return FULL
        # The next optimizer step is `stride` ahead (several manual optimizers step per batch).
        ahead = range(1, self._stride + 1)
        if self.deltas and self.num_units > 0 and any(self.is_due(step + d) for d in ahead):
            return UNITS
        return None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rec = self.recorder
        if rec is None:
            return
        step = trainer.global_step
        if self._armed_step == step and rec.mode is not None:
            return  # a later micro-batch of the same optimizer step: keep accumulating
        mode = self._mode_for(step)
        if mode is None:
            rec.disarm()
            self._armed_step = None
            return
        rec.arm(mode)
        m = self.histogram_every_n_steps
        if mode == FULL and m is not None and step % m == 0 and self.is_global_zero:
            rec.histogram_bins = self.histogram_bins
        self._armed_step = step

    def measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any
    ) -> Measurement | None:
        rec = self.recorder
        step = self._armed_step
        if rec is None or step is None or rec.mode is None:
            return None
        if trainer.global_step == step:
            return None  # no optimizer step yet (gradient accumulation): the step is not complete
        end = trainer.global_step
        self._stride = max(1, end - step)
        mode = rec.mode
        stats = rec.compute()
        histograms = dict(rec.histograms)
        rec.disarm()
        self._armed_step = None
        prev = self._prev if self._prev is not None and self._prev[0] == step else None
        self._prev = (end, {n: (s.unit_moments.mean, s.unit_moments.var) for n, s in stats.items()})
        if mode != FULL:
            return None
        names, values = self._metrics(stats, prev)
        hists = {f"activation/{name}/hist": hist for name, hist in histograms.items()}
        return Measurement(step, names, values, hists)

    def _metrics(
        self,
        stats: dict[str, LayerStats],
        prev: tuple[int, dict[str, tuple[Tensor, Tensor]]] | None,
        group: str = "activation",
    ) -> tuple[list[str], Tensor]:
        """Every logged name and its value, as one device vector (one host transfer)."""
        pnames = [_pname(q) for q in self.quantiles]
        names: list[str] = []
        parts: list[Tensor] = []
        for layer, s in stats.items():
            base = f"{group}/{layer}"
            names += [f"{base}/{m}" for m in ("mean", "std", *pnames, "nonfinite")]
            parts += [
                s.whole.mean.reshape(1),
                s.whole.std.reshape(1),
                s.quantiles.reshape(-1),
                s.nonfinite.float().reshape(1),
            ]
            um = s.unit_moments
            if prev is not None and layer in prev[1] and s.units:
                pmean, pvar = prev[1][layer]
                if pmean.shape == um.mean.shape:
                    names += [f"{base}/delta_mean", f"{base}/delta_var"]
                    parts.append((um.mean - pmean).abs().mean().reshape(1))
                    parts.append((um.var - pvar).abs().mean().reshape(1))
            if s.units:
                per_unit = ("mean", "std", *pnames)
                names += [f"{base}/unit{u}_{m}" for u in s.units for m in per_unit]
                # (units, 2 + len(q)), row-major: unit by unit, in the order of the names
                block = torch.cat([um.mean[:, None], um.std[:, None], s.unit_quantiles], dim=1)
                parts.append(block.reshape(-1))
        values = torch.cat(parts) if parts else torch.zeros(0)
        return names, values

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"units": {k: list(v) for k, v in self._units().items()}}
        prev = self._prev if self._prev is not None else self._loaded_prev
        if prev is not None:  # the units' moments the next step's deltas compare with
            # plain lists (exact for float32/64), so state dicts compare with ``==``
            state["prev"] = (
                prev[0],
                {n: (str(m.dtype), m.tolist(), v.tolist()) for n, (m, v) in prev[1].items()},
            )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._units_state = {k: list(v) for k, v in state_dict.get("units", {}).items()}
        prev = state_dict.get("prev")
        self._loaded_prev = None
        if prev is not None:
            moments = {}
            for n, (dtype, m, v) in prev[1].items():
                dt = getattr(torch, dtype.removeprefix("torch."))
                moments[n] = (torch.tensor(m, dtype=dt), torch.tensor(v, dtype=dt))
            self._loaded_prev = (prev[0], moments)
        for rec in (self.recorder, self.val_recorder):
            if rec is not None:
                rec.load_state_dict({"units": self._units_state})


__all__ = ["STAGES", "ActivationMoments"]
