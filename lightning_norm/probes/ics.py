"""Internal covariate shift as gradient drift, S18 Definition 2.1 (plain PyTorch).

For layers 1..k with parameters W_1..W_k and the step's batch (x_t, y_t):

- G_i  = grad_{W_i} L(W_1^t, ..., W_k^t; x_t, y_t)
- G'_i = grad_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t; x_t, y_t)

and the drift of layer i at step t is ``||G_i - G'_i||_2`` (in the loss's units per parameter
unit), reported with ``cos(G_i, G'_i)`` (dimensionless; ideal values 0 and 1) and the relative
drift ``||G_i - G'_i||_2 / ||G_i||_2``.

Both gradients come from :class:`~lightning_norm.probes.replay.StepReplay` (same batch, same
random draws, no trace), with ``W^t`` passed as overrides and ``W^{t+1}`` being the module's
current parameters after the real optimizer step. G is recomputed by replay rather than read from
``.grad`` so that G and G' come from the same computation (no DDP bucketing, gradient scaling or
clipping in one and not the other): their difference is due to the parameter change alone.

"Preceding" is the forward execution order, recorded by forward pre-hooks while G is computed:
a module's position is the first time its forward starts. The parameters a module registers
itself (``recurse=False``) take that module's position; so a container's own parameters (a
``Sequential`` or the root holding an ``nn.Parameter``) count as preceding everything that runs
inside it, and a module called several times (weight sharing) is placed by its first call. A
parameter shared by several modules takes the earliest position; a selected layer's own
parameters always keep ``W^t`` for that layer's G'. Modules that never run keep ``W^t``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_norm.errors import SelectionError
from lightning_norm.probes.replay import StepReplay

__all__ = ["ICSResult", "LayerDrift", "drift_stats", "ics_drift", "record_forward_order"]


@dataclass(frozen=True)
class LayerDrift:
    """The drift of one layer at one step (0-dim float64 tensors on the gradients' device).

    Attributes:
        l2: ``||G - G'||_2``.
        cosine: ``<G, G'> / (||G||_2 ||G'||_2)``; NaN when either gradient is zero.
        relative: ``||G - G'||_2 / ||G||_2``; NaN when G is zero.
        grad_norm: ``||G||_2``.
        replays: forward+backward passes spent on G' (0 when no parameter precedes the layer,
            so G' = G exactly).
    """

    l2: Tensor
    cosine: Tensor
    relative: Tensor
    grad_norm: Tensor
    replays: int


@dataclass(frozen=True)
class ICSResult:
    """Per-layer drift, the replayed loss at W^t, and the forward order used."""

    layers: dict[str, LayerDrift]
    loss: Tensor
    order: list[str]


@contextlib.contextmanager
def record_forward_order(module: nn.Module) -> Iterator[list[str]]:
    """Record the qualified names of submodules in the order their forward first starts.

    Yields a list that fills while the block runs; the hooks are removed on exit.

    Example::

        with record_forward_order(model) as order:
            model(x)
        # order == ["", "0", "1", ...]  (the root first: its forward starts first)
    """
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def make_hook(name: str):
        def hook(mod: nn.Module, args: object) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)

        return hook

    try:
        for name, mod in module.named_modules():
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
        yield order
    finally:
        for h in handles:
            h.remove()


def drift_stats(g: Sequence[Tensor], g_prime: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``(||G - G'||, cos(G, G'), ||G - G'|| / ||G||, ||G||)`` of concatenated tensors, in float64.

    Example::

        l2, cos, rel, norm = drift_stats([gw, gb], [gw2, gb2])
    """
    a = torch.cat([t.reshape(-1).double() for t in g])
    b = torch.cat([t.reshape(-1).double() for t in g_prime])
    na, nb = a.norm(), b.norm()
    l2 = (a - b).norm()
    nan = torch.full_like(na, float("nan"))
    denom = na * nb
    cosine = torch.where(denom > 0, (a @ b) / denom.clamp_min(1e-300), nan)
    relative = torch.where(na > 0, l2 / na.clamp_min(1e-300), nan)
    return l2, cosine, relative, na


