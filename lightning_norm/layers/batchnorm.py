"""Plain and frozen batch normalization for any input rank."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.layers._common import (
    TorchNormAdapter,
    channel_view,
    check_channels,
    check_input,
    check_source_bn,
    copy_matching,
)
from lightning_norm.layers.base import NormLayer


class BatchNorm(TorchNormAdapter, _BatchNorm, NormLayer):
    """Batch normalization that accepts ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` and 3-D input.

    Exactly :class:`torch.nn.BatchNorm2d` (IS15) without the rank check, so one class replaces
    ``BatchNorm1d/2d/3d``: per channel over batch and spatial positions,
    ``y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta`` (biased variance in training, running
    estimates with the unbiased variance in eval). Units: ``y`` is in units of ``gamma`` plus
    ``beta``. It is a ``_BatchNorm``, so ``SyncBatchNorm.convert_sync_batchnorm`` converts it.

    Args:
        num_channels: ``C``, the size of dimension 1 of the input.
        eps: added to the variance.
        momentum: running-estimate update factor (``None``: cumulative average).
        affine: learnable ``gamma`` (``weight``) and ``beta`` (``bias``).
        track_running_stats: keep ``running_mean``/``running_var`` for eval (``None``: yes).

    Raises:
        ConfigurationError: input of rank < 2 or > 5, or with the wrong channel count.

    Example::

        bn = BatchNorm(16)
        bn(torch.randn(8, 16)), bn(torch.randn(8, 16, 5, 5))
    """


class FrozenBatchNorm(NormLayer):
    """Batch normalization with fixed statistics and affine parameters (nothing trains).

    ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias`` per channel, in train
    and eval mode alike; all four tensors are buffers (saved in the state dict, never updated),
    as torchvision's ``FrozenBatchNorm2d``, but for any input rank.

    Args:
        num_channels: ``C``, the size of dimension 1 of the input.
        eps: added to ``running_var``.
        affine: accepted for symmetry with BatchNorm; ``False`` keeps ``weight = 1, bias = 0``
            (they are buffers either way).

    Raises:
        ConfigurationError: input of rank < 2 or > 5, or with the wrong channel count.

    Example::

        frozen = FrozenBatchNorm(16)
        frozen.load_from_batchnorm(trained_bn)
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_channels = check_channels(num_channels, type(self))
        self.eps = float(eps)
        self.affine = bool(affine)
        self.register_buffer("weight", torch.ones(num_channels))
        self.register_buffer("bias", torch.zeros(num_channels))
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.num_channels)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(channel_view(shift, x), x, channel_view(scale, x))

    def load_from_batchnorm(self, bn: _BatchNorm) -> list[str]:
        """Copy ``bn``'s running statistics, eps and (if both are affine) weight and bias.

        Returns:
            The names of ``bn``'s state that were copied.
        """
        check_source_bn(self, bn)
        names = ("weight", "bias") if self.affine else ()
        done = copy_matching(self, bn, (*names, "running_mean", "running_var"))
        self.eps = float(bn.eps)
        return [*done, "eps"]

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"
