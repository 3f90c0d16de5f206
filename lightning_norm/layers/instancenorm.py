"""Instance normalization for (N, C, L), (N, C, H, W) and (N, C, D, H, W) input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_norm.layers._common import AffineFromBatchNorm, TorchNormAdapter, refuse_constant
from lightning_norm.layers.base import NormLayer


class InstanceNorm(TorchNormAdapter, AffineFromBatchNorm, _InstanceNorm, NormLayer):
    """Instance normalization: each sample and channel over its positions, for any spatial rank.

    ``y[n, c] = gamma_c * (x[n, c] - E[x[n, c]]) / sqrt(Var[x[n, c]] + eps) + beta_c`` with the
    mean and biased variance over the positions of ``x[n, c]`` (Ulyanov et al. 2016). Unlike
    torch's ``InstanceNorm1d`` it never reads a 2-D input as one unbatched sample: ``(N, C)``
    input is refused, since each ``(n, c)`` would hold one value and normalize to a constant.

    Args:
        num_channels: ``C``, the size of dimension 1 of the input.
        eps: added to the variance.
        momentum: running-estimate factor when ``track_running_stats``.
        affine: learnable per-channel ``weight`` (ones) and ``bias`` (zeros); torch's default is
            ``False``, ours ``True`` since it replaces an affine BatchNorm.
        track_running_stats: keep running statistics and use them in eval (torch semantics;
            ``None``: no, torch's default).

    Raises:
        ConfigurationError: ``(N, C)`` input, input of the wrong rank or channel count.

    Example::

        inorm = InstanceNorm(64)
        y = inorm(torch.randn(8, 64, 16, 16))
    """

    min_input_dim = 3
    default_track_running_stats = False

    def _check_input_dim(self, input: Tensor) -> None:
        refuse_constant(
            self,
            input.dim() == 2,
            input,
            "sample and channel",
            "Use LayerNorm or GroupNorm for (N, C) input (features without positions).",
        )
        super()._check_input_dim(input)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
