"""Statistics core and measurement cores, checked against plain float64 computations."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_norm.monitors.activations import FULL, UNITS, ActivationRecorder
from lightning_norm.monitors.weights import ParameterNorms, tensor_norms
from lightning_norm.stats import Moments, Subsampler, gather_stack, percentiles


def ref_quantile(values, q):
    """Linear interpolation between order statistics, written out (numpy's default)."""
    v = sorted(float(x) for x in values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ref_moments(values):
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return mean, var


# -- Moments ------------------------------------------------------------------------------------
def test_moments_whole_and_rows_match_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=g) * 3 + 2
    m = Moments.from_tensor(x)
    mean, var = ref_moments(x.double().flatten().tolist())
    assert m.count.item() == 280
    assert m.mean.item() == pytest.approx(mean, rel=1e-5)
    assert m.var.item() == pytest.approx(var, rel=1e-5)
    rows = Moments.from_tensor(x.t(), dim=1)
    for j in range(7):
        mean, var = ref_moments(x[:, j].double().tolist())
        assert rows.mean[j].item() == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert rows.std[j].item() == pytest.approx(math.sqrt(var), rel=1e-5)


def test_moments_merge_equals_concatenation_even_with_a_large_offset():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, generator=g) * 0.1 + 1000.0
    b = torch.randn(300, generator=g) * 0.1 + 1000.2
    merged = Moments.from_tensor(a).merge(Moments.from_tensor(b))
    mean, var = ref_moments(torch.cat([a, b]).double().tolist())
    assert merged.count.item() == 1300
    assert merged.mean.item() == pytest.approx(mean, rel=1e-6)
    # the offset is 1e4 times the spread: raw float32 sums of squares would lose every digit
    assert merged.var.item() == pytest.approx(var, rel=1e-3)
    stacked = torch.stack([Moments.from_tensor(a).stack(), Moments.from_tensor(b).stack()], 1)
    allm = Moments.merge_all(stacked[0], stacked[1], stacked[2])
    assert allm.var.item() == pytest.approx(var, rel=1e-3)


def test_moments_empty_state_is_neutral_and_empty_tensor_raises():
    x = torch.tensor([1.0, 2.0, 4.0])
    m = Moments.empty().merge(Moments.from_tensor(x))
    assert m.mean.item() == pytest.approx(7 / 3)
    assert m.var.item() == pytest.approx(ref_moments([1, 2, 4])[1])
    assert math.isnan(Moments.empty().var.item())
    with pytest.raises(ValueError, match="empty"):
        Moments.from_tensor(torch.zeros(0))
    with pytest.raises(ValueError, match="dim"):
        Moments.from_tensor(torch.zeros(2, 3, 4), dim=2)


def test_moments_of_bf16_are_accumulated_in_float32():
    x = (torch.arange(4096, dtype=torch.float32) / 4096).to(torch.bfloat16)
    m = Moments.from_tensor(x)
    assert m.mean.dtype == torch.float32
    mean, var = ref_moments(x.double().tolist())
    assert m.mean.item() == pytest.approx(mean, rel=1e-6)
    assert m.var.item() == pytest.approx(var, rel=1e-5)


# -- percentiles --------------------------------------------------------------------------------
def test_subsampler_is_exact_for_small_tensors_and_fixed_for_large_ones():
    g = torch.Generator().manual_seed(2)
    small = torch.randn(3, 50, generator=g)
    sub = Subsampler(200, seed=5)
    v = sub.flat(small)
    assert v.shape == (200,)
    assert torch.isnan(v[150:]).all()
    q = percentiles(v)
    for i, p in enumerate((0.15, 0.5, 0.85)):
        assert q[i].item() == pytest.approx(ref_quantile(small.flatten().tolist(), p), rel=1e-6)
    big = torch.randn(10_000, generator=g)
    state = torch.get_rng_state()
    a, b = sub.flat(big), sub.flat(big)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG stream is untouched
    assert torch.equal(a, b) and not torch.isnan(a).any()
    assert len(set(a.tolist())) == 200  # without replacement
    # a uniform subsample of a standard normal: percentiles near the true ones
    q = percentiles(Subsampler(4000).flat(big))
    assert q.tolist() == pytest.approx([-1.0364, 0.0, 1.0364], abs=0.1)


