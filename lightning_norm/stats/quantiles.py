"""Percentiles of large activations from fixed, seeded subsamples, computed on the device.

Plain PyTorch. Exact percentiles need a sort of every value (``torch.quantile`` also refuses
inputs above 16M elements), which costs more than the forward pass of a small layer. A
:class:`Subsampler` therefore keeps up to ``size`` values: all of them when the tensor has at
most ``size`` values (the percentiles are then exact), otherwise a uniform sample without
replacement at positions drawn once per shape from a private, seeded generator (so the global RNG
streams are untouched and the same positions are read at every step). Unused slots hold NaN, so
samples of different lengths stack into one fixed-size tensor and :func:`percentiles` ignores
the padding (``torch.nanquantile``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Position sets a Subsampler keeps (one per tensor size); the oldest is dropped beyond.
MAX_CACHED_SHAPES = 64
#: IS15 Fig. 1 plots these percentiles; S18 Fig. 1/2 reuse them.
DEFAULT_QUANTILES: tuple[float, ...] = (0.15, 0.50, 0.85)


class Subsampler:
    """Reads a fixed-size, seeded subsample of a tensor's values (NaN-padded) on its device.

    Args:
        size: number of values kept per row (>= 1).
        seed: seed of the private generator that draws the positions.

    Raises:
        ValueError: ``size`` is not a positive integer.

    Example::

        sub = Subsampler(1024)
        values = sub.flat(activation)  # (1024,), exact values if activation.numel() <= 1024
        percentiles(values)            # p15, p50, p85
    """

    def __init__(self, size: int = 1024, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"`size` must be a positive integer, got {size!r}.")
        self.size = size
        self.seed = seed
        self._cache: dict[tuple[int, str], Tensor] = {}

    def positions(self, n: int, device: torch.device) -> Tensor:
        """Sorted positions in ``range(n)`` to read (``min(n, size)`` of them)."""
        key = (n, str(device))
        idx = self._cache.get(key)
        if idx is None:
            if n <= self.size:
                idx = torch.arange(n)
            else:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + n)
                idx = torch.randperm(n, generator=g)[: self.size].sort().values
            idx = idx.to(device)
            if len(self._cache) >= MAX_CACHED_SHAPES:
                # Variable shapes (sequence lengths, a short last batch) must not grow memory.
                del self._cache[next(iter(self._cache))]
            self._cache[key] = idx
        return idx

    def flat(self, x: Tensor) -> Tensor:
        """``(size,)``: values of ``x`` (any shape, read in logical order), NaN-padded."""
        idx = self.positions(x.numel(), x.device)
        return self._pad(torch.take(x, idx).float())

    def rows(self, x: Tensor) -> Tensor:
        """``(rows, size)``: a subsample of each row of the 2-d ``x``, same columns per row."""
        idx = self.positions(x.shape[1], x.device)
        return self._pad(x.index_select(1, idx).float())

    def _pad(self, v: Tensor) -> Tensor:
        missing = self.size - v.shape[-1]
        if missing > 0:
            v = torch.nn.functional.pad(v, (0, missing), value=float("nan"))
        return v


def sort_last(samples: Tensor) -> Tensor:
    """``samples`` sorted along the last dim, NaN last (on the CPU through NumPy's SIMD sort).

    NumPy's sort is about 8x faster than ``torch.sort`` on the CPU for rows of ~1000 floats,
    the percentile step's main cost; both order NaN after every number.
    """
    if samples.device.type == "cpu" and samples.dtype in (torch.float32, torch.float64):
        try:
            import numpy as np

            return torch.from_numpy(np.sort(samples.detach().contiguous().numpy(), axis=-1))
        except (ImportError, RuntimeError, TypeError):  # no NumPy, or a tensor it cannot view
            pass
    return torch.sort(samples, dim=-1).values


def percentiles(samples: Tensor, q: Sequence[float] = DEFAULT_QUANTILES) -> Tensor:
    """Percentiles of ``samples`` along the last dim, NaN ignored: shape ``(*rows, len(q))``.

    Linear interpolation between order statistics, ``torch.quantile``'s default: with ``n``
    non-NaN values sorted into ``v``, ``pos = q (n - 1)`` and the result is
    ``v[floor(pos)] + (v[floor(pos) + 1] - v[floor(pos)]) * (pos - floor(pos))``. A row with no
    value gives NaN.
    """
    s = sort_last(samples)
    qs = torch.tensor(list(q), dtype=s.dtype, device=s.device)
    last = (~torch.isnan(s)).sum(-1, keepdim=True) - 1  # index of the largest number per row
    pos = qs * last.clamp(min=0).to(s.dtype)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, last.clamp(min=0))
    v_lo, v_hi = s.gather(-1, lo), s.gather(-1, hi)
    out = v_lo + (v_hi - v_lo) * (pos - lo.to(s.dtype))
    return torch.where(last >= 0, out, torch.full_like(out, float("nan")))
