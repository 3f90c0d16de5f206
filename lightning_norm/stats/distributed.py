"""Collectives for statistics: gather one packed tensor from every rank, or return it as is.

Plain ``torch.distributed``. Every reduction in lightning_norm packs all of a step's numbers into
one tensor and gathers it once, so a logged step costs one collective whatever the number of
layers. Works with gloo (CPU) and NCCL (GPU); without an initialised process group (or with one
process) it is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def gather_stack(t: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``(world_size, *t.shape)``: ``t`` from every rank, stacked in rank order.

    Every rank must call it with a tensor of the same shape, dtype and device kind.
    """
    n = world_size(group)
    if n == 1:
        return t.unsqueeze(0)
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)
