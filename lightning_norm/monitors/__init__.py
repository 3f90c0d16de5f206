"""Measurement cores behind the monitoring callbacks (plain PyTorch, no Lightning import).

* :class:`~lightning_norm.monitors.activations.ActivationRecorder` -- forward hooks that
  accumulate activation moments, non-finite counts and percentile subsamples on the device;
* :class:`~lightning_norm.monitors.weights.ParameterNorms` -- per-layer gradient, weight, update
  and distance-from-init norms computed with a few fused kernels.
"""

from lightning_norm.monitors.activations import ActivationRecorder, LayerStats
from lightning_norm.monitors.weights import ParameterNorms

__all__ = ["ActivationRecorder", "LayerStats", "ParameterNorms"]
