"""Synchronized (multi-process) versions of lightning_norm's layers, in plain torch.distributed.

:class:`SyncLpBatchNorm` all-reduces the per-channel partial statistics of
:class:`~lightning_norm.layers.LpBatchNorm` (count, sum x, sum |x|^p; max |x| for p = inf), so
each process normalizes with the statistics of the global batch, exactly as one process would on
the concatenated batch; gradients flow back through the reduction. :class:`SyncNoisyBatchNorm`
shares the per-unit noise parameters ``mu_j``, ``sigma_j`` (broadcast from the group's first
rank) while each rank draws its own per-sample noise; its inner BatchNorm is synchronized by
converting it to ``SyncBatchNorm``. ``lightning_norm.plugins.NormSync`` converts a model's layers
to these classes (and back). Synchronization happens in training mode only, when a process group
of more than one process is initialized, as for ``torch.nn.SyncBatchNorm``; otherwise these
layers behave exactly like the unsynchronized ones.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_norm.layers.lp import LpBatchNorm
from lightning_norm.layers.noisy import NoisyBatchNorm


def _active_group(module) -> tuple[bool, object]:
    group = getattr(module, "process_group", None)
    if not (module.training and dist.is_available() and dist.is_initialized()):
        return False, group
    return dist.get_world_size(group) > 1, group


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward all-reduces the gradient (each rank's input feeds
    every rank's output)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Differentiable sum over the processes of ``group`` (gradients are summed back)."""
    return _AllReduceSum.apply(tensor, group)


def all_reduce_max(
    tensor: Tensor, group=None, extra: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Differentiable elementwise max over processes, and ``extra`` summed in the same call.

    The value is exactly the maximum; the gradient goes to the processes holding it, shared
    equally among ties, as ``torch.amax`` does within one process. ``extra`` (any 1-D tensor,
    may require grad) is all-reduced with SUM in the same collective to save a round trip.
    """
    top = tensor.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    owner = (tensor.detach() == top).to(tensor.dtype)
    parts = [owner, tensor * owner]
    if extra is not None:
        parts.append(extra)
    packed = all_reduce_sum(torch.cat(parts), group)
    n = tensor.numel()
    share = packed[n : 2 * n] / packed[:n]  # (sum of owners' values) / (number of owners)
    # value: exactly `top`; gradient: d top / d tensor = owner / ties (through `share`).
    result = top + (share - share.detach())
    return result, packed[2 * n :]


class SyncLpBatchNorm(LpBatchNorm):
    """:class:`~lightning_norm.layers.LpBatchNorm` whose batch statistics span all processes.

    The local partial statistics are combined across the process group: ``count``, ``sum x``
    and ``sum |x|^p`` (p = 1, 2) in one all-reduce (SUM); for p = inf, ``max |x|`` with a MAX
    all-reduce, then the sums with the max's ownership in one SUM all-reduce. With equal
    statistics on every rank, ``y`` on each rank equals the single-process output on the
    concatenated batch, and so do the input gradients; the running estimates stay identical
    across ranks.

    Args:
        Those of :class:`~lightning_norm.layers.LpBatchNorm`, and
        process_group: the ``torch.distributed`` group to synchronize over (``None``: world).

    Example::

        layer = SyncLpBatchNorm(64, p=1)  # or NormSync().apply(model)
    """

    process_group = None

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _combine(self, count: int, s1: Tensor, sp: Tensor):
        active, group = _active_group(self)
        if not active:
            return super()._combine(count, s1, sp)
        n = torch.full((1,), float(count), dtype=s1.dtype, device=s1.device)
        c = s1.numel()
        if self.p == math.inf:
            sp, rest = all_reduce_max(sp, group, extra=torch.cat([n, s1]))
            return rest[0], rest[1 : 1 + c], sp
        packed = all_reduce_sum(torch.cat([n, s1, sp]), group)
        return packed[0], packed[1 : 1 + c], packed[1 + c :]


class SyncNoisyBatchNorm(NoisyBatchNorm):
    """:class:`~lightning_norm.layers.NoisyBatchNorm` with the per-unit noise shared by all ranks.

    Each training step, ``mu_j`` and ``sigma_j`` (``2 * C`` numbers) are broadcast from the
    group's first rank, so every rank injects noise from the same unit-level distribution, as a
    single process on the global batch would. The per-sample draws ``m_ij``, ``s_ij`` are each
    rank's own: they come from a rank-private generator seeded, at the first synchronized step,
    with one number drawn from the layer's generator (or the global RNG) plus the rank. Ranks
    seeded alike (``seed_everything``) would otherwise draw identical per-sample noise for
    different samples. Convert ``self.bn`` to ``SyncBatchNorm`` to synchronize the batch
    statistics too (``NormSync`` does both).

    Args:
        Those of :class:`~lightning_norm.layers.NoisyBatchNorm`, and
        process_group: the ``torch.distributed`` group to synchronize over (``None``: world).

    Example::

        layer = SyncNoisyBatchNorm(64)  # or NormSync().apply(model)
    """

    process_group = None
    #: Attributes this class adds at run time; ``NormSync.revert`` removes them.
    sync_attributes = ("_rank_generator",)

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _unit_params(self, a: Tensor) -> tuple[Tensor, Tensor]:
        mu, sigma = super()._unit_params(a)
        active, group = _active_group(self)
        if not active:
            return mu, sigma
        both = torch.stack([mu, sigma])
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(both, src=src, group=group)
        return both[0], both[1]

    def _sample_noise(self, a: Tensor, mu: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        active, group = _active_group(self)
        if not active:
            return super()._sample_noise(a, mu, sigma)
        gen = self.__dict__.get("_rank_generator")
        if gen is None or gen.device.type != a.device.type:
            base = torch.randint(0, 2**62, (1,), generator=self.generator, device=a.device)
            gen = torch.Generator(device=a.device)
            gen.manual_seed(int(base) + dist.get_rank(group))
            self.__dict__["_rank_generator"] = gen
        shared, self.generator = self.generator, gen
        try:
            return super()._sample_noise(a, mu, sigma)
        finally:
            self.generator = shared


#: Our layer classes and their synchronized versions (``NormSync`` swaps ``__class__``).
SYNC_CLASSES: dict[type, type] = {
    LpBatchNorm: SyncLpBatchNorm,
    NoisyBatchNorm: SyncNoisyBatchNorm,
}
