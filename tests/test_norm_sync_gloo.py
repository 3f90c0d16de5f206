"""Synchronized layers over 2 gloo processes: each rank's output and gradients equal the
single-process ones on the concatenated batch.

Kept apart from the Lightning tests and free of Lightning imports so the spawned processes start
quickly (they import this module).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_norm.layers import LpBatchNorm, NoisyBatchNorm
from lightning_norm.layers.sync import SyncLpBatchNorm, SyncNoisyBatchNorm


def synced(layer: nn.Module) -> nn.Module:
    """Convert as ``NormSync.apply`` does (tested in test_norm_sync.py) without importing it."""
    layer.__class__ = {LpBatchNorm: SyncLpBatchNorm, NoisyBatchNorm: SyncNoisyBatchNorm}[
        type(layer)
    ]
    return layer


# --- two processes ------------------------------------------------------------------


def _global_batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, grad


def _check_lp_exact(rank: int, world: int) -> None:
    splits = {0: slice(0, 3), 1: slice(3, 8)}  # unequal local batches
    for shape in [(8, 5), (8, 5, 3, 4)]:
        for p in (1, 2, math.inf):
            x, grad = _global_batch(shape, seed=int(p if p != math.inf else 9) + len(shape))
            if p == math.inf:  # a max |x| attained on both ranks: the gradient is shared
                x[1, 0] = 7.0
                x[6, 0] = -7.0
            ref = LpBatchNorm(5, p=p, momentum=0.5).double()
            with torch.no_grad():
                ref.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
                ref.bias.normal_(generator=torch.Generator().manual_seed(2))
            layer = LpBatchNorm(5, p=p, momentum=0.5).double()
            layer.load_state_dict(ref.state_dict())
            synced(layer)
            x_all = x.clone().requires_grad_()
            y_all = ref(x_all)
            y_all.backward(grad)
            x_loc = x[splits[rank]].clone().requires_grad_()
            y_loc = layer(x_loc)
            y_loc.backward(grad[splits[rank]])
            torch.testing.assert_close(y_loc, y_all[splits[rank]], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x_loc.grad, x_all.grad[splits[rank]], rtol=1e-10, atol=1e-12)
            for name in ("weight", "bias"):
                g = getattr(layer, name).grad.clone()
                dist.all_reduce(g)  # DDP sums (then averages) parameter gradients
                torch.testing.assert_close(g, getattr(ref, name).grad, rtol=1e-10, atol=1e-12)
            for name in ("running_mean", "running_scale"):
                torch.testing.assert_close(getattr(layer, name), getattr(ref, name))
            layer.eval()  # eval: running estimates, no communication
            torch.testing.assert_close(
                layer(x_loc.detach()), ref.eval()(x_all.detach())[splits[rank]]
            )


def _check_noisy_unit_params_shared(rank: int, world: int) -> None:
    c, shape = 6, (4, 6, 3, 3)
    layer = NoisyBatchNorm(c, generator=torch.Generator().manual_seed(100 + rank)).double()
    with torch.no_grad():
        layer.bn.weight.zero_()  # BN output 0: the layer returns the shift m exactly
    m = synced(layer)(torch.randn(shape, dtype=torch.float64))
    # Reproduce: rank 0's unit draws (broadcast), then this rank's private per-sample stream.
    g0 = torch.Generator().manual_seed(100)
    mu0 = torch.rand(2, c, generator=g0, dtype=torch.float64)[0] * 1.0 - 0.5
    g = torch.Generator().manual_seed(100 + rank)
    torch.rand(2, c, generator=g, dtype=torch.float64)  # drawn, then replaced by the broadcast
    own = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)) + rank)
    expected = torch.empty(shape, dtype=torch.float64).uniform_(-0.1, 0.1, generator=own)
    torch.testing.assert_close(m, expected + mu0.view(1, c, 1, 1), rtol=0, atol=1e-15)
    # Ranks seeded alike (seed_everything) still draw different per-sample noise.
    same = synced(NoisyBatchNorm(c, generator=torch.Generator().manual_seed(7)).double())
    with torch.no_grad():
        same.bn.weight.zero_()
    m = same(torch.randn(shape, dtype=torch.float64))
    gathered = [torch.empty_like(m) for _ in range(world)]
    dist.all_gather(gathered, m.contiguous())
    assert not torch.equal(gathered[0], gathered[1])
    unit_means = [t.transpose(0, 1).reshape(c, -1).mean(1) for t in gathered]
    torch.testing.assert_close(unit_means[0], unit_means[1], rtol=0, atol=0.1)  # same mu_j


def _worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _check_lp_exact(rank, world)
        _check_noisy_unit_params_shared(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_synchronized_layers_are_exact_over_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 CUDA devices")
@pytest.mark.ddp
def test_noisy_inner_syncbatchnorm_on_cuda(tmp_path):
    mp.spawn(_cuda_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def _cuda_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.cuda.set_device(rank)
        x, _ = _global_batch((8, 5, 4, 4))
        x = x.float().cuda()
        layer = NoisyBatchNorm(5, n_mu=0.0, n_sigma=1.0, r_mu=0.0, r_sigma=0.0).cuda()
        synced(layer)
        layer.bn = nn.SyncBatchNorm.convert_sync_batchnorm(layer.bn)
        y = layer(x[rank * 4 : (rank + 1) * 4])
        ref = nn.functional.batch_norm(x, None, None, training=True)
        torch.testing.assert_close(y, ref[rank * 4 : (rank + 1) * 4], rtol=1e-4, atol=1e-4)
    finally:
        dist.destroy_process_group()