def _owners(module: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> names of the modules that register it themselves."""
    canonical = {id(p): n for n, p in module.named_parameters()}
    owners: dict[str, list[str]] = {}
    for mname, mod in module.named_modules():
        for p in mod._parameters.values():
            if p is not None and id(p) in canonical:
                owners.setdefault(canonical[id(p)], []).append(mname)
    return owners


def layer_parameter_names(module: nn.Module, layer: str) -> list[str]:
    """Canonical names of the trainable parameters in the subtree of ``layer``."""
    sub = module.get_submodule(layer)
    canonical = {id(p): n for n, p in module.named_parameters()}
    return [canonical[id(p)] for p in sub.parameters() if p.requires_grad]


def ics_drift(
    replay: StepReplay,
    before: Mapping[str, Tensor],
    layers: Sequence[str],
) -> ICSResult:
    """S18's gradient drift for ``layers`` at one step, from W^t (``before``) and W^{t+1}.

    Costs one forward+backward for G (all layers at once) plus one per layer that has a
    preceding parameter (the backward of G' only reaches that layer's parameters). Extra memory:
    the gradients of the selected layers' parameters, alive during the call.

    Args:
        replay: the step's replay; ``replay.module``'s current parameters are W^{t+1}.
        before: parameter name -> value at W^t, for every parameter the step changed (a name
            left out is taken as unchanged).
        layers: qualified module names; each layer's G concatenates every trainable parameter
            in its subtree (for Conv/Linear: weight, then bias).

    Returns:
        :class:`ICSResult` with a :class:`LayerDrift` per layer, in the order given.

    Raises:
        SelectionError: a layer has no trainable parameter, or did not run in the forward pass.

    Example::

        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        rng = RngState.capture(model)
        loss_fn(model).backward(); opt.step()
        replay = StepReplay(model, loss_fn, rng_state=rng)
        result = ics_drift(replay, before, ["layers.8", "layers.16"])
        result.layers["layers.8"].cosine
    """
    module = replay.module
    params = {layer: layer_parameter_names(module, layer) for layer in layers}
    empty = [layer for layer, names in params.items() if not names]
    if empty:
        raise SelectionError(
            f"ICS layers must own trainable parameters; {empty} have none. Select modules such "
            "as Conv/Linear layers (their G is the gradient of their own parameters)."
        )
    wrt = list(dict.fromkeys(n for names in params.values() for n in names))
    with record_forward_order(module) as order:
        loss, grads = replay.loss_and_grad(before, wrt=wrt)
    position = {name: i for i, name in enumerate(order)}
    missing = [layer for layer in layers if layer not in position]
    if missing:
        raise SelectionError(
            f"ICS layers {missing} did not run in the training step's forward pass, so no "
            "layer precedes or follows them. Select layers the loss depends on."
        )
    first_use = {
        p: min((position[o] for o in owners if o in position), default=None)
        for p, owners in _owners(module).items()
    }
    out: dict[str, LayerDrift] = {}
    for layer in layers:
        own = set(params[layer])
        preceding = {
            p
            for p, pos in first_use.items()
            if pos is not None and pos < position[layer] and p not in own and p in before
        }
        g = [grads[n] for n in params[layer]]
        if preceding:
            mixed = {n: v for n, v in before.items() if n not in preceding}
            _, g_prime_d = replay.loss_and_grad(mixed, wrt=params[layer])
            g_prime = [g_prime_d[n] for n in params[layer]]
        else:
            g_prime = g
        l2, cosine, relative, norm = drift_stats(g, g_prime)
        out[layer] = LayerDrift(l2, cosine, relative, norm, replays=int(bool(preceding)))
    return ICSResult(layers=out, loss=loss, order=list(order))
