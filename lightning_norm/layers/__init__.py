"""lightning_norm's normalization layers (plain PyTorch) and their registry by name.

Every layer takes ``num_channels`` first and accepts ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``
and ``(N, C, D, H, W)`` input (InstanceNorm: not ``(N, C)``); see ``docs/layers.md``.
"""

from lightning_norm.layers.base import NormLayer
from lightning_norm.layers.batchnorm import BatchNorm, FrozenBatchNorm
from lightning_norm.layers.groupnorm import GroupNorm
from lightning_norm.layers.instancenorm import InstanceNorm
from lightning_norm.layers.layernorm import LayerNorm, LayerNormChannelsFirst
from lightning_norm.layers.lp import LpBatchNorm
from lightning_norm.layers.noisy import NoisyBatchNorm
from lightning_norm.layers.registry import (
    available_norms,
    create_norm,
    register_norm,
    resolve_norm,
)

__all__ = [
    "BatchNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LayerNormChannelsFirst",
    "LpBatchNorm",
    "NoisyBatchNorm",
    "NormLayer",
    "available_norms",
    "create_norm",
    "register_norm",
    "resolve_norm",
]
