"""Plain-PyTorch landscape core vs brute-force float64 computations written out in the tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_norm.errors import ConfigurationError
from lightning_norm.probes.directions import (
    filter_normalize_,
    filter_normalized_direction,
    random_direction,
)
from lightning_norm.probes.landscape import (
    EtaGrid,
    autograd_loss_and_grad,
    gradient_landscape,
    loss_slice,
)
from tests.helpers import small_convnet


def mlp_bn():
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))


def make_case(kind: str):
    torch.manual_seed(0)
    if kind == "mlp":
        net = mlp_bn().double()
        x = torch.randn(16, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (16,))
    else:
        net = small_convnet(channels=2, width=4, classes=3, bn=True).double()
        x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
        y = torch.randint(0, 3, (8,))
    net.train()
    return net, x, y


def replay_loss_fn(net, x, y, seed=123):
    """A deterministic loss closure: same dropout mask every call, BN buffers left untouched."""
    buffers = dict(net.named_buffers())

    def loss_fn(params):
        state = {**params, **{n: b.clone() for n, b in buffers.items()}}
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = functional_call(net, state, (x,))
        return nn.functional.cross_entropy(out, y)

    return loss_fn


def brute_loss_and_grad(net, x, y, flat_params, seed=123):
    """Loss and flat gradient of a throw-away copy of ``net`` with its weights set by hand."""
    m = copy.deepcopy(net)
    with torch.no_grad():
        offset = 0
        for p in m.parameters():
            p.copy_(flat_params[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    m.zero_grad()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.reshape(-1) for p in m.parameters()])


def rel_close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol * max(abs(float(b)), 1e-12)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_gradient_landscape_matches_brute_force(kind):
    net, x, y = make_case(kind)
    params = {n: p.detach() for n, p in net.named_parameters()}
    flat_w = torch.cat([p.reshape(-1) for p in params.values()])
    _, flat_g = brute_loss_and_grad(net, x, y, flat_w)
    grad = {}
    offset = 0
    for n, p in params.items():
        grad[n] = flat_g[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    lr = 0.3
    etas = EtaGrid().etas(lr)
    assert etas == pytest.approx([lr * m for m in (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4)])
    res = gradient_landscape(autograd_loss_and_grad(replay_loss_fn(net, x, y)), params, grad, etas)
    summary = res.summary()

    losses, diffs, betas = [], [], []
    for eta in etas:
        loss, g_eta = brute_loss_and_grad(net, x, y, flat_w - eta * flat_g)
        diff = math.sqrt(
            sum((a - b) ** 2 for a, b in zip(flat_g.tolist(), g_eta.tolist(), strict=True))
        )
        step = eta * math.sqrt(sum(v * v for v in flat_g.tolist()))
        losses.append(loss)
        diffs.append(diff)
        betas.append(diff / step)
    for got, want in zip(res.losses.tolist(), losses, strict=True):
        assert rel_close(got, want)
    for got, want in zip(res.grad_diff.tolist(), diffs, strict=True):
        assert rel_close(got, want)
    assert rel_close(summary["loss_min"], min(losses))
    assert rel_close(summary["loss_max"], max(losses))
    assert rel_close(summary["loss_range"], max(losses) - min(losses))
    assert rel_close(summary["grad_pred_max"], max(diffs))
    assert rel_close(summary["grad_pred_mean"], sum(diffs) / len(diffs))
    assert rel_close(summary["beta_eff"], max(betas))
    assert float(summary["nonfinite"]) == 0
    # Parameters and BN buffers are untouched.
    assert torch.equal(torch.cat([p.reshape(-1) for p in net.parameters()]), flat_w)
    bn = next(m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_per_parameter_scale_matches_brute_force():
    net, x, y = make_case("mlp")
    params = {n: p.detach() for n, p in net.named_parameters()}
    flat_w = torch.cat([p.reshape(-1) for p in params.values()])
    _, flat_g = brute_loss_and_grad(net, x, y, flat_w)
    grad, scale_vec, scale = {}, [], {}
    offset = 0
    for i, (n, p) in enumerate(params.items()):
        grad[n] = flat_g[offset : offset + p.numel()].view_as(p)
        scale[n] = 1.0 if i < 2 else 0.25  # e.g. a second param group with lr/4
        scale_vec += [scale[n]] * p.numel()
        offset += p.numel()
    s = torch.tensor(scale_vec, dtype=torch.float64)
    eta = 0.2
    res = gradient_landscape(
        autograd_loss_and_grad(replay_loss_fn(net, x, y)), params, grad, [eta], scale=scale
    )
    loss, g_eta = brute_loss_and_grad(net, x, y, flat_w - eta * s * flat_g)
    diff = math.sqrt(
        sum((a - b) ** 2 for a, b in zip(flat_g.tolist(), g_eta.tolist(), strict=True))
    )
    step = math.sqrt(
        sum((eta * si * gi) ** 2 for si, gi in zip(s.tolist(), flat_g.tolist(), strict=True))
    )
    assert rel_close(res.losses[0], loss)
    assert rel_close(res.beta[0], diff / step)


def test_diverged_points_are_counted_and_skipped():
    net, x, y = make_case("mlp")
    params = {n: p.detach() for n, p in net.named_parameters()}
    grad = {n: torch.ones_like(p) for n, p in params.items()}
    base = replay_loss_fn(net, x, y)

    def loss_fn(p):  # "diverges" for steps longer than 1
        shift = params["0.bias"][0] - p["0.bias"][0]
        loss = base(p)
        return loss * float("inf") if float(shift.detach()) > 1.0 else loss

    etas = [0.5, 1.0, 2.0, 3.0]
    res = gradient_landscape(autograd_loss_and_grad(loss_fn), params, grad, etas)
    summary = res.summary()
    assert res.finite.tolist() == [True, True, False, False]
    assert float(summary["nonfinite"]) == 2
    finite_losses = res.losses[:2].tolist()
    assert float(summary["loss_max"]) == max(finite_losses)
    assert float(summary["grad_pred_max"]) == max(res.grad_diff[:2].tolist())
    # Every point diverged: statistics are NaN, the count is the grid size, nothing raises.
    res = gradient_landscape(autograd_loss_and_grad(loss_fn), params, grad, [5.0, 6.0])
    summary = res.summary()
    assert math.isnan(float(summary["loss_min"])) and math.isnan(float(summary["beta_eff"]))
    assert float(summary["nonfinite"]) == 2


def test_eta_grid_spacing_and_errors():
    assert EtaGrid(0.01, 30, 3, spacing="log").points() == pytest.approx(
        [0.01, math.sqrt(0.01 * 30), 30]
    )
    assert EtaGrid(0.1, 0.4, 4, relative=False).etas(lr=123.0) == pytest.approx(
        [0.1, 0.2, 0.3, 0.4]
    )
    assert EtaGrid(2.0, 2.0, 1).etas(0.5) == [1.0]
    with pytest.raises(ConfigurationError, match="low <= high"):
        EtaGrid(4.0, 0.5)
    with pytest.raises(ConfigurationError, match="positive number"):
        EtaGrid(0.0, 1.0)
    with pytest.raises(ConfigurationError, match="spacing"):
        EtaGrid(spacing="cubic")
    with pytest.raises(ConfigurationError, match="num"):
        EtaGrid(num=0)


def test_filter_normalized_direction_norms():
    net = small_convnet(channels=2, width=4, classes=3, bn=True)
    params = {n: p.detach() for n, p in net.named_parameters()}
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for n, p in params.items():
        if p.ndim <= 1:
            assert torch.count_nonzero(d[n]) == 0, n
            continue
        for i in range(p.shape[0]):
            want = math.sqrt(sum(v * v for v in p[i].reshape(-1).tolist()))
            got = math.sqrt(sum(v * v for v in d[n][i].reshape(-1).tolist()))
            assert rel_close(got, want, 1e-5), (n, i)
    d2 = filter_normalize_(
        random_direction(params, torch.Generator().manual_seed(0)), params, one_d="filter"
    )
    assert torch.allclose(d2["1.weight"].abs(), params["1.weight"].abs())
    # Same seed, same direction; the global RNG stream is not consumed.
    state = torch.get_rng_state()
    again = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    assert all(torch.equal(d[n], again[n]) for n in d)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ConfigurationError, match="one_d"):
        filter_normalized_direction(params, one_d="copy")


def test_loss_slice_matches_brute_force():
    net, x, y = make_case("mlp")
    params = {n: p.detach() for n, p in net.named_parameters()}
    flat_w = torch.cat([p.reshape(-1) for p in params.values()])
    d1 = filter_normalized_direction(params, torch.Generator().manual_seed(1))
    d2 = filter_normalized_direction(params, torch.Generator().manual_seed(2))
    f1 = torch.cat([d1[n].reshape(-1) for n in params])
    f2 = torch.cat([d2[n].reshape(-1) for n in params])
    alphas, betas = [-1.0, 0.0, 0.5], [-0.5, 1.0]
    loss_fn = replay_loss_fn(net, x, y)
    one = loss_slice(loss_fn, params, [d1], [alphas])
    two = loss_slice(loss_fn, params, [d1, d2], [alphas, betas])
    assert one.shape == (3,) and two.shape == (3, 2)
    for i, a in enumerate(alphas):
        assert rel_close(one[i], brute_loss_and_grad(net, x, y, flat_w + a * f1)[0])
        for j, b in enumerate(betas):
            want = brute_loss_and_grad(net, x, y, flat_w + a * f1 + b * f2)[0]
            assert rel_close(two[i, j], want)
    with pytest.raises(ConfigurationError, match="one coordinate list per direction"):
        loss_slice(loss_fn, params, [d1, d2], [alphas])
