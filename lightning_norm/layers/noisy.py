"""Noisy batch normalization: BatchNorm followed by S18's time-varying noise (Algorithm 1)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers._common import (
    channel_view,
    check_channels,
    check_source_bn,
    copy_matching,
)
from lightning_norm.layers.base import NormLayer
from lightning_norm.layers.batchnorm import BatchNorm


class _ApplyNoise(torch.autograd.Function):
    """``y = s * a + m`` written into ``m``'s buffer; the gradient is ``g * s`` (for ``a`` only).

    Autograd of ``addcmul`` would multiply ``s`` by its scalar factor in a full-size pass before
    multiplying by the gradient; here the backward is one multiplication and the forward
    allocates nothing (``s`` and ``m`` are the layer's own fresh noise buffers).
    """

    @staticmethod
    def forward(ctx, a: Tensor, s: Tensor, m: Tensor) -> Tensor:
        ctx.save_for_backward(s)
        ctx.mark_dirty(m)
        return m.addcmul_(s, a)

    @staticmethod
    def backward(ctx, g: Tensor):
        (s,) = ctx.saved_tensors
        return g * s, None, None


class NoisyBatchNorm(NormLayer):
    """BatchNorm whose output gets fresh non-zero-mean, non-unit-scale noise every training step.

    S18 App. A.2.1, Algorithm 1. With ``a = BN(x)`` (a child :class:`BatchNorm`, ``self.bn``), at
    every training forward:

    - per unit (channel) ``j``: ``mu_j ~ U(-n_mu, n_mu)``, ``sigma_j ~ U(1, n_sigma)``;
    - per sample ``i`` and unit ``j``: ``m_ij ~ U(mu_j - r_mu, mu_j + r_mu)``,
      ``s_ij ~ N(sigma_j, r_sigma)`` (``r_sigma`` is a standard deviation);
    - ``y_ij = s_ij * a_ij + m_ij``.

    For ``(N, C, *spatial)`` input every ``(n, position, channel)`` gets its own ``m`` and ``s``
    (spatial positions count as samples, as BN treats them). ``m`` is in the units of ``a``;
    ``s`` is dimensionless. In eval mode the layer is the BatchNorm alone (no noise).

    The noise is added after a child BatchNorm instead of subclassing ``_BatchNorm`` so that
    ``Trainer(sync_batchnorm=True)`` (which turns every ``_BatchNorm`` into a plain
    ``SyncBatchNorm``) syncs the child and keeps the noise.

    Args:
        num_channels: ``C``, the size of dimension 1 of the input.
        eps, momentum, affine, track_running_stats: of the inner BatchNorm.
        n_mu: half-width of the per-unit mean shift range (S18: 0.5).
        n_sigma: upper end of the per-unit scale range ``[1, n_sigma]`` (S18: 1.25).
        r_mu: half-width of the per-sample shift around ``mu_j`` (S18: 0.1).
        r_sigma: standard deviation of the per-sample scale around ``sigma_j`` (S18: 0.1).
        generator: draw the noise from this generator (on the input's device) instead of the
            global RNG, for reproducible noise independent of other random draws.

    Raises:
        ConfigurationError: a negative noise constant, ``n_sigma < 1``, a generator on another
            device than the input (at forward), or input of the wrong shape.

    Example::

        layer = NoisyBatchNorm(64, generator=torch.Generator().manual_seed(0))
        y = layer(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        n_mu: float = 0.5,
        n_sigma: float = 1.25,
        r_mu: float = 0.1,
        r_sigma: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.num_channels = check_channels(num_channels, type(self))
        for name, value in (("n_mu", n_mu), ("r_mu", r_mu), ("r_sigma", r_sigma)):
            if not float(value) >= 0:
                raise ConfigurationError(f"NoisyBatchNorm: `{name}` must be >= 0, got {value!r}.")
        if not float(n_sigma) >= 1:
            raise ConfigurationError(
                f"NoisyBatchNorm: `n_sigma` is the upper end of U(1, n_sigma) and must be >= 1, "
                f"got {n_sigma!r}."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigurationError(
                f"NoisyBatchNorm: `generator` must be a torch.Generator or None, got "
                f"{type(generator).__name__}."
            )
        self.n_mu, self.n_sigma = float(n_mu), float(n_sigma)
        self.r_mu, self.r_sigma = float(r_mu), float(r_sigma)
        self.generator = generator
        self.bn = BatchNorm(num_channels, eps, momentum, affine, track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        a = self.bn(x)
        if not self.training:
            return a
        mu, sigma = self._unit_params(a)
        m, s = self._sample_noise(a, mu, sigma)
        return _ApplyNoise.apply(a, s, m)

    def _unit_params(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """Per-unit ``mu_j ~ U(-n_mu, n_mu)`` and ``sigma_j ~ U(1, n_sigma)``, each ``(C,)``."""
        self._check_generator(a)
        u = torch.rand(2, a.shape[1], generator=self.generator, device=a.device, dtype=a.dtype)
        mu = u[0].mul_(2 * self.n_mu).sub_(self.n_mu)
        sigma = u[1].mul_(self.n_sigma - 1).add_(1.0)
        return mu, sigma

    def _sample_noise(self, a: Tensor, mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Per-element shift ``m`` and scale ``s`` around the per-unit parameters."""
        # In-place draws with the range folded into the kernel: the serial CPU generator is the
        # cost here, so each full-size tensor is drawn once and shifted in place, no temporaries.
        m = torch.empty_like(a, memory_format=torch.contiguous_format)
        m.uniform_(-self.r_mu, self.r_mu, generator=self.generator).add_(channel_view(mu, a))
        s = torch.empty_like(m)
        s.normal_(0.0, self.r_sigma, generator=self.generator).add_(channel_view(sigma, a))
        return m, s

    def _check_generator(self, a: Tensor) -> None:
        g = self.generator
        if g is not None and g.device.type != a.device.type:
            raise ConfigurationError(
                f"NoisyBatchNorm: the generator is on {g.device} but the input is on {a.device}. "
                f"Create it there: torch.Generator(device={str(a.device)!r}).manual_seed(seed)."
            )

    def load_from_batchnorm(self, bn: _BatchNorm) -> list[str]:
        """Copy ``bn``'s affine parameters, running statistics, eps and momentum into ``self.bn``.

        Returns:
            The names of ``bn``'s state that were copied.
        """
        check_source_bn(self, bn)
        state = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        done = copy_matching(self.bn, bn, state)
        self.bn.eps, self.bn.momentum = bn.eps, bn.momentum
        return [*done, "eps", "momentum"]

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, n_mu={self.n_mu}, n_sigma={self.n_sigma}, r_mu={self.r_mu}, "
            f"r_sigma={self.r_sigma}, generator={'set' if self.generator is not None else 'global'}"
        )
