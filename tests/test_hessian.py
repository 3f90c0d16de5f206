"""Hessian probes vs ``torch.autograd.functional.hessian`` + ``eigvalsh`` in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_norm.errors import ConfigurationError
from lightning_norm.probes.hessian import HessianOperator, top_hessian_eigenvalue


def tiny_case(bn: bool):
    torch.manual_seed(3)
    layers = [nn.Linear(3, 4)]
    if bn:
        layers.append(nn.BatchNorm1d(4))
    layers += [nn.Tanh(), nn.Linear(4, 2)]
    net = nn.Sequential(*layers).double().train()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    buffers = dict(net.named_buffers())
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]

    def loss_fn(params):
        state = {**params, **{n: b.clone() for n, b in buffers.items()}}
        return nn.functional.cross_entropy(functional_call(net, state, (x,)), y)

    def flat_loss(flat):
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = s.numel()
            params[n] = flat[offset : offset + k].view(s)
            offset += k
        return loss_fn(params)

    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    hess = torch.autograd.functional.hessian(flat_loss, flat)
    params = {n: p.detach() for n, p in net.named_parameters()}
    return net, loss_fn, params, hess


@pytest.mark.parametrize("bn", [False, True])
def test_top_eigenvalue_matches_eigvalsh(bn):
    net, loss_fn, params, hess = tiny_case(bn)
    eig = torch.linalg.eigvalsh(hess)
    top = eig[eig.abs().argmax()].item()
    res = top_hessian_eigenvalue(
        loss_fn, params, max_iter=5000, tol=1e-13, generator=torch.Generator().manual_seed(0)
    )
    assert res.converged
    assert abs(res.value.item() - top) <= 1e-6 * abs(top)
    # BN's running statistics are not touched by the probe.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            assert int(m.num_batches_tracked) == 0


def test_matvec_and_trace_match_brute_force():
    _, loss_fn, params, hess = tiny_case(bn=True)
    op = HessianOperator(loss_fn, params)
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params.values()]
    hv = torch.cat([t.reshape(-1) for t in op.matvec(v)])
    want = hess @ torch.cat([t.reshape(-1) for t in v])
    assert torch.allclose(hv, want, rtol=1e-10, atol=1e-12)
    # Hutchinson: unbiased; with 300 Rademacher vectors the error is a few % of the spread.
    est = op.trace(samples=300, generator=torch.Generator().manual_seed(0)).item()
    exact = torch.trace(hess).item()
    off = hess - torch.diag(torch.diag(hess))
    std = (2 * (off**2).sum() / 300).sqrt().item()
    assert abs(est - exact) <= 4 * std


def test_trace_exact_for_diagonal_hessian():
    c = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64)

    def loss_fn(p):
        return 0.5 * (c * p["w"] ** 2).sum()

    op = HessianOperator(loss_fn, {"w": torch.ones(3, dtype=torch.float64)})
    assert op.trace(samples=3).item() == pytest.approx(c.sum().item(), rel=1e-12)
    res = op.top_eigenvalue(max_iter=500, tol=1e-14)
    assert res.value.item() == pytest.approx(3.5, rel=1e-9)


def test_bad_settings_and_non_differentiable_loss():
    _, loss_fn, params, _ = tiny_case(bn=False)
    with pytest.raises(ConfigurationError, match="max_iter"):
        top_hessian_eigenvalue(loss_fn, params, max_iter=0)
    with pytest.raises(ConfigurationError, match="scalar tensor"):
        HessianOperator(lambda p: torch.tensor(1.0), params)


def test_from_graph_equals_closure_operator():
    _, loss_fn, params, hess = tiny_case(bn=True)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    op = HessianOperator.from_graph(loss_fn(leaves), leaves)
    v = [torch.ones_like(p) for p in params.values()]
    got = torch.cat([t.reshape(-1) for t in op.matvec(v)])
    assert torch.allclose(got, hess @ torch.ones(hess.shape[0], dtype=torch.float64), rtol=1e-10)
