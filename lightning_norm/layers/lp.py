"""Lp batch normalization (S18 Sec. 3.3): centre like BN, divide by the Lp scale of the raw x."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers._common import (
    channel_view,
    check_channels,
    check_input,
    check_source_bn,
    copy_matching,
    init_affine,
    reduce_dims,
)
from lightning_norm.layers.base import NormLayer


def parse_p(p: float | int | str) -> float:
    """``1``, ``2`` or ``inf`` (as ``float('inf')``, ``math.inf`` or the string ``"inf"``)."""
    try:
        value = float(p) if not isinstance(p, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if value not in (1.0, 2.0, math.inf):
        raise ConfigurationError(
            f"LpBatchNorm: `p` must be 1, 2 or inf (also 'inf' or float('inf')), got {p!r}."
        )
    return value


class _LocalStats(torch.autograd.Function):
    """Per-channel ``sum x`` and ``sum |x|^p`` (``max |x|`` for p = inf) with a one-pass backward.

    Autograd of ``x.sum`` + a norm would spend two full-size passes each on the way back;
    ``d/dx = ds1 + dsp * p |x|^(p-1) sign(x)`` is one ``addcmul``. For p = inf the maximum is
    taken per ``(n, c)`` row first (a contiguous reduction, much faster than one over
    ``(N, *spatial)``), and the backward only scans the rows whose maximum is the channel's.
    The backward is made of differentiable ops, so double backward still works.
    """

    @staticmethod
    def forward(x: Tensor, p: float, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        dims = reduce_dims(x)
        s1 = x.sum(dims, dtype=acc)
        if p == 2 and x.dtype in (torch.float32, torch.float64):
            sp = (x * x).sum(dims)
        elif p == math.inf:
            rows = x.reshape(x.shape[0], x.shape[1], -1)
            row_max = torch.maximum(rows.amax(-1), rows.amin(-1).neg())
            return s1, row_max.amax(0).to(acc), row_max
        else:
            # Half precision: the norm accumulates in float32, so squares cannot overflow.
            norm = torch.linalg.vector_norm(x, p, dims, dtype=acc)
            sp = norm * norm if p == 2 else norm
        return s1, sp, None

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, p, _ = inputs
        ctx.p = p
        ctx.save_for_backward(x, output[1], output[2])
        ctx.mark_non_differentiable(*(o for o in output[2:] if o is not None))

    @staticmethod
    def backward(ctx, ds1: Tensor, dsp: Tensor, _unused: Tensor | None = None):
        x, sp, row_max = ctx.saved_tensors
        ds1 = channel_view(ds1.to(x.dtype), x)
        if ctx.p == 2:
            coef = 2 * dsp
            direction = x
        elif ctx.p == 1:
            coef = dsp
            direction = torch.sign(x)
        else:
            return _max_abs_backward(x, sp, row_max, ds1, dsp), None, None
        return torch.addcmul(ds1, direction, channel_view(coef.to(x.dtype), x)), None, None


def _max_abs_backward(x: Tensor, top: Tensor, row_max: Tensor, ds1: Tensor, dsp: Tensor):
    """``ds1`` broadcast, plus ``dsp`` at the elements attaining ``max |x|`` of their channel,
    shared equally among ties (as ``torch.amax``). Only rows holding the maximum are scanned."""
    n, c = x.shape[:2]
    rows = x.reshape(n, c, -1)
    top = top.to(x.dtype)
    cand_n, cand_c = (row_max == top).nonzero(as_tuple=True)
    hit_row, hit_pos = (rows[cand_n, cand_c].abs() == top[cand_c, None]).nonzero(as_tuple=True)
    n_i, c_i = cand_n[hit_row], cand_c[hit_row]
    ties = torch.bincount(c_i, minlength=c).clamp_min(1).to(dsp.dtype)
    values = (dsp / ties).to(x.dtype)[c_i] * torch.sign(rows[n_i, c_i, hit_pos])
    dx = ds1.reshape(1, c, 1).expand(n, c, rows.shape[-1]).clone()
    return dx.index_put((n_i, c_i, hit_pos), values, accumulate=True).view(x.shape)


class _ChannelAffine(torch.autograd.Function):
    """``y = x * a + b`` with per-channel ``a``, ``b``; the backward is one fused native kernel.

    ``native_batch_norm_backward`` in eval mode with zero mean and unit variance returns exactly
    ``(g * a, sum g * x, sum g)``, the three gradients, in one kernel.
    """

    @staticmethod
    def forward(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.addcmul(channel_view(b, x), x, channel_view(a, x))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, a, _ = inputs
        ctx.save_for_backward(x, a)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, a = ctx.saved_tensors
        zeros, ones = torch.zeros_like(a), torch.ones_like(a)
        dx, da, db = torch.ops.aten.native_batch_norm_backward(
            g.contiguous(), x, a, zeros, ones, None, None, False, 0.0, [True, True, True]
        )
        return dx, da, db


class LpBatchNorm(NormLayer):
    """Per-channel normalization by the mean and the Lp norm of the uncentred activations.

    The reading of S18 Sec. 3.3 in ``science.md`` §3. Per channel over batch and spatial
    positions (the ``n`` elements of the channel):

    - ``mu = (1/n) sum x``;
    - ``scale_p = ((1/n) sum |x|^p)^(1/p)`` for ``p = 1, 2``; ``scale_inf = max |x|``
      (both on the UNcentred ``x``);
    - ``y = gamma * (x - mu) / (scale_p + eps) + beta``.

    ``scale_p`` has the units of ``x``, so ``(x - mu) / scale_p`` is dimensionless. In training
    the running estimates follow ``r <- (1 - momentum) * r + momentum * batch_value`` for ``mu``
    (``running_mean``) and ``scale_p`` (``running_scale``, no bias correction: it is not a
    variance); eval uses them. ``momentum=None`` gives a cumulative average. With
    ``track_running_stats=False`` eval also uses batch statistics.

    The batch statistics are computed as per-channel partial sums (``count``, ``sum x``,
    ``sum |x|^p`` or ``max |x|``) that :meth:`_combine` turns into the global ones; the base class
    returns them unchanged, the synchronized version all-reduces them across processes.

    Args:
        num_channels: ``C``, the size of dimension 1 of the input.
        p: 1, 2 or ``inf`` (also ``"inf"``).
        eps: added to ``scale_p``.
        momentum: running-estimate update factor (``None``: cumulative average).
        affine: learnable ``gamma`` (``weight``, ones) and ``beta`` (``bias``, zeros).
        track_running_stats: keep ``running_mean``/``running_scale`` for eval.

    Raises:
        ConfigurationError: ``p`` not in {1, 2, inf}, ``eps < 0``, input of the wrong shape, or a
            training batch with a single value per channel.

    Example::

        lp1 = LpBatchNorm(64, p=1)
        y = lp1(torch.randn(8, 64, 16, 16))
    """

    def __init__(
        self,
        num_channels: int,
        p: float | int | str = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.num_channels = check_channels(num_channels, type(self))
        self.p = parse_p(p)
        if not float(eps) >= 0:
            raise ConfigurationError(f"LpBatchNorm: `eps` must be >= 0, got {eps!r}.")
        if momentum is not None and not 0 <= float(momentum) <= 1:
            raise ConfigurationError(
                f"LpBatchNorm: `momentum` must be in [0, 1] or None, got {momentum!r}."
            )
        self.eps, self.momentum = float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        #: Use the hand-written fused backward (False: plain autograd, the reference path).
        self.fused = True
        init_affine(self, num_channels, self.affine)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels))
            self.register_buffer("running_scale", torch.ones(num_channels))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_scale", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.num_channels)
        if self.training or not self.track_running_stats:
            mu, scale = self._batch_stats(x)
            if self.training and self.track_running_stats:
                self._update_running(mu.detach(), scale.detach())
        else:
            mu, scale = self.running_mean, self.running_scale
        # One fused pass for the output: y = x * a + b with per-channel a, b.
        a = 1.0 / (scale + self.eps)
        if self.weight is not None:
            a = a * self.weight
        b = -mu * a
        if self.bias is not None:
            b = b + self.bias
        a, b = a.to(x.dtype), b.to(x.dtype)
        if self.fused:
            return _ChannelAffine.apply(x, a, b)
        return torch.addcmul(channel_view(b, x), x, channel_view(a, x))

    def _local_stats(self, x: Tensor) -> tuple[int, Tensor, Tensor]:
        """This process's per-channel ``count``, ``sum x`` and ``sum |x|^p`` (or ``max |x|``)."""
        dims = reduce_dims(x)
        # Accumulate half-precision input in float32: sums of squares overflow float16.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        count = x.numel() // x.shape[1]
        if self.fused:
            s1, sp, _ = _LocalStats.apply(x, self.p, acc)
            return count, s1, sp
        s1 = x.sum(dims, dtype=acc)
        if self.p == 1:
            sp = x.abs().sum(dims, dtype=acc)
        elif self.p == 2:
            sp = (x * x).sum(dims, dtype=acc)
        else:
            sp = x.abs().amax(dims).to(acc)
        return count, s1, sp

    def _combine(self, count: int, s1: Tensor, sp: Tensor) -> tuple[int | Tensor, Tensor, Tensor]:
        """Turn local partial statistics into the global ones (identity on one process).

        Sums add across processes; for ``p = inf`` ``sp`` is a maximum. Overridden by the
        synchronized version, which must keep the autograd graph to the local inputs.
        """
        if self.training and count < 2:
            raise ConfigurationError(
                f"LpBatchNorm: a training batch needs more than one value per channel, got "
                f"{count}; use a larger batch (or spatial input) or eval mode."
            )
        return count, s1, sp

    def _batch_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        count, s1, sp = self._combine(*self._local_stats(x))
        mu = s1 / count
        if self.p == 1:
            scale = sp / count
        elif self.p == 2:
            scale = torch.sqrt(sp / count)
        else:
            scale = sp
        return mu, scale

    def _update_running(self, mu: Tensor, scale: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = float(self.momentum)
        self.running_mean.lerp_(mu.to(self.running_mean.dtype), factor)
        self.running_scale.lerp_(scale.to(self.running_scale.dtype), factor)

    def load_from_batchnorm(self, bn: _BatchNorm) -> list[str]:
        """Copy ``bn``'s affine parameters, ``running_mean``, eps and momentum.

        For ``p = 2`` the running Lp scale is derived from the BN statistics,
        ``running_scale = sqrt(running_var + running_mean^2)`` (the RMS of the uncentred x); for
        ``p = 1`` and ``inf`` the BN statistics do not determine it and it stays at 1.

        Returns:
            The names of ``bn``'s state that were used.
        """
        check_source_bn(self, bn)
        done = copy_matching(self, bn)
        if self.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                self.running_mean.copy_(bn.running_mean)
                done.append("running_mean")
                if self.p == 2 and bn.running_var is not None:
                    self.running_scale.copy_(torch.sqrt(bn.running_var + bn.running_mean**2))
                    done.append("running_var")
                if bn.num_batches_tracked is not None:
                    self.num_batches_tracked.copy_(bn.num_batches_tracked)
                    done.append("num_batches_tracked")
        self.eps, self.momentum = float(bn.eps), bn.momentum
        return [*done, "eps", "momentum"]

    def extra_repr(self) -> str:
        p = "inf" if self.p == math.inf else int(self.p)
        return (
            f"{self.num_channels}, p={p}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
