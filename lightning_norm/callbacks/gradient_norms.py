"""Lightning adapter: per-layer gradient, weight, update and distance-from-init norms."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_norm.callbacks._base import Measurement, MonitorCallback, MonitorOptions
from lightning_norm.errors import ConfigurationError
from lightning_norm.monitors.weights import ParameterNorms, tensor_norms
from lightning_norm.selection import LayerSelection

if TYPE_CHECKING:
    from typing_extensions import Unpack


def _owns_parameters(name: str, module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


#: Default layers of GradientNorms: every module that owns parameters directly.
MODULES_WITH_PARAMETERS = LayerSelection(
    types=(nn.Module,), include=_owns_parameters, outermost=False
)


class GradientNorms(MonitorCallback):
    """Logs per-layer gradient, weight, update-to-weight and distance-from-init norms.

    For optimizer step ``t`` (``trainer.global_step``, one value per optimizer step, so gradient
    accumulation gives one value per accumulated step), per selected layer ``l`` with parameters
    ``W_l`` (all of the module's trainable parameters, flattened together), and for ``total``
    (every trainable parameter of the LightningModule):

    * ``grad_norm = ||G_l||_p`` with ``G`` the gradient the optimizer is about to use (unit: loss
      units per weight unit). It is read in ``on_before_optimizer_step``: after the backward
      passes, after DDP has all-reduced the gradients (synchronized, identical on every rank),
      after Lightning's AMP ``GradScaler.unscale_`` (so fp16 scaling does not inflate it), and
      before Lightning's gradient clipping (``configure_gradient_clipping`` runs after that hook).
      With manual optimization ``on_before_optimizer_step`` runs inside ``opt.step()``, so a
      ``self.clip_gradients`` the user calls before ``opt.step()`` is already applied.
    * ``grad_norm_clipped = ||G_l||_p`` after clipping (``log_clipped=True``), read at the end of
      the batch, after the optimizer step (valid while the gradients are not zeroed in between).
    * ``weight_norm = ||W_l(t)||_2`` (weights before the step).
    * ``update_ratio = ||W_l(t+1) - W_l(t)||_2 / ||W_l(t)||_2``: the update the optimizer really
      applied (momentum, Adam, weight decay, a skipped fp16 step all included; dimensionless).
      ``W(t)`` is copied at the first ``on_before_optimizer_step`` of a due step, ``W(t+1)`` read
      at ``on_train_batch_end``; several optimizers stepping in one batch all count.
    * ``dist_from_init = ||W_l(t) - W_l(0)||_2`` with ``W(0)`` copied at the first
      ``on_train_start`` and kept in the callback state, so a resumed run (and a later ``fit`` of
      the same module) measures from the same origin (the checkpoint then holds one extra copy of
      the weights).

    Layers whose parameters no optimizer stepped in a due batch get no ``grad_norm`` and
    ``update_ratio`` that step. Weight quantities use the L2 norm whatever ``norm_type``.

    Logged metrics (``<layer>`` the qualified module name, or ``total``):

    * ``grad_norm/<layer>``, ``weight_norm/<layer>``, ``update_ratio/<layer>``,
      ``dist_from_init/<layer>``;
    * ``grad_norm_clipped/<layer>`` when ``log_clipped=True``.

    Args:
        norm_type: ``p`` of the gradient norm (> 0, ``float("inf")`` for the max norm).
        log_weight_norm: log ``weight_norm``.
        log_update_ratio: log ``update_ratio`` (copies the weights on due steps).
        log_dist_from_init: log ``dist_from_init`` (keeps one copy of the initial weights).
        log_clipped: also log ``grad_norm_clipped``.
        **options: :class:`~lightning_norm.callbacks._base.MonitorCallback`'s ``every_n_steps``
            (log every N optimizer steps), ``log_spaced``, ``points_per_octave`` and ``layers``
            (``None``: every module that owns parameters directly).

    Raises:
        ConfigurationError: ``norm_type`` is not a positive number (at construction).
        SelectionError: the selection matches no module (at ``setup``), or none of the selected
            modules has trainable parameters.

    Example::

        trainer = L.Trainer(callbacks=[GradientNorms(every_n_steps=10)],
                            logger=TensorBoardLogger("logs"))
    """

    def __init__(
        self,
        *,
        norm_type: float = 2.0,
        log_weight_norm: bool = True,
        log_update_ratio: bool = True,
        log_dist_from_init: bool = True,
        log_clipped: bool = False,
        **options: Unpack[MonitorOptions],
    ) -> None:
        super().__init__(**options)
        try:
            p = float(norm_type)
        except (TypeError, ValueError):
            p = float("nan")
        if isinstance(norm_type, bool) or not p > 0:
            raise ConfigurationError(
                f"`norm_type` must be a positive number (2.0 for the Euclidean norm, "
                f"float('inf') for the max norm), got {norm_type!r}."
            )
        self.norm_type = p
        self.log_weight_norm = log_weight_norm
        self.log_update_ratio = log_update_ratio
        self.log_dist_from_init = log_dist_from_init
        self.log_clipped = log_clipped
        self.norms: ParameterNorms | None = None
        self._init: list[Tensor] | None = None
        # the module ``_init`` was copied from: a later fit of the same module keeps the origin
        self._init_owner: weakref.ref[nn.Module] | None = None
        self._init_names: list[str] = []
        self._loaded_init: dict[str, Tensor] | None = None
        self._reset_batch()

    def default_selection(self) -> LayerSelection:
        return MODULES_WITH_PARAMETERS

    def state_key_settings(self) -> dict[str, Any]:
        return {**super().state_key_settings(), "norm_type": self.norm_type}

    def _reset_batch(self) -> None:
        self._step: int | None = None
        self._due = False
        self._before: list[Tensor] | None = None
        self._grad: Tensor | None = None
        self._stepped: list[int] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # A checkpoint's origin is restored after this hook (load_state_dict) when this fit
        # resumes; one loaded earlier (a `validate(ckpt_path=...)`) is not this fit's.
        self._loaded_init = None
        self.warn_if_no_logger(trainer)
        norms = ParameterNorms(pl_module, [(n or "root", m) for n, m in self.layers])
        if not norms.layer_names:
            raise ConfigurationError(
                f"None of the selected modules ({', '.join(n for n, _ in self.layers)}) has "
                f"trainable parameters; select modules that own parameters (the default, "
                f"layers=None, picks every module that does)."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Built here, not in setup: the strategy has moved the model to its device by now and a
        # checkpoint (model and callback state) has been restored.
        self.norms = ParameterNorms(pl_module, [(n or "root", m) for n, m in self.layers])
        self._reset_batch()
        if not self.log_dist_from_init:
            self._init = None
            return
        loaded = self._loaded_init or {}
        current = self.norms.snapshot()
        owner = self._init_owner() if self._init_owner is not None else None
        if not loaded and owner is pl_module and self._init is not None:
            # A second fit of the same module (no checkpoint restored): W(0) stays the first
            # fit's, so the series goes on as in one uninterrupted fit.
            loaded = dict(zip(self._init_names, self._init, strict=True))
        self._init = [
            loaded[n].to(device=c.device, dtype=c.dtype)
            if n in loaded and loaded[n].shape == c.shape
            else c
            for n, c in zip(self.norms.param_names, current, strict=True)
        ]
        self._init_names = list(self.norms.param_names)
        self._init_owner = weakref.ref(pl_module)
        self._loaded_init = None

    def release(self) -> None:
        super().release()
        self._reset_batch()

    # -- per step ------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._reset_batch()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        norms = self.norms
        if norms is None:
            return
        if self._step is None:
            self._step = trainer.global_step
            self._due = self.is_due(self._step)
        if not self._due:
            return
        if self._before is None and (self.log_update_ratio or self.log_weight_norm):
            self._before = norms.snapshot()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        positions = norms.positions(params)
        grad = norms.grad_norms(self.norm_type, positions)
        self._grad = grad if self._grad is None else self._grad + grad
        self._stepped += positions

    def measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any
    ) -> Measurement | None:
        norms = self.norms
        if norms is None or not self._due or self._grad is None or self._step is None:
            return None
        step, p = self._step, self.norm_type
        touched = [*norms.layers_touching(self._stepped), True]
        layer_names = [*norms.layer_names, "total"]
        names: list[str] = []
        parts: list[Tensor] = []

        def put(group: str, values: Tensor, only_touched: bool) -> None:
            keep = [i for i, hit in enumerate(touched) if hit or not only_touched]
            names.extend(f"{group}/{layer_names[i]}" for i in keep)
            parts.append(values if len(keep) == len(touched) else values[keep])

        put("grad_norm", norms.combine(self._grad, p), True)
        if self.log_clipped:
            put("grad_norm_clipped", norms.combine(norms.grad_norms(p, self._stepped), p), True)
        before = self._before
        if before is not None:
            weight = norms.combine(tensor_norms(before, 2.0), 2.0)
            if self.log_weight_norm:
                put("weight_norm", weight, False)
            if self.log_update_ratio:
                update = norms.combine(norms.distance_norms(before), 2.0)
                put("update_ratio", update / weight, True)
        if self._init is not None:
            origin = before if before is not None else norms.snapshot()
            dist = tensor_norms(torch._foreach_sub(list(origin), self._init), 2.0)
            put("dist_from_init", norms.combine(dist, 2.0), False)
        self._reset_batch()
        return Measurement(step, names, torch.cat(parts))

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._init is None or self.norms is None:
            return {"init": self._loaded_init} if self._loaded_init else {}
        return {
            "init": {
                n: t.detach().cpu().clone()
                for n, t in zip(self.norms.param_names, self._init, strict=True)
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_init = state_dict.get("init")

    def __getstate__(self) -> dict[str, Any]:
        # Weak references do not pickle (ddp_spawn pickles the callbacks); a worker's module is
        # a copy anyway.
        state = self.__dict__.copy()
        state["_init_owner"] = None
        return state


__all__ = ["MODULES_WITH_PARAMETERS", "GradientNorms"]