def test_subsampler_rows_and_percentiles_per_row():
    x = torch.arange(30.0).reshape(3, 10)
    s = Subsampler(16).rows(x)
    assert s.shape == (3, 16)
    q = percentiles(s, (0.5, 0.85))
    for r in range(3):
        assert q[r, 0].item() == pytest.approx(ref_quantile(x[r].tolist(), 0.5))
        assert q[r, 1].item() == pytest.approx(ref_quantile(x[r].tolist(), 0.85))
    with pytest.raises(ValueError, match="positive"):
        Subsampler(0)


def test_gather_stack_without_process_group_is_identity():
    t = torch.arange(6.0).reshape(2, 3)
    out = gather_stack(t)
    assert out.shape == (1, 2, 3) and torch.equal(out[0], t)


# -- ParameterNorms -----------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.BatchNorm1d(3))


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, float("inf")])
def test_parameter_norms_per_layer_and_total_match_brute_force(p):
    net = _net()
    net(torch.randn(8, 4)).pow(2).sum().backward()
    layers = [("0", net[0]), ("2", net[2]), ("3", net[3])]
    pn = ParameterNorms(net, layers)
    got = pn.combine(pn.grad_norms(p), p)

    def ref(params):
        vals = torch.cat([q.grad.double().flatten() for q in params])
        return (
            vals.abs().max().item() if math.isinf(p) else vals.abs().pow(p).sum().item() ** (1 / p)
        )

    for i, (_, m) in enumerate(layers):
        assert got[i].item() == pytest.approx(ref(list(m.parameters())), rel=1e-5)
    assert got[-1].item() == pytest.approx(ref(list(net.parameters())), rel=1e-5)


def test_parameter_norms_positions_distance_and_missing_grads():
    net = _net()
    pn = ParameterNorms(net, [("0", net[0]), ("2", net[2])])
    assert pn.layer_names == ["0", "2"]
    before = pn.snapshot()
    with torch.no_grad():
        net[2].weight.add_(0.5)
    dist_ = pn.combine(pn.distance_norms(before), 2.0)
    assert dist_[0].item() == 0.0
    assert dist_[1].item() == pytest.approx(0.5 * math.sqrt(15), rel=1e-6)
    assert dist_[2].item() == pytest.approx(0.5 * math.sqrt(15), rel=1e-6)
    # no grads at all: zeros, not an error
    assert pn.grad_norms().abs().sum().item() == 0.0
    pos = pn.positions(net[2].parameters())
    assert pn.layers_touching(pos) == [False, True]
    w = tensor_norms([q.detach() for q in net[0].parameters()])
    assert w[0].item() == pytest.approx(net[0].weight.double().norm().item(), rel=1e-6)


# -- ActivationRecorder -------------------------------------------------------------------------
def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())


