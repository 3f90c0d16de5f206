"""NormSurgery: swap a LightningModule's BatchNorm layers at ``setup``, before they are used."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_norm.errors import ConfigurationError
from lightning_norm.selection import _check_filter
from lightning_norm.surgery import SwapReport, check_target, describe_target, swap_norms

#: Logger hyperparameter keys (the report's summary); see NormSurgery's "Logged metrics".
HPARAM_PREFIX = "norm_surgery"


def _describe_filter(flt: Any) -> Any:
    if flt is None or isinstance(flt, str):
        return flt
    if callable(flt):
        return describe_target(flt)
    return list(flt)


class NormSurgery(Callback):
    """Replace the model's BatchNorm layers by another normalization when the Trainer sets up.

    Applies :func:`lightning_norm.swap_norms` in ``setup``, which Lightning calls before
    ``configure_optimizers`` (so the optimizer holds the new layers' parameters), before the
    strategy moves the model to its device and wraps it (DDP, ``sync_batchnorm``), and before
    checkpoint weights are loaded (so ``ckpt_path=`` of a swapped run loads into the swapped
    model). A module is swapped once per callback: a later ``validate``/``test``/``predict`` on
    the same module leaves it alone.

    Logged metrics:
        Once per swap, on rank zero: the report table through ``rank_zero_info``, and these
        hyperparameters on every attached logger (``log_hyperparams``):

        - ``norm_surgery/to``: the target normalization (name, or class/factory path).
        - ``norm_surgery/replaced``: number of replaced modules (a shared module counts once).
        - ``norm_surgery/skipped``: number of BatchNorm modules left in place.
        - ``norm_surgery/layers``: comma-separated qualified names of the replaced modules.

    Args:
        to: a registered normalization name (``"lp1"``, ``"noisy_bn"``, ``"groupnorm"``, ...),
            an ``nn.Module`` class or a factory; see :func:`lightning_norm.swap_norms`.
        include: glob(s) on qualified module names, or a predicate ``(name, module) -> bool``.
        exclude: glob(s) or predicate; matching BatchNorms are kept.
        norm_options: options for the target, as a dict (the form LightningCLI YAML can give).
        **options: the same, as keyword arguments (``num_groups=8``).

    Raises:
        UnknownNormError: ``to`` is not a registered name (at construction).
        ConfigurationError: ``to`` is not a name, class or callable, or an option is given both
            in ``norm_options`` and as a keyword (at construction).
        SelectionError: a malformed ``include``/``exclude`` (at construction), or ``include``
            matching no BatchNorm (at ``setup``).
        SurgeryError: the options do not fit the target, or the module is compiled/scripted
            (at ``setup``).

    With ``strategy="ddp_spawn"`` (or ``"ddp_fork"``) the swap happens in the worker processes;
    Lightning copies the trained weights back into the main process's model non-strictly, and
    that model keeps its BatchNorm layers. Call ``swap_norms(model, ...)`` yourself before
    ``fit`` there (NormSurgery then finds nothing to do), or use ``strategy="ddp"``.

    Example::

        trainer = Trainer(callbacks=[NormSurgery("groupnorm", num_groups=8)])

        # LightningCLI YAML
        trainer:
          callbacks:
            - class_path: lightning_norm.callbacks.NormSurgery
              init_args: {to: lp1, exclude: "classifier.*"}
    """

    def __init__(
        self,
        to: str | type[nn.Module] | Callable[..., nn.Module],
        *,
        include: str | list[str] | Callable[[str, nn.Module], bool] | None = None,
        exclude: str | list[str] | Callable[[str, nn.Module], bool] | None = None,
        norm_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        check_target(to)
        _check_filter("include", include)
        _check_filter("exclude", exclude)
        norm_options = dict(norm_options or {})
        both = sorted(set(norm_options) & set(options))
        if both:
            raise ConfigurationError(
                f"Option(s) {both} given both in `norm_options` and as keyword arguments; give "
                f"each once."
            )
        self.to = to
        self.include = include
        self.exclude = exclude
        self.options: dict[str, Any] = {**norm_options, **options}
        #: The report of the last swap (``None`` before ``setup``).
        self.report: SwapReport | None = None
        self._swapped: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._checkpoint_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            to=describe_target(self.to),
            include=_describe_filter(self.include),
            exclude=_describe_filter(self.exclude),
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if pl_module in self._swapped:
            return
        with warnings.catch_warnings():
            # Replaced below by a warning that knows about Lightning's hooks.
            warnings.filterwarnings("ignore", message="swap_norms found no BatchNorm")
            report = swap_norms(
                pl_module, self.to, include=self.include, exclude=self.exclude, **self.options
            )
        self._swapped.add(pl_module)
        self.report = report
        if len(report) == 0 and not report.skipped:
            rank_zero_warn(
                f"NormSurgery({describe_target(self.to)!r}) found no BatchNorm in "
                f"{type(pl_module).__name__} at setup; nothing was replaced. If the module builds "
                f"its layers in `setup()` or `configure_model()` (both run after callbacks' "
                f"setup), call `lightning_norm.swap_norms` there instead."
            )
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            rank_zero_warn(
                "NormSurgery under a spawn/fork launcher (ddp_spawn, ddp_fork, ...): the swap "
                "happens in the worker processes; the model object of the main process keeps "
                "its BatchNorm layers after `fit`. Call `swap_norms(model, ...)` before `fit` to "
                "keep the swapped model, or use strategy='ddp'."
            )
        self._log(trainer, report)

    def _log(self, trainer: pl.Trainer, report: SwapReport) -> None:
        rank_zero_info(str(report))
        params = {
            f"{HPARAM_PREFIX}/to": report.target,
            f"{HPARAM_PREFIX}/replaced": len(report),
            f"{HPARAM_PREFIX}/skipped": len(report.skipped),
            f"{HPARAM_PREFIX}/layers": ", ".join(n or "<root>" for n in report.replaced_names),
        }
        # Lightning's loggers write on rank zero only (log_hyperparams is rank_zero_only).
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def state_dict(self) -> dict[str, Any]:
        report = self.report
        return {
            "to": describe_target(self.to),
            "replaced": report.replaced_names if report is not None else None,
            "report": report.to_dict() if report is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback state after `setup`, so the swap of this run is known here.
        self._checkpoint_state = dict(state_dict)
        saved = state_dict.get("replaced")
        if saved is None or self.report is None:
            return
        if sorted(saved) != sorted(self.report.replaced_names):
            rank_zero_warn(
                f"NormSurgery: the checkpoint was saved after replacing {len(saved)} module(s) "
                f"({', '.join(saved[:5])}{', ...' if len(saved) > 5 else ''}), this run replaced "
                f"{len(self.report)}. Use the same `to`, `include` and `exclude` as the run that "
                f"wrote the checkpoint, or its weights may not load."
            )

    def __getstate__(self) -> dict[str, Any]:
        # Weak references do not pickle (ddp_spawn pickles the callbacks); the worker starts
        # with a fresh set, which is right: its module is a copy.
        state = self.__dict__.copy()
        state["_swapped"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._swapped = weakref.WeakSet()
