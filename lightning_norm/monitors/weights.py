"""Per-layer norms of gradients, weights, updates and distance from init (plain PyTorch).

A :class:`ParameterNorms` indexes a model's trainable parameters once and maps each to the
selected layers that own it. Every measurement first computes one norm per parameter tensor with
``torch._foreach_norm`` (the fused kernel behind ``clip_grad_norm_``), then combines them per
layer and for the whole model with a single ``index_add``: a handful of kernels per step
whatever the number of layers, and no host synchronisation.

Combining per-tensor p-norms ``n_i`` into a layer's norm uses ``(sum_i n_i^p)^(1/p)`` (``max`` for
``p = inf``), which is exactly the p-norm of all the layer's values concatenated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


def tensor_norms(tensors: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """``(len(tensors),)`` float32: the p-norm of each tensor (its values flattened)."""
    if not tensors:
        return torch.zeros(0)
    # Accumulate in float32, or float64 for float64 tensors ("64-true" precision): the norm's
    # dtype may not narrow its input's.
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    try:
        norms = torch._foreach_norm(list(tensors), p, dtype=dtype)
    except (RuntimeError, TypeError):  # older builds, mixed devices
        norms = [torch.linalg.vector_norm(t, p, dtype=dtype) for t in tensors]
    return torch.stack(norms).to(torch.float32)


class ParameterNorms:
    """Norms of a model's parameters (or their grads) per selected layer and for the whole model.

    Args:
        model: the model whose trainable parameters (``requires_grad``) are measured; ``total``
            covers all of them.
        layers: ``(qualified_name, module)`` pairs; a layer owns ``module.parameters()``.
            Layers without trainable parameters are dropped (see :attr:`layer_names`).

    Raises:
        ValueError: ``norm_type``-like arguments are not positive.

    Example::

        pn = ParameterNorms(net, [("0", net[0]), ("2", net[2])])
        loss.backward()
        per_layer_and_total = pn.combine(pn.grad_norms(), p=2)  # (3,): layer 0, layer 2, total
    """

    def __init__(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params: list[nn.Parameter] = [p for _, p in named]
        position = {id(p): i for i, p in enumerate(self.params)}
        groups: list[int] = []
        members: list[int] = []
        self.layer_names: list[str] = []
        self.layer_members: list[list[int]] = []
        for name, module in layers:
            idx = sorted({position[id(p)] for p in module.parameters() if id(p) in position})
            if not idx:
                continue
            self.layer_names.append(name)
            self.layer_members.append(idx)
            groups += [len(self.layer_names) - 1] * len(idx)
            members += idx
        self._groups = torch.tensor(groups, dtype=torch.long)
        self._members = torch.tensor(members, dtype=torch.long)
        self._on: dict[str, tuple[Tensor, Tensor]] = {}

    def positions(self, params: Iterable[Tensor]) -> list[int]:
        """Indices (into :attr:`params`) of the given tracked parameters, in their order."""
        position = {id(p): i for i, p in enumerate(self.params)}
        return [position[id(p)] for p in params if id(p) in position]

    def layers_touching(self, positions: Iterable[int]) -> list[bool]:
        """Per layer: whether it owns any of the parameters at ``positions``."""
        chosen = set(positions)
        return [any(i in chosen for i in m) for m in self.layer_members]

    def grad_norms(self, p: float = 2.0, positions: Sequence[int] | None = None) -> Tensor:
        """``(num_params,)``: p-norm of each parameter's ``.grad``; 0 where absent or not asked."""
        positions = range(len(self.params)) if positions is None else positions
        have = [i for i in positions if self.params[i].grad is not None]
        device = self.params[0].device if self.params else torch.device("cpu")
        out = torch.zeros(len(self.params), device=device)
        if have:
            norms = tensor_norms([self.params[i].grad.detach() for i in have], p)
            out.index_copy_(0, torch.tensor(have, device=device), norms.to(device))
        return out

    def weight_norms(self) -> Tensor:
        """``(num_params,)``: L2 norm of each parameter."""
        return tensor_norms([q.detach() for q in self.params], 2.0)

    def snapshot(self) -> list[Tensor]:
        """Detached copies of every tracked parameter (on its device)."""
        return [q.detach().clone() for q in self.params]

    def distance_norms(self, reference: Sequence[Tensor]) -> Tensor:
        """``(num_params,)``: L2 norm of ``param - reference`` for each tracked parameter."""
        current = [q.detach() for q in self.params]
        return tensor_norms(torch._foreach_sub(current, list(reference)), 2.0)

    def combine(self, per_tensor: Tensor, p: float = 2.0) -> Tensor:
        """``(num_layers + 1,)``: the layers' p-norms from per-tensor ones, then the total."""
        device = per_tensor.device
        key = str(device)
        if key not in self._on:
            self._on[key] = (self._groups.to(device), self._members.to(device))
        groups, members = self._on[key]
        out = torch.zeros(len(self.layer_names), device=device, dtype=per_tensor.dtype)
        if math.isinf(p):
            out = out.scatter_reduce(0, groups, per_tensor[members], "amax", include_self=True)
            total = per_tensor.max() if per_tensor.numel() else per_tensor.new_zeros(())
            return torch.cat([out, total.reshape(1)])
        powered = per_tensor.pow(p)
        out = out.index_add(0, groups, powered[members]).pow(1.0 / p)
        return torch.cat([out, powered.sum().pow(1.0 / p).reshape(1)])