def test_recorder_moments_units_percentiles_over_micro_batches():
    net = _conv()
    captured = []
    net[0].register_forward_hook(lambda m, a, o: captured.append(o.detach().double().clone()))
    rec = ActivationRecorder([("0", net[0])], num_units=3, quantile_samples=5000, seed=3)
    rec.attach()
    rec.arm(FULL)
    for s in range(2):  # two micro-batches of one optimizer step
        net(torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(s)))
    stats = rec.compute()["0"]
    x = torch.cat(captured)
    flat = x.flatten().tolist()
    mean, var = ref_moments(flat)
    assert stats.whole.count.item() == x.numel()
    assert stats.whole.mean.item() == pytest.approx(mean, abs=1e-6)
    assert stats.whole.var.item() == pytest.approx(var, rel=1e-5)
    assert stats.nonfinite.item() == 0
    for i, p in enumerate((0.15, 0.5, 0.85)):  # 2 x 600 values <= 5000 per rank: exact
        assert stats.quantiles[i].item() == pytest.approx(ref_quantile(flat, p), rel=1e-5)
    assert len(stats.units) == 3 and stats.units == sorted(set(stats.units))
    for j, unit in enumerate(stats.units):
        vals = x[:, unit].flatten().tolist()
        mean, var = ref_moments(vals)
        assert stats.unit_moments.mean[j].item() == pytest.approx(mean, abs=1e-6)
        assert stats.unit_moments.var[j].item() == pytest.approx(var, rel=1e-5)
        assert stats.unit_quantiles[j, 1].item() == pytest.approx(ref_quantile(vals, 0.5), rel=1e-5)
    rec.detach()
    assert len(net[0]._forward_hooks) == 1  # only the test's own hook is left


def test_recorder_units_mode_input_capture_nonfinite_and_disarmed():
    net = _conv()
    rec = ActivationRecorder([("1", net[1])], num_units=2, capture="input")
    rec.attach()
    x = torch.randn(2, 3, 4, 4)
    net(x)  # not armed: nothing recorded
    assert rec.compute() == {}
    rec.arm(UNITS)
    net(x)
    s = rec.compute()["1"]
    assert s.quantiles is None and s.whole.count.item() == 0
    conv_out = net[0](x).detach().double()
    for j, unit in enumerate(s.units):
        mean, _ = ref_moments(conv_out[:, unit].flatten().tolist())
        assert s.unit_moments.mean[j].item() == pytest.approx(mean, abs=1e-6)
    rec.arm(FULL)
    with torch.no_grad():
        net[0].bias[0] = float("nan")
        net[0].bias[1] = float("inf")
    net(x)
    s = rec.compute()["1"]
    assert s.nonfinite.item() == 2 * 2 * 4 * 4
    rec.detach()
    assert len(net[1]._forward_hooks) == 0
    with pytest.raises(ValueError, match="capture"):
        ActivationRecorder([], capture="grad")


def test_recorder_bf16_activations_give_float32_statistics():
    lin = nn.Linear(8, 16).to(torch.bfloat16)
    rec = ActivationRecorder([("lin", lin)], num_units=4)
    rec.attach()
    rec.arm(FULL)
    x = torch.randn(32, 8).to(torch.bfloat16)
    out = lin(x).double()
    s = rec.compute()["lin"]
    assert s.whole.mean.dtype == torch.float32
    mean, var = ref_moments(out.flatten().tolist())
    assert s.whole.mean.item() == pytest.approx(mean, abs=1e-5)
    assert s.whole.var.item() == pytest.approx(var, rel=1e-5)


# -- DDP: global-batch moments with 2 gloo processes --------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))
        rec = ActivationRecorder([("0", net[0])], num_units=4, quantile_samples=4096)
        rec.attach()
        rec.arm(FULL)
        # rank r sees its own part of the global batch (different sizes on purpose)
        x = torch.randn(3 + rank, 2, 5, 5, generator=torch.Generator().manual_seed(10 + rank))
        net(x)
        s = rec.compute()["0"]
        torch.save(
            {
                "mean": s.whole.mean,
                "var": s.whole.var,
                "count": s.whole.count,
                "q": s.quantiles,
                "umean": s.unit_moments.mean,
                "uvar": s.unit_moments.var,
                "uq": s.unit_quantiles,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_recorder_ddp_moments_equal_single_process_on_concatenated_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1))
    xs = [
        torch.randn(3 + r, 2, 5, 5, generator=torch.Generator().manual_seed(10 + r))
        for r in range(2)
    ]
    full = net(torch.cat(xs)).detach().double()
    flat = full.flatten().tolist()
    mean, var = ref_moments(flat)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["count"].item() == full.numel()
        assert got["mean"].item() == pytest.approx(mean, abs=1e-6)
        assert got["var"].item() == pytest.approx(var, rel=1e-5)
        # every rank's values fit in quantile_samples, so the gathered percentiles are exact
        assert got["q"][1].item() == pytest.approx(ref_quantile(flat, 0.5), rel=1e-5)
        for u in range(4):
            vals = full[:, u].flatten().tolist()
            um, uv = ref_moments(vals)
            assert got["umean"][u].item() == pytest.approx(um, abs=1e-6)
            assert got["uvar"][u].item() == pytest.approx(uv, rel=1e-5)
            assert got["uq"][u, 0].item() == pytest.approx(ref_quantile(vals, 0.15), rel=1e-5)


