"""Helpers shared by lightning_norm's layers: input checks, per-channel views, BN transfer."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError


def check_input(layer: nn.Module, x: Tensor, num_channels: int, min_dim: int = 2) -> None:
    """Refuse an input that is not ``(N, C, *spatial)`` with ``C == num_channels``."""
    if x.dim() < min_dim or x.dim() > 5:
        ranks = "(N, C), (N, C, L)" if min_dim == 2 else "(N, C, L)"
        raise ConfigurationError(
            f"{type(layer).__name__} expects a {ranks}, (N, C, H, W) or (N, C, D, H, W) input, "
            f"got shape {tuple(x.shape)}. Reshape the input so channels are dimension 1."
        )
    if x.shape[1] != num_channels:
        raise ConfigurationError(
            f"{type(layer).__name__} was built for {num_channels} channels but the input has "
            f"{x.shape[1]} at dimension 1 (shape {tuple(x.shape)}). Build it with "
            f"num_channels={x.shape[1]} or feed channels-first input."
        )


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """``t`` of shape ``(C,)`` viewed as ``(1, C, 1, ...)`` to broadcast against ``x``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions a per-channel batch statistic reduces over: batch and spatial."""
    return (0, *range(2, x.dim()))


def check_channels(num_channels: int, cls: type) -> int:
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ConfigurationError(
            f"{cls.__name__}: `num_channels` must be a positive int (the size of dimension 1 of "
            f"the input), got {num_channels!r}."
        )
    return num_channels


def copy_affine(layer: nn.Module, bn: _BatchNorm) -> list[str]:
    """Copy ``weight``/``bias`` from ``bn`` into ``layer`` where both have them, same shape."""
    done = []
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(bn, name, None), getattr(layer, name, None)
            if isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                done.append(name)
    return done


def check_source_bn(layer: nn.Module, bn: nn.Module) -> None:
    if not isinstance(bn, _BatchNorm):
        raise ConfigurationError(
            f"{type(layer).__name__}.load_from_batchnorm needs a BatchNorm module (a torch "
            f"`_BatchNorm`), got {type(bn).__name__}."
        )
    if bn.num_features != layer.num_channels:
        raise ConfigurationError(
            f"{type(layer).__name__} has {layer.num_channels} channels but the BatchNorm has "
            f"{bn.num_features}; build the layer with num_channels={bn.num_features}."
        )
