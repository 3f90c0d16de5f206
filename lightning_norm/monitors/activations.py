"""Activation statistics from forward hooks, accumulated on the device (plain PyTorch).

An :class:`ActivationRecorder` registers one forward hook per selected module. While it is
*armed* each call of a module adds its output (or input) to per-layer accumulators: the moments
of the whole tensor, the count of non-finite values, the moments of a few sampled units (a unit is
one index along ``channel_dim``, its sample every other position: (N, H, W) for a conv layer) and
fixed-size subsamples for percentiles. Nothing leaves the device in the hook.
:meth:`ActivationRecorder.compute` packs every layer into one tensor, gathers it from all ranks
in one collective, merges, and returns device tensors; the caller moves them to the host once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_norm.probes.replay import is_replaying
from lightning_norm.sink import Histogram
from lightning_norm.stats import (
    DEFAULT_QUANTILES,
    Moments,
    Scratch,
    Subsampler,
    as_accumulation_dtype,
    gather_stack,
    percentiles,
)

#: What an armed recorder collects: everything, or only the sampled units' moments (enough for
#: the step before a measured one, whose unit moments give the deltas).
FULL, UNITS = "full", "units"
#: Subsample chunks kept per layer and step (one per module call); bounds memory when a step
#: spans many micro-batches or a module is called many times.
MAX_CHUNKS = 64


@dataclass
class LayerStats:
    """Merged statistics of one layer over one optimizer step (all micro-batches and ranks).

    Tensors are on the device. ``quantiles`` and ``unit_quantiles`` are ``None`` for a
    units-only step; ``units`` holds the sampled unit indices.
    """

    whole: Moments
    nonfinite: Tensor
    unit_moments: Moments
    quantiles: Tensor | None
    unit_quantiles: Tensor | None
    units: list[int]


@dataclass
class _Accumulator:
    whole: Moments | None = None
    nonfinite: Tensor | None = None
    units: Moments | None = None
    samples: list[Tensor] = field(default_factory=list)
    unit_samples: list[Tensor] = field(default_factory=list)


class ActivationRecorder:
    """Forward hooks that accumulate activation statistics of selected modules while armed.

    Args:
        layers: ``(qualified_name, module)`` pairs to watch.
        num_units: units sampled per layer (fewer if the layer has fewer channels).
        seed: seed of the private generator choosing units and subsample positions (the global
            RNG is never touched).
        channel_dim: the dim that indexes units (1 for ``(N, C, ...)``; -1 for ``(N, L, C)``).
        capture: ``"output"`` or ``"input"`` (first positional tensor argument) of the module.
        quantile_samples: values kept per layer and per unit for percentiles; percentiles are
            exact when a rank's tensor (or unit) has at most this many values.
        quantiles: the percentiles to compute, as fractions.

    Raises:
        ValueError: a setting is out of range.

    Example::

        rec = ActivationRecorder(LayerSelection().resolve(net))
        rec.attach()
        rec.arm(FULL)
        net(x)
        stats = rec.compute()  # {"features.1": LayerStats(...), ...}
        rec.detach()
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, nn.Module]],
        *,
        num_units: int = 8,
        seed: int = 0,
        channel_dim: int = 1,
        capture: str = "output",
        quantile_samples: int = 1024,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
    ) -> None:
        if capture not in ("output", "input"):
            raise ValueError(f"`capture` must be 'output' or 'input', got {capture!r}.")
        if isinstance(num_units, bool) or not isinstance(num_units, int) or num_units < 0:
            raise ValueError(f"`num_units` must be an integer >= 0, got {num_units!r}.")
        self.layers = list(layers)
        self.num_units = num_units
        self.seed = seed
        self.channel_dim = channel_dim
        self.capture = capture
        self.quantiles = tuple(quantiles)
        self.subsampler = Subsampler(quantile_samples, seed)
        #: unit indices per layer, chosen on the layer's first call (they need its width).
        self.units: dict[str, list[int]] = {}
        self._unit_index: dict[tuple[str, str], Tensor] = {}
        self._acc: dict[str, _Accumulator] = {}
        # Only the CPU needs it: accelerators' caching allocators make temporaries cheap.
        self._scratch = Scratch()
        self._handles: list[Any] = []
        self.mode: str | None = None
        #: When set, the next call of each layer also stores a histogram of its values here.
        self.histogram_bins: int | None = None
        self.histograms: dict[str, Histogram] = {}

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self.layers:
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove the hooks and drop any accumulated values."""
        while self._handles:
            self._handles.pop().remove()
        self.disarm()
        self._scratch.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def arm(self, mode: str = FULL) -> None:
        """Start accumulating (``FULL`` or ``UNITS``); values from earlier calls are dropped."""
        if mode not in (FULL, UNITS):
            raise ValueError(f"mode must be {FULL!r} or {UNITS!r}, got {mode!r}.")
        self.mode = mode
        self._acc = {}
        self.histograms = {}

    def disarm(self) -> None:
        """Stop accumulating and drop the accumulated values."""
        self.mode = None
        self._acc = {}
        self.histogram_bins = None
        self.histograms = {}

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # A probe's replayed forward (ICS, landscape) is not the training step's activation.
            if self.mode is None or is_replaying():
                return
            value = output if self.capture == "output" else (args[0] if args else None)
            if isinstance(value, (tuple, list)):
                value = next((v for v in value if isinstance(v, Tensor)), None)
            if isinstance(value, Tensor) and value.is_floating_point() and value.numel() > 0:
                with torch.no_grad():
                    self._record(name, value.detach())

        return hook

    # -- accumulation --------------------------------------------------------------------------
    def _choose_units(self, name: str, width: int) -> list[int]:
        units = self.units.get(name)
        if units is None:
            # A per-layer stream from the seed: units are fixed for the whole run, independent of
            # which other layers are selected, and the global RNG is left alone.
            offset = sum(name.encode())
            g = torch.Generator().manual_seed(self.seed * 7919 + offset)
            k = min(self.num_units, width)
            units = sorted(torch.randperm(width, generator=g)[:k].tolist())
            self.units[name] = units
        return units

    def _unit_index_for(self, name: str, width: int, device: torch.device) -> Tensor:
        key = (name, str(device))
        idx = self._unit_index.get(key)
        if idx is None:
            units = self._choose_units(name, width)
            idx = torch.tensor(units, dtype=torch.long, device=device)
            self._unit_index[key] = idx
        return idx

    def _unit_rows(self, name: str, x: Tensor) -> Tensor | None:
        """``(units, values)``: the sampled units of ``x`` as rows (a copy of ``k/C`` of ``x``)."""
        if x.dim() < 2 or self.num_units == 0:
            return None
        cdim = self.channel_dim % x.dim()
        idx = self._unit_index_for(name, x.shape[cdim], x.device)
        # index_select on the moved-to-front dim writes the rows contiguously: one copy, not two
        rows = x.movedim(cdim, 0).index_select(0, idx)
        return as_accumulation_dtype(rows.reshape(len(idx), -1))

    def _record(self, name: str, x: Tensor) -> None:
        if (
            x.device.type == "cpu"
            and x.dim() >= 2
            and self.channel_dim % x.dim() == 1
            and x.is_contiguous()
        ):
            self._record_cpu_channels_first(name, x)
            return
        acc = self._acc.setdefault(name, _Accumulator())
        rows = self._unit_rows(name, x)
        if rows is not None:
            if rows.device.type == "cpu":
                um, _ = Moments.from_tensor_checked(rows, dim=1, scratch=self._scratch)
            else:
                um = Moments.from_tensor(rows, dim=1)
            acc.units = um if acc.units is None else acc.units.merge(um)
        if self.mode != FULL:
            return
        xf = as_accumulation_dtype(x)
        if xf.device.type == "cpu":
            # Reading a scalar costs no device sync on the CPU: raw sums, with a shifted
            # recompute only when ill-conditioned, and the non-finite count only when the sum
            # of squares says there is something to count.
            wm, finite = Moments.from_tensor_checked(xf, scratch=self._scratch)
        else:
            wm, finite = Moments.from_tensor(xf), False
        acc.whole = wm if acc.whole is None else acc.whole.merge(wm)
        if finite:
            bad = torch.zeros((), dtype=torch.long, device=xf.device)
        else:
            bad = xf.numel() - torch.isfinite(xf).sum()
        acc.nonfinite = bad if acc.nonfinite is None else acc.nonfinite + bad
        if len(acc.samples) < MAX_CHUNKS:
            # Slice off the NaN padding now (its length is known on the host): the concatenated
            # chunks then hold only real values and stay exact while they fit in `size`.
            keep = min(xf.numel(), self.subsampler.size)
            acc.samples.append(self.subsampler.flat(xf)[:keep])
            if rows is not None:
                keep = min(rows.shape[1], self.subsampler.size)
                acc.unit_samples.append(self.subsampler.rows(rows)[:, :keep])
        if self.histogram_bins is not None and name not in self.histograms:
            self.histograms[name] = Histogram.from_tensor(xf, self.histogram_bins)

    def _record_cpu_channels_first(self, name: str, x: Tensor) -> None:
        """CPU fast path for ``(N, C, ...)`` tensors: one pass gives every channel's raw sums.

        The whole tensor's sums and the sampled units' follow from the per-channel ``sum(x)``
        and ``sum(x^2)`` without copying the units out. Reading the finiteness and conditioning
        flags costs no device sync on the CPU; ill-conditioned groups (``mean^2 >= 99 var``) are
        recomputed with the shifted algorithm, and non-finite values counted only if present.
        """
        acc = self._acc.setdefault(name, _Accumulator())
        full = self.mode == FULL
        xf = as_accumulation_dtype(x)
        n_batch, width = xf.shape[0], xf.shape[1]
        x3 = xf.view(n_batch, width, -1)
        per_unit = n_batch * x3.shape[2]
        s1c = x3.sum(2).sum(0)
        s2c = torch.linalg.vector_norm(x3, dim=2).square().sum(0)
        checks = [torch.isfinite(s2c).all()]
        idx = None
        if self.num_units > 0:
            idx = self._unit_index_for(name, width, xf.device)
            us1, us2 = s1c.index_select(0, idx), s2c.index_select(0, idx)
            um2 = us2 - us1 * us1 / per_unit
            checks.append((um2 >= us2 / 100).all())
        if full:
            n = xf.numel()
            s1, s2 = s1c.sum(), s2c.sum()
            m2 = s2 - s1 * s1 / n
            checks.append(m2 >= s2 / 100)
        flags = torch.stack(checks).tolist()
        finite = bool(flags[0])
        if idx is not None:
            if finite and not flags[1]:
                rows = xf.movedim(1, 0).index_select(0, idx).reshape(len(idx), -1)
                um = Moments.from_tensor(rows, dim=1, scratch=self._scratch)
            else:
                um = Moments(
                    torch.full_like(us1, float(per_unit)), us1 / per_unit, um2.clamp(min=0)
                )
            acc.units = um if acc.units is None else acc.units.merge(um)
        if not full:
            return
        if finite and not flags[-1]:
            wm = Moments.from_tensor(xf, scratch=self._scratch)
        else:
            wm = Moments(s1.new_tensor(float(n)), s1 / n, m2.clamp(min=0))
        acc.whole = wm if acc.whole is None else acc.whole.merge(wm)
        bad = torch.zeros((), dtype=torch.long) if finite else n - torch.isfinite(xf).sum()
        acc.nonfinite = bad if acc.nonfinite is None else acc.nonfinite + bad
        if len(acc.samples) < MAX_CHUNKS:
            keep = min(n, self.subsampler.size)
            acc.samples.append(self.subsampler.flat(xf)[:keep])
            if idx is not None:
                # the same (n, position) pairs as the generic path's rows, read in place
                pos = self.subsampler.positions(per_unit, xf.device)
                at_n, at_s = pos // x3.shape[2], pos % x3.shape[2]
                picked = x3[at_n[:, None], idx[None, :], at_s[:, None]]
                acc.unit_samples.append(picked.t().float())
        if self.histogram_bins is not None and name not in self.histograms:
            self.histograms[name] = Histogram.from_tensor(xf, self.histogram_bins)

    # -- reduction -----------------------------------------------------------------------------
    def _pack(self, name: str, device: torch.device) -> Tensor:
        """One row per layer: [n, mean, m2, nonfinite, units' (n, mean, m2), samples...]."""
        k, size = self.num_units, self.subsampler.size
        acc = self._acc.get(name, _Accumulator())
        head = torch.zeros(4, device=device)
        units = torch.zeros(3, k, device=device)
        if acc.whole is not None:
            head = torch.stack(
                [acc.whole.count, acc.whole.mean, acc.whole.m2, acc.nonfinite.float()]
            )
        if acc.units is not None:
            u = acc.units.stack()
            units[:, : u.shape[1]] = u
        parts = [head, units.reshape(-1)]
        if self.mode == FULL:
            samples = torch.full((1 + k, size), float("nan"), device=device)
            if acc.samples:
                samples[0] = self._shrink(torch.cat(acc.samples))
            if acc.unit_samples:
                us = self._shrink(torch.cat(acc.unit_samples, dim=1))
                samples[1 : 1 + us.shape[0]] = us
            parts.append(samples.reshape(-1))
        return torch.cat(parts)

    def _shrink(self, v: Tensor) -> Tensor:
        """Exactly ``size`` columns: NaN-padded if fewer, else a fixed uniform subset."""
        size = self.subsampler.size
        if v.shape[-1] <= size:
            return self.subsampler._pad(v)
        return v.index_select(-1, self.subsampler.positions(v.shape[-1], v.device))

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, LayerStats]:
        """Merge the armed step over micro-batches and ranks (one all-gather for all layers).

        Must be called on every rank with the same mode. Layers not called on any rank are left
        out.
        """
        if self.mode is None:
            return {}
        device = self._device()
        k, size = self.num_units, self.subsampler.size
        packed = torch.stack([self._pack(name, device) for name, _ in self.layers])
        gathered = gather_stack(packed, group)  # (ranks, layers, row)
        head = gathered[..., :4]
        unit = gathered[..., 4 : 4 + 3 * k].reshape(*gathered.shape[:2], 3, k)
        whole = Moments.merge_all(head[..., 0], head[..., 1], head[..., 2])
        nonfinite = head[..., 3].sum(0)
        um = Moments.merge_all(unit[..., 0, :], unit[..., 1, :], unit[..., 2, :])
        q = uq = None
        if self.mode == FULL:
            samples = gathered[..., 4 + 3 * k :].reshape(*gathered.shape[:2], 1 + k, size)
            # (layers, 1 + k, ranks * size): the union of every rank's subsample.
            samples = samples.permute(1, 2, 0, 3).reshape(len(self.layers), 1 + k, -1)
            pq = percentiles(samples, self.quantiles)
            q, uq = pq[:, 0], pq[:, 1:]
        out: dict[str, LayerStats] = {}
        for i, (name, _) in enumerate(self.layers):
            units = self.units.get(name)
            if units is None and name not in self._acc:
                continue
            units = units or []
            n = len(units)
            out[name] = LayerStats(
                whole=Moments(whole.count[i], whole.mean[i], whole.m2[i]),
                nonfinite=nonfinite[i],
                unit_moments=Moments(um.count[i, :n], um.mean[i, :n], um.m2[i, :n]),
                quantiles=None if q is None else q[i],
                unit_quantiles=None if uq is None else uq[i, :n],
                units=units,
            )
        return out

    def _device(self) -> torch.device:
        for acc in self._acc.values():
            for t in (acc.whole, acc.units):
                if t is not None:
                    return t.count.device
        for _, module in self.layers:
            for p in module.parameters():
                return p.device
            for b in module.buffers():
                return b.device
        return torch.device("cpu")

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"units": {k: list(v) for k, v in self.units.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.units = {k: list(v) for k, v in state.get("units", {}).items()}
        self._unit_index = {}
