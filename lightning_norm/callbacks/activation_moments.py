"""Lightning adapter: activation moments, percentiles and their step-to-step change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_norm.callbacks._base import MonitorCallback
from lightning_norm.errors import ConfigurationError
from lightning_norm.monitors.activations import FULL, UNITS, ActivationRecorder, LayerStats
from lightning_norm.selection import LayerSelection
from lightning_norm.stats import DEFAULT_QUANTILES


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

    Logged metrics (``<layer>`` is the qualified module name, x-axis ``trainer.global_step``):

    * ``activation/<layer>/mean``, ``std``, ``p15``, ``p50``, ``p85``, ``nonfinite``,
      ``delta_mean``, ``delta_var``;
    * ``activation/<layer>/unit<j>_mean``, ``unit<j>_std``, ``unit<j>_p15``, ``unit<j>_p50``,
      ``unit<j>_p85`` where ``j`` is the unit's channel index;
    * ``activation/<layer>/hist`` (histogram, TensorBoard and W&B only) when
      ``histogram_every_n_steps`` is set.

    Args:
        every_n_steps: log every N optimizer steps (N >= 1).
        log_spaced: log-spaced schedule (see :class:`~lightning_norm.schedule.StepSchedule`).
        points_per_octave: measurements per doubling of the step when ``log_spaced``.
        layers: which modules; ``None``: normalization layers, else Conv/Linear.
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

    Raises:
        ConfigurationError: a setting is out of range (at construction).
        SelectionError: the selection matches no module (at ``setup``).

    Example::

        trainer = L.Trainer(callbacks=[ActivationMoments(every_n_steps=10)],
                            logger=TensorBoardLogger("logs"))
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 1,
        log_spaced: bool = False,
        points_per_octave: int = 10,
        layers: LayerSelection | None = None,
        capture: str = "output",
        num_units: int = 8,
        channel_dim: int = 1,
        seed: int = 0,
        quantile_samples: int = 1024,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        deltas: bool = True,
        histogram_every_n_steps: int | None = None,
        histogram_bins: int = 64,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            log_spaced=log_spaced,
            points_per_octave=points_per_octave,
            layers=layers,
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
        self._units_state: dict[str, list[int]] = {}
        self._armed_step: int | None = None
        self._paused_mode: str | None = None
        self._stride = 1
        # (global step after the recorded step, {layer: (unit means, unit vars)}) for deltas.
        self._prev: tuple[int, dict[str, tuple[Tensor, Tensor]]] | None = None

    def state_key_settings(self) -> dict[str, Any]:
        return {
            **super().state_key_settings(),
            "capture": self.capture,
            "num_units": self.num_units,
            "seed": self.seed,
        }

    # -- lifecycle -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.warn_if_no_logger(trainer)
        self.recorder = ActivationRecorder(
            self.layers,
            num_units=self.num_units,
            seed=self.seed,
            channel_dim=self.channel_dim,
            capture=self.capture,
            quantile_samples=self.quantile_samples,
            quantiles=self.quantiles,
        )
        self.recorder.load_state_dict({"units": self._units_state})
        self.recorder.attach()
        self._armed_step = None
        self._prev = None

    def release(self) -> None:
        super().release()
        if self.recorder is not None:
            self._units_state = dict(self.recorder.units)
            self.recorder.detach()
        self._armed_step = None
        self._prev = None

    # Validation inside fit must not add to a step that is still accumulating micro-batches.
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recorder is not None:
            self._paused_mode, self.recorder.mode = self.recorder.mode, None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        rec = self.recorder
        step = self._armed_step
        if rec is None or step is None or rec.mode is None:
            return
        if trainer.global_step == step:
            return  # no optimizer step yet (gradient accumulation): the step is not complete
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
            return
        names, values = self._metrics(stats, prev)
        self.log_vector(names, values, step)
        if self.sink is not None and self.is_global_zero:
            for name, hist in histograms.items():
                self.sink.log_histogram(f"activation/{name}/hist", hist, step)

    def _metrics(
        self,
        stats: dict[str, LayerStats],
        prev: tuple[int, dict[str, tuple[Tensor, Tensor]]] | None,
    ) -> tuple[list[str], Tensor]:
        """Every logged name and its value, as one device vector (one host transfer)."""
        pnames = [_pname(q) for q in self.quantiles]
        names: list[str] = []
        parts: list[Tensor] = []
        for layer, s in stats.items():
            base = f"activation/{layer}"
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
        units = self.recorder.units if self.recorder is not None else self._units_state
        return {"units": {k: list(v) for k, v in units.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._units_state = {k: list(v) for k, v in state_dict.get("units", {}).items()}
        if self.recorder is not None:
            self.recorder.load_state_dict({"units": self._units_state})


__all__ = ["ActivationMoments"]
