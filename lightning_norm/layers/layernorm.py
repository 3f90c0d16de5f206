"""Layer normalization per sample over (C, *spatial), and its per-position channels-first form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_norm.layers._common import AffineNorm, refuse_constant


class LayerNorm(AffineNorm):
    """Layer normalization of each sample over all its channels and positions.

    For a sample ``x`` of shape ``(C, *spatial)`` (Ba et al. 2016, as in ``science.md`` §3):
    ``y = gamma_c * (x - E[x]) / sqrt(Var[x] + eps) + beta_c`` with the mean and biased variance
    over all ``C * prod(spatial)`` values of the sample, and one ``gamma``/``beta`` per channel
    (not per element, so it drops in where BatchNorm was). Same in train and eval; no running
    statistics. Computed as ``F.group_norm`` with one group.

    Args:
        num_channels: ``C``, the size of dimension 1 of the input.
        eps: added to the variance.
        affine: learnable per-channel ``weight`` (ones) and ``bias`` (zeros).

    Raises:
        ConfigurationError: input of the wrong shape, or ``(N, 1)`` input (a single value per
            sample normalizes to a constant).

    Example::

        ln = LayerNorm(64)
        y = ln(torch.randn(8, 64, 16, 16))
    """

    def _normalize(self, x: Tensor) -> Tensor:
        refuse_constant(
            self, x[0].numel() == 1, x, "sample", "Use it where samples have several values."
        )
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


class LayerNormChannelsFirst(AffineNorm):
    """Layer normalization over the channels at each position (timm's ``LayerNorm2d``, any rank).

    For every sample ``n`` and position ``p``: ``y[n, :, p] = gamma * (x[n, :, p] - mean_c) /
    sqrt(var_c + eps) + beta`` with the mean and biased variance over the ``C`` channels. Same in
    train and eval; no running statistics. On ``(N, C)`` input it is ``nn.LayerNorm(C)``.

    Args:
        num_channels, eps, affine: as :class:`LayerNorm`.

    Raises:
        ConfigurationError: input of the wrong shape, or ``num_channels == 1`` at forward (one
            channel normalizes to a constant).

    Example::

        ln2d = LayerNormChannelsFirst(64)
        y = ln2d(torch.randn(8, 64, 16, 16))
    """

    def _normalize(self, x: Tensor) -> Tensor:
        refuse_constant(
            self,
            self.num_channels == 1,
            x,
            "position",
            "Use it on layers with more than one channel.",
        )
        # F.layer_norm needs channels last in memory; torch's channels_last copy is faster than
        # the generic copy of a permuted view, and the output keeps that layout.
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        y = F.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)
