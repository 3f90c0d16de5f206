"""Helpers shared by lightning_norm's layers: input checks, per-channel views, BN transfer."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers.base import NormLayer


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


def copy_matching(
    layer: nn.Module, src: nn.Module, names: tuple[str, ...] = ("weight", "bias")
) -> list[str]:
    """Copy each of ``names`` from ``src`` into ``layer`` where both hold a tensor of one shape.

    Returns:
        The names copied, in the order of ``names``.
    """
    done = []
    with torch.no_grad():
        for name in names:
            s, d = getattr(src, name, None), getattr(layer, name, None)
            if isinstance(s, Tensor) and isinstance(d, Tensor) and s.shape == d.shape:
                d.copy_(s)
                done.append(name)
    return done


def init_affine(layer: nn.Module, num_channels: int, affine: bool) -> None:
    """Give ``layer`` learnable per-channel ``weight`` (ones) and ``bias`` (zeros), or ``None``."""
    if affine:
        layer.weight = nn.Parameter(torch.ones(num_channels))
        layer.bias = nn.Parameter(torch.zeros(num_channels))
    else:
        layer.register_parameter("weight", None)
        layer.register_parameter("bias", None)


def refuse_constant(layer: nn.Module, degenerate: bool, x: Tensor, per: str, fix: str) -> None:
    """Refuse ``x`` where each set the layer normalizes holds one value (``degenerate``): the
    output would be the constant ``beta``. ``per`` names the set, ``fix`` says what to do."""
    if degenerate:
        raise ConfigurationError(
            f"{type(layer).__name__}: the input {tuple(x.shape)} has a single value per {per}, "
            f"which normalizes to a constant. {fix}"
        )


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


class TorchNormAdapter:
    """Mixin for our subclasses of torch's ``_BatchNorm``/``_InstanceNorm``.

    torch's constructor arguments with ``num_channels`` first and checked, ``num_channels`` as
    an alias of ``num_features``, and :func:`check_input` as the rank check (inputs of at least
    ``min_input_dim`` dimensions). ``track_running_stats=None`` takes the class's
    ``default_track_running_stats`` (torch's default for that kind of norm).
    """

    min_input_dim = 2
    default_track_running_stats = True

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool | None = None,
        device=None,
        dtype=None,
    ) -> None:
        check_channels(num_channels, type(self))
        if track_running_stats is None:
            track_running_stats = self.default_track_running_stats
        super().__init__(  # type: ignore[call-arg]
            num_channels, eps, momentum, affine, track_running_stats, device, dtype
        )

    @property
    def num_channels(self) -> int:
        return self.num_features  # type: ignore[attr-defined]

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self, input, self.num_channels, self.min_input_dim)  # type: ignore[arg-type]


class AffineFromBatchNorm:
    """Mixin: ``load_from_batchnorm`` for per-sample norms, which take only BN's weight and bias."""

    def load_from_batchnorm(self, bn: _BatchNorm) -> list[str]:
        """Copy ``bn``'s per-channel ``weight`` and ``bias`` (if both are affine).

        BN's running statistics and eps mean nothing for a per-sample normalization.

        Returns:
            The names of ``bn``'s state that were copied.
        """
        check_source_bn(self, bn)  # type: ignore[arg-type]
        return copy_matching(self, bn)  # type: ignore[arg-type]


class AffineNorm(AffineFromBatchNorm, NormLayer):
    """Base of the per-sample norms: ``num_channels``, ``eps``, optional per-channel affine.

    ``forward`` checks the input's shape and hands it to the subclass's ``_normalize``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_channels = check_channels(num_channels, type(self))
        if not float(eps) >= 0:
            raise ConfigurationError(f"{type(self).__name__}: `eps` must be >= 0, got {eps!r}.")
        self.eps, self.affine = float(eps), bool(affine)
        init_affine(self, num_channels, self.affine)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.num_channels)
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}"
