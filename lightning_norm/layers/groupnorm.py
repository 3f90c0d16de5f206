"""Group normalization with an automatic, overridable group count, for any input rank."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers._common import AffineNorm, refuse_constant

#: The automatic group count is ``gcd(num_channels, DEFAULT_GROUPS)`` (Wu & He 2018 use 32).
DEFAULT_GROUPS = 32


class GroupNorm(AffineNorm):
    """Group normalization: each sample over groups of ``C / G`` channels and all positions.

    For sample ``n`` and group ``g`` (channels ``c`` in the group, all positions):
    ``y = gamma_c * (x - E[x]) / sqrt(Var[x] + eps) + beta_c`` with the mean and biased variance
    over the group's ``C/G * prod(spatial)`` values (Wu & He 2018). Same in train and eval.
    ``G = 1`` is :class:`LayerNorm`; ``G = C`` is instance normalization.

    Args:
        num_channels: ``C``, the size of dimension 1 of the input.
        num_groups: ``G``; ``None`` picks ``gcd(num_channels, 32)`` (32 groups where ``C`` is a
            multiple of 32, else the largest divisor of ``C`` that divides 32).
        eps: added to the variance.
        affine: learnable per-channel ``weight`` (ones) and ``bias`` (zeros).

    Raises:
        ConfigurationError: ``num_groups`` does not divide ``num_channels`` (at construction);
            a group holding a single value per sample, e.g. one channel per group on ``(N, C)``
            input, whose output would be the constant ``beta`` (at forward).

    Example::

        gn = GroupNorm(64)  # 32 groups of 2 channels
        y = gn(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
    ) -> None:
        super().__init__(num_channels, eps, affine)
        if num_groups is None:
            num_groups = math.gcd(num_channels, DEFAULT_GROUPS)
        if (
            isinstance(num_groups, bool)
            or not isinstance(num_groups, int)
            or num_groups < 1
            or num_channels % num_groups
        ):
            raise ConfigurationError(
                f"GroupNorm: `num_groups` must be a positive divisor of num_channels="
                f"{num_channels}, got {num_groups!r}. Leave it None for gcd(num_channels, 32)."
            )
        self.num_groups = num_groups

    def _normalize(self, x: Tensor) -> Tensor:
        refuse_constant(
            self,
            (self.num_channels // self.num_groups) * x[0, 0].numel() == 1,
            x,
            f"sample and group ({self.num_groups} groups of {self.num_channels} channels)",
            "Pass a smaller `num_groups` (e.g. 1, LayerNorm) for (N, C) input.",
        )
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, " + (
            f"affine={self.affine}"
        )
