"""Probes that re-run a training step at other parameter values (plain PyTorch, no Lightning).

* :mod:`~lightning_norm.probes.replay` -- :class:`StepReplay`: the training step's loss and
  gradient at overridden parameters, same batch, random draws and precision, leaving no trace;
* :mod:`~lightning_norm.probes.ics` -- :func:`ics_drift`: internal covariate shift as gradient
  drift (S18 Definition 2.1);
* :mod:`~lightning_norm.probes.landscape` -- :func:`gradient_landscape` on an :class:`EtaGrid`:
  loss variation, gradient predictiveness and effective beta-smoothness along the gradient
  (S18 Sec. 3.2), and :func:`loss_slice` along given directions;
* :mod:`~lightning_norm.probes.hessian` -- :class:`HessianOperator`: Hessian-vector products,
  power iteration for the top eigenvalue, Hutchinson's trace;
* :mod:`~lightning_norm.probes.directions` -- filter-normalized random directions (Li et al.
  2018).
"""

from lightning_norm.probes.directions import filter_normalized_direction, random_direction
from lightning_norm.probes.hessian import EigenResult, HessianOperator, top_hessian_eigenvalue
from lightning_norm.probes.ics import ICSResult, LayerDrift, ics_drift, record_forward_order
from lightning_norm.probes.landscape import (
    EtaGrid,
    GradientLandscape,
    autograd_loss_and_grad,
    gradient_landscape,
    loss_slice,
)
from lightning_norm.probes.replay import (
    ReplayError,
    RngState,
    StepReplay,
    all_reduce_mean,
    is_replaying,
    preserved_rng,
)

__all__ = [
    "EigenResult",
    "EtaGrid",
    "GradientLandscape",
    "HessianOperator",
    "ICSResult",
    "LayerDrift",
    "ReplayError",
    "RngState",
    "StepReplay",
    "all_reduce_mean",
    "autograd_loss_and_grad",
    "filter_normalized_direction",
    "gradient_landscape",
    "ics_drift",
    "is_replaying",
    "loss_slice",
    "preserved_rng",
    "random_direction",
    "record_forward_order",
    "top_hessian_eigenvalue",
]
