"""Lightning adapter: the loss landscape along the gradient, curvature and random slices."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_norm.callbacks._base import MonitorCallback
from lightning_norm.callbacks._probe import (
    StepCapture,
    capture_step,
    check_no_accumulation,
    check_probe_support,
    make_replay,
)
from lightning_norm.errors import ConfigurationError
from lightning_norm.probes.directions import filter_normalized_direction
from lightning_norm.probes.hessian import HessianOperator
from lightning_norm.probes.landscape import EtaGrid, Spacing, gradient_landscape, loss_slice
from lightning_norm.probes.replay import StepReplay

#: Default probing interval: one probe at the default settings (8 forward+backward passes, no
#: Hessian) costs 5-8 training steps (benchmarks/bench_landscape.py, docs/landscape.md), so
#: probing every 200 steps keeps the amortized overhead near 4-5%. The Hessian's power iteration
#: adds 20 or more steps per probe on CPU (double backward through conv layers is expensive):
#: opt in with ``hessian=True`` and a longer interval.
DEFAULT_EVERY_N_STEPS = 200

UserLossFn = Callable[[nn.Module, Any], Tensor]


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _range(name: str, value: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"`{name}` must be a pair (low, high) of numbers, got {value!r}."
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigurationError(f"`{name}` must satisfy low < high (finite), got {value!r}.")
    return lo, hi


@contextlib.contextmanager
def _training_mode(module: nn.Module) -> Iterator[None]:
    """Run in training mode (batch statistics), then give every submodule its own mode back."""
    if module.training:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class LossLandscape(MonitorCallback):
    """Logs the loss landscape along the training gradient (S18 Fig. 4), its curvature and slices.

    At a due optimizer step ``t`` (``trainer.global_step``), with the step's batch, parameters
    ``w`` and gradient ``g`` (the raw loss gradient the optimizer is about to use: after DDP's
    all-reduce and AMP unscaling, *before* gradient clipping, read in
    ``on_before_optimizer_step``), for every ``eta`` of the grid the step is replayed
    (:mod:`lightning_norm.probes.replay`: same batch, ``training_step`` or ``loss_fn``, same
    dropout/noise draws, same precision context, ``self.log`` silenced) at ``w_eta = w - eta s g``:

    * ``L(w_eta)``: loss variation (units of the loss);
    * ``||g - grad L(w_eta)||_2``: gradient predictiveness (loss per parameter unit);
    * ``||g - grad L(w_eta)||_2 / ||eta s g||_2``: effective beta-smoothness, maxed over the grid
      (loss per squared parameter unit).

    The grid is ``eta = m * lr`` for ``num_points`` multipliers ``m`` over ``eta_range`` (default
    8 points over ``[1/2, 4]``, S18's VGG range) with ``lr`` the learning rate of the first
    optimizer parameter group with ``lr > 0``, read at the probe (so schedulers count). With
    several parameter groups of different learning rates each group moves by ``m * lr_k * g``
    (``s = lr_k / lr``, the SGD step scaled by ``m``); with ``relative=False`` the grid is
    absolute and every parameter moves by ``eta * g`` (``s = 1``). Only parameters the optimizer
    holds move; a parameter without a gradient stays put.

    Beyond S18 (``hessian=True``): the largest-magnitude eigenvalue of the Hessian of the same
    loss at ``w`` by power iteration on exact Hessian-vector products (double backward), in
    training mode (BN batch statistics, the loss the optimizer descends; PyHessian's eval mode
    gives the inference function's curvature instead), optionally Hutchinson's trace; and at
    ``slice_steps`` and at the end of fit, the loss along a filter-normalized random direction
    (Li et al. 2018) and optionally a 2-D slice, on the step's batch (at the end of fit: the
    final parameters on the last probed step's batch).

    Nothing the model learns changes: parameters are never written, BN buffers, ``.grad``,
    optimizer state, the random streams and logged metrics are as without the callback, and the
    model is not copied. Grid points with a non-finite loss or gradient are counted in
    ``nonfinite`` and left out of the statistics; training goes on. Under DDP every value is that
    of the global batch (losses and gradients averaged over processes) and identical on every rank.

    Cost per probe: ``num_points`` forward+backward passes, plus for the Hessian one forward, one
    double-graph backward and up to ``hessian_iters`` Hessian-vector products (about 2 backward
    passes each), plus ``hessian_trace_samples`` more products. Slices: one forward per point.
    Memory: one extra copy of the trainable parameters (the probe point) and its transient
    gradient; the Hessian keeps one step's graph while it iterates; slices hold 1 or 2 directions.

    Logged metrics (``step`` = ``trainer.global_step`` before the update):

    * ``landscape/total/loss_min``, ``loss_max``, ``loss_range``: over the finite grid points;
    * ``landscape/total/grad_pred_max``, ``grad_pred_mean``: of ``||g - grad L(w_eta)||_2``;
    * ``landscape/total/beta_eff``;
    * ``landscape/total/nonfinite``: number of diverged grid points;
    * ``landscape/total/curve_eta_<i>`` and ``landscape/total/curve_loss_<i>`` for grid index
      ``i = 0..num_points-1``: the whole curve ``L(w - eta_i s g)`` (``eta_i`` increasing);
    * ``landscape/total/hessian_top_eig`` (``hessian=True``), ``landscape/total/hessian_trace``
      (``hessian_trace_samples > 0``);
    * figures ``landscape/total/slice_1d`` and ``landscape/total/slice_2d`` (``slice_2d=True``),
      and the data as ``<log_dir>/landscape/slice_step<step>.pt`` (a dict, see docs/landscape.md).

    Args:
        every_n_steps: probe every N optimizer steps (N >= 1).
        log_spaced: log-spaced schedule (see :class:`~lightning_norm.schedule.StepSchedule`).
        points_per_octave: probes per doubling of the step when ``log_spaced``.
        eta_range: ``(low, high)`` of the grid, multiples of the learning rate (``relative``) or
            absolute step lengths.
        num_points: grid points (>= 1).
        spacing: ``"linear"`` or ``"log"``.
        relative: multiply the grid by the current learning rate.
        hessian: log ``hessian_top_eig`` (off by default: up to ``hessian_iters`` products of
            about 3 training steps each; raise ``every_n_steps`` accordingly).
        hessian_iters: most power iterations (Hessian-vector products).
        hessian_tol: stop when two successive estimates differ by at most this fraction.
        hessian_trace_samples: Rademacher vectors for Hutchinson's trace (0: not logged).
        slice_steps: optimizer steps at which to log random-direction slices.
        slice_at_end: also log slices at the end of fit (final parameters, the last probed
            step's batch and random draws).
        slice_2d: add a 2-D slice (two directions) to each 1-D slice.
        slice_range: ``(low, high)`` of the slice coordinates (units of the filter norms).
        slice_points: points of the 1-D slice (>= 2); the 2-D slice uses ``slice_points_2d``
            per axis.
        slice_points_2d: points per axis of the 2-D slice (>= 2).
        one_d: direction of 1-D parameters (biases, norm affines): ``"zero"`` or ``"filter"``.
        save_dir: where slice data goes; ``None``: ``<trainer.log_dir>/landscape`` (no files
            when the Trainer has no logger).
        loss_fn: ``loss_fn(module, batch) -> Tensor`` instead of the module's ``training_step``.
        seed: seed of the callback's own random generators (Hessian start vectors, directions).

    Raises:
        ConfigurationError: a setting is out of range (at construction); the Trainer uses
            manual optimization, gradient accumulation, a sharded strategy or
            several optimizers, or a probed parameter is not in the module (at ``setup`` /
            ``on_fit_start``); accumulation turned on mid-fit by a
            ``GradientAccumulationScheduler`` (the first batch it applies to).

    Example::

        trainer = L.Trainer(callbacks=[LossLandscape(every_n_steps=500)],
                            logger=TensorBoardLogger("logs"))
    """

    def __init__(
        self,
        *,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        log_spaced: bool = False,
        points_per_octave: int = 10,
        eta_range: tuple[float, float] = (0.5, 4.0),
        num_points: int = 8,
        spacing: Spacing = "linear",
        relative: bool = True,
        hessian: bool = False,
        hessian_iters: int = 20,
        hessian_tol: float = 1e-3,
        hessian_trace_samples: int = 0,
        slice_steps: Iterable[int] = (),
        slice_at_end: bool = True,
        slice_2d: bool = False,
        slice_range: tuple[float, float] = (-1.0, 1.0),
        slice_points: int = 21,
        slice_points_2d: int = 11,
        one_d: str = "zero",
        save_dir: str | None = None,
        loss_fn: UserLossFn | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_steps=every_n_steps,
            log_spaced=log_spaced,
            points_per_octave=points_per_octave,
        )
        try:
            low, high = (float(v) for v in eta_range)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"`eta_range` must be a pair (low, high), got {eta_range!r}."
            ) from None
        self.grid = EtaGrid(low, high, num_points, spacing, bool(relative))
        self.hessian = bool(hessian)
        self.hessian_iters = _positive_int("hessian_iters", hessian_iters)
        if isinstance(hessian_tol, bool) or not isinstance(hessian_tol, (int, float)):
            raise ConfigurationError(f"`hessian_tol` must be a number >= 0, got {hessian_tol!r}.")
        if not hessian_tol >= 0:
            raise ConfigurationError(f"`hessian_tol` must be >= 0, got {hessian_tol!r}.")
        self.hessian_tol = float(hessian_tol)
        self.hessian_trace_samples = _positive_int(
            "hessian_trace_samples", hessian_trace_samples, minimum=0
        )
        steps = list(slice_steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise ConfigurationError(
                f"`slice_steps` must be non-negative ints (optimizer steps), got {steps!r}."
            )
        self.slice_steps = frozenset(steps)
        self.slice_at_end = bool(slice_at_end)
        self.slice_2d = bool(slice_2d)
        self.slice_range = _range("slice_range", slice_range)
        self.slice_points = _positive_int("slice_points", slice_points, minimum=2)
        self.slice_points_2d = _positive_int("slice_points_2d", slice_points_2d, minimum=2)
        if one_d not in ("zero", "filter"):
            raise ConfigurationError(
                f"`one_d` must be 'zero' (biases and norm affines do not move) or 'filter', "
                f"got {one_d!r}."
            )
        self.one_d = one_d
        self.save_dir = save_dir
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigurationError("`loss_fn` must be a callable `loss_fn(module, batch)`.")
        self.loss_fn = loss_fn
        self.seed = _positive_int("seed", seed, minimum=0)
        #: The metrics of the last probe (0-d tensors and floats), on every rank.
        self.last_metrics: dict[str, Tensor | float] = {}
        #: The last slice data (the dict saved to disk), on every rank.
        self.last_slice: dict[str, Any] | None = None
        self._names: dict[int, str] = {}
        self._capture: StepCapture | None = None
        self._probes = 0
        self._slices = 0

    # -- configuration -------------------------------------------------------------------------
    def resolve_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        # The landscape is a whole-model quantity: no layer selection.
        return []

    def state_key_settings(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.schedule.every_n_steps,
            "log_spaced": self.schedule.log_spaced,
            "eta_range": (self.grid.low, self.grid.high),
            "num_points": self.grid.num,
            "spacing": self.grid.spacing,
            "relative": self.grid.relative,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"probes": self._probes, "slices": self._slices}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._probes = int(state_dict.get("probes", 0))
        self._slices = int(state_dict.get("slices", 0))

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # Without a logger the probes still run (``last_metrics``), as the other monitors do.
        self.warn_if_no_logger(trainer)
        check_probe_support(trainer, pl_module, "LossLandscape")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        check_probe_support(trainer, pl_module, "LossLandscape")
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in self._names:
                        raise ConfigurationError(
                            "The optimizer holds a parameter that is not a parameter of the "
                            "LightningModule, so a replay cannot move it. Register every "
                            "optimized tensor as a module parameter (nn.Parameter attribute)."
                        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        check_no_accumulation(trainer, "LossLandscape")
        step = trainer.global_step
        if self.is_due(step) or step in self.slice_steps:
            # A reference to the batch and the RNG state, kept until the next capture: the
            # end-of-fit slice replays the last probed batch (step 0 is always due).
            self._capture = capture_step(trainer, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        capture = self._capture
        step = trainer.global_step
        if capture is None or capture.step != step:
            return
        if self.is_due(step):
            self._probe(trainer, pl_module, optimizer, capture)
        if step in self.slice_steps:
            self._slice(trainer, pl_module, capture, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.slice_at_end and self._capture is not None:
            with _training_mode(pl_module):
                self._slice(trainer, pl_module, self._capture, trainer.global_step)

    def release(self) -> None:
        super().release()
        self._capture = None

    # -- probes --------------------------------------------------------------------------------
    def _probed(
        self, optimizer: Optimizer
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, float], float | None]:
        """Parameters, their gradients, per-parameter step multipliers and the reference lr."""
        params: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        lrs: dict[str, float] = {}
        for group in optimizer.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                name = self._names[id(p)]
                params[name] = p.detach()
                lrs[name] = lr
                if p.grad is not None:
                    grads[name] = p.grad.detach()
        group_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        lr_ref = next((lr for lr in group_lrs if lr > 0), None)
        if not self.grid.relative:
            return params, grads, {}, 1.0
        if lr_ref is None:
            return params, grads, {}, None
        return params, grads, {n: lr / lr_ref for n, lr in lrs.items()}, lr_ref

    def _probe(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        optimizer: Optimizer,
        capture: StepCapture,
    ) -> None:
        params, grads, scale, lr_ref = self._probed(optimizer)
        if lr_ref is None:
            rank_zero_warn(
                "LossLandscape skipped a probe: every parameter group has lr = 0, so the grid "
                "relative to the learning rate is empty. Use `relative=False` for an absolute grid."
            )
            return
        names = list(params)
        replay = make_replay(trainer, pl_module, capture, self.loss_fn)

        def oracle(point: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            return replay.loss_and_grad(point, wrt=names)

        etas = self.grid.etas(lr_ref)
        result = gradient_landscape(oracle, params, grads, etas, scale)
        metrics: dict[str, Tensor | float] = {
            f"landscape/total/{k}": v for k, v in result.summary().items()
        }
        for i, eta in enumerate(result.etas):
            metrics[f"landscape/total/curve_eta_{i}"] = eta
            metrics[f"landscape/total/curve_loss_{i}"] = result.losses[i]
        if self.hessian or self.hessian_trace_samples:
            op = self._hessian(replay, names)
            gen = self._generator(params, capture.step)
            if self.hessian:
                top = op.top_eigenvalue(self.hessian_iters, self.hessian_tol, gen)
                metrics["landscape/total/hessian_top_eig"] = top.value
            if self.hessian_trace_samples:
                metrics["landscape/total/hessian_trace"] = op.trace(self.hessian_trace_samples, gen)
            del op
        self._probes += 1
        self.last_metrics = metrics
        self.log_scalars(metrics, capture.step)

    def _hessian(self, replay: StepReplay, names: Sequence[str]) -> HessianOperator:
        """A Hessian operator at ``w`` on the replayed step, built inside the replay.

        The replay returns detached gradients, so the graph is kept from inside its loss
        function: while ``functional_call`` runs it, the module's parameters *are* the replay's
        leaves, and the loss computed from them is handed to :meth:`HessianOperator.from_graph`.
        Returning the loss detached makes the replay skip its own backward.
        """
        kept: dict[str, Any] = {}
        inner = replay.compute_loss

        def compute_loss(module: nn.Module) -> Tensor:
            loss = inner(module)
            kept["loss"] = loss
            kept["leaves"] = dict(module.named_parameters())
            return loss.detach()

        graph_replay = StepReplay(
            replay.module, compute_loss, rng_state=replay.rng_state, context=replay.context
        )
        graph_replay.loss_and_grad(wrt=list(names))
        leaves = {n: kept["leaves"][n] for n in names}
        return HessianOperator.from_graph(kept["loss"], leaves, reduce=replay.reduce)

    def _generator(self, params: dict[str, Tensor], step: int) -> torch.Generator:
        device = next(iter(params.values())).device if params else torch.device("cpu")
        # Seeded from the step, so every DDP rank and a resumed run draw the same vectors.
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + step)

    def _slice(
        self, trainer: L.Trainer, pl_module: L.LightningModule, capture: StepCapture, step: int
    ) -> None:
        params = {n: p.detach() for n, p in pl_module.named_parameters() if p.requires_grad}
        if not params:
            return
        replay = make_replay(trainer, pl_module, capture, self.loss_fn)
        gen = self._generator(params, step)
        lo, hi = self.slice_range
        alphas = torch.linspace(lo, hi, self.slice_points, dtype=torch.float64).tolist()
        d1 = filter_normalized_direction(params, gen, self.one_d)  # type: ignore[arg-type]
        losses_1d = loss_slice(replay.loss, params, [d1], [alphas])
        data: dict[str, Any] = {
            "step": step,
            "batch_step": capture.step,
            "alphas": torch.tensor(alphas),
            "losses_1d": losses_1d.detach().cpu(),
            "seed": self.seed,
            "one_d": self.one_d,
        }
        if self.slice_2d:
            d2 = filter_normalized_direction(params, gen, self.one_d)  # type: ignore[arg-type]
            coords = torch.linspace(lo, hi, self.slice_points_2d, dtype=torch.float64).tolist()
            losses_2d = loss_slice(replay.loss, params, [d1, d2], [coords, coords])
            data["coords_2d"] = torch.tensor(coords)
            data["losses_2d"] = losses_2d.detach().cpu()
            del d2
        del d1
        self._slices += 1
        self.last_slice = data
        folder = self.save_dir
        if folder is None and trainer.loggers:
            # Trainer.log_dir broadcasts from rank 0: every rank must ask, not only rank 0.
            # Without a logger it falls back to the working directory: write nothing there.
            log_dir = trainer.log_dir
            folder = os.path.join(log_dir, "landscape") if log_dir is not None else None
        if trainer.is_global_zero:
            self._write_slice(data, step, folder)

    def _write_slice(self, data: dict[str, Any], step: int, folder: str | None) -> None:
        import numpy as np
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.5, 3.2))
        ax = fig.add_subplot()
        # float64 for numpy, which has no bfloat16 (precision="bf16-true")
        ax.plot(data["alphas"].numpy(), data["losses_1d"].double().numpy(), marker=".")
        ax.set_xlabel("alpha (filter-normalized random direction)")
        ax.set_ylabel("training loss on the batch")
        ax.set_title(f"loss slice, step {step}")
        fig.tight_layout()
        if self.sink is not None:
            self.sink.log_figure("landscape/total/slice_1d", fig, step)
        if "losses_2d" in data:
            fig = Figure(figsize=(4.5, 4.0))
            ax = fig.add_subplot()
            c = data["coords_2d"].numpy()
            z = np.ma.masked_invalid(data["losses_2d"].double().numpy())
            cs = ax.contour(c, c, z.T, levels=20)
            fig.colorbar(cs, ax=ax)
            ax.set_xlabel("alpha (direction 1)")
            ax.set_ylabel("beta (direction 2)")
            ax.set_title(f"loss slice, step {step}")
            if self.sink is not None:
                self.sink.log_figure("landscape/total/slice_2d", fig, step)
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            torch.save(data, os.path.join(folder, f"slice_step{step:07d}.pt"))