def test_checked_moments_fast_path_matches_and_flags_nonfinite():
    g = torch.Generator().manual_seed(4)
    for offset in (0.0, 50.0, 1e4):  # well conditioned, then ill conditioned (shifted fallback)
        x = torch.randn(64, 33, generator=g) * 0.5 + offset
        m, finite = Moments.from_tensor_checked(x)
        mean, var = ref_moments(x.double().flatten().tolist())
        assert finite
        assert m.mean.item() == pytest.approx(mean, rel=1e-6, abs=1e-6)
        assert m.var.item() == pytest.approx(var, rel=1e-4)
        rows, finite = Moments.from_tensor_checked(x, dim=1)
        for j in (0, 17):
            mean, var = ref_moments(x[j].double().tolist())
            assert rows.var[j].item() == pytest.approx(var, rel=1e-4)
    x[0, 0] = float("inf")
    assert Moments.from_tensor_checked(x)[1] is False


def test_subsampler_cache_is_bounded_for_varying_shapes():
    from lightning_norm.stats.quantiles import MAX_CACHED_SHAPES

    sub = Subsampler(8)
    for n in range(1, 3 * MAX_CACHED_SHAPES):
        v = sub.flat(torch.arange(float(n)))
        assert v.shape == (8,) and not torch.isnan(v[: min(n, 8)]).any()
    assert len(sub._cache) <= MAX_CACHED_SHAPES


@pytest.mark.parametrize("case", ["offset", "channels_last", "channel_last_dim", "no_units"])
def test_recorder_paths_agree_with_brute_force(case):
    """The CPU channels-first fast path (incl. its ill-conditioned fallback) and the generic one."""
    torch.manual_seed(0)
    if case == "channel_last_dim":
        module, x, cdim = nn.LayerNorm(6), torch.randn(4, 5, 6) * 2 + 3, -1
    else:
        module, x, cdim = nn.Conv2d(3, 6, 3, padding=1), torch.randn(4, 3, 5, 5), 1
        if case == "offset":
            with torch.no_grad():
                module.bias.fill_(1e3)  # mean^2 >> var: the raw sums would lose every digit
        if case == "channels_last":
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
    num_units = 0 if case == "no_units" else 3
    rec = ActivationRecorder(
        [("m", module)], num_units=num_units, channel_dim=cdim, quantile_samples=5000
    )
    rec.attach()
    rec.arm(FULL)
    out = module(x).detach().double()
    s = rec.compute()["m"]
    flat = out.flatten().tolist()
    mean, var = ref_moments(flat)
    assert s.whole.mean.item() == pytest.approx(mean, rel=1e-6, abs=1e-6)
    assert s.whole.var.item() == pytest.approx(var, rel=1e-4)
    assert s.quantiles[1].item() == pytest.approx(ref_quantile(flat, 0.5), rel=1e-5)
    assert len(s.units) == num_units
    for j, unit in enumerate(s.units):
        vals = out.select(cdim, unit).flatten().tolist()
        mean, var = ref_moments(vals)
        assert s.unit_moments.mean[j].item() == pytest.approx(mean, rel=1e-6, abs=1e-6)
        assert s.unit_moments.var[j].item() == pytest.approx(var, rel=1e-4)
        assert s.unit_quantiles[j, 0].item() == pytest.approx(ref_quantile(vals, 0.15), rel=1e-5)
