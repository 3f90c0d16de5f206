"""Instance normalization for (N, C, L), (N, C, H, W) and (N, C, D, H, W) input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers._common import check_channels, check_input, check_source_bn, copy_affine
from lightning_norm.layers.base import NormLayer


class InstanceNorm(_InstanceNorm, NormLayer):
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
        track_running_stats: keep running statistics and use them in eval (torch semantics).

    Raises:
        ConfigurationError: ``(N, C)`` input, input of the wrong rank or channel count.

    Example::

        inorm = InstanceNorm(64)
        y = inorm(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        check_channels(num_channels, type(self))
        super().__init__(num_channels, eps, momentum, affine, track_running_stats, device, dtype)

    @property
    def num_channels(self) -> int:
        return self.num_features

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() == 2:
            raise ConfigurationError(
                f"InstanceNorm: (N, C) input {tuple(input.shape)} has one value per sample and "
                f"channel, which normalizes to a constant. Use LayerNorm or GroupNorm for "
                f"features without positions."
            )
        check_input(self, input, self.num_features, min_dim=3)

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

    def load_from_batchnorm(self, bn: _BatchNorm) -> list[str]:
        """Copy ``bn``'s per-channel ``weight`` and ``bias`` (if both are affine).

        Returns:
            The names of ``bn``'s state that were copied.
        """
        check_source_bn(self, bn)
        return copy_affine(self, bn)
