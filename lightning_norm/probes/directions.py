"""Filter-normalized random directions in parameter space (Li et al. 2018), in plain PyTorch.

A random Gaussian direction ``d`` is rescaled filter by filter so that every filter of ``d`` has
the norm of the matching filter of the weights ``w``:

    d_i <- d_i / ||d_i||_2 * ||w_i||_2

where a *filter* ``i`` is one slice along dimension 0 of a weight with two or more dimensions
(one output channel of a convolution, one output unit, i.e. row, of a linear layer). Units:
``d`` has the units of ``w``, so a step of length ``alpha`` moves every filter by ``alpha`` times
its own size; this makes slices of networks with different weight scales (BN makes a network
invariant to the scale of the weights before it) comparable (Li et al. 2018, Sec. 4).

One-dimensional parameters (biases, the affine ``weight``/``bias`` of norm layers) get a zero
direction by default, as Li et al. recommend; ``one_d="filter"`` treats each entry as its own
filter (``|d_j| = |w_j|``) instead.

The random numbers come from a caller-supplied :class:`torch.Generator`, never from the global
RNG streams, so drawing a direction does not change what the model learns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from lightning_norm.errors import ConfigurationError

OneD = Literal["zero", "filter"]


def random_direction(
    params: Mapping[str, Tensor], generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """A standard Gaussian tensor shaped like every parameter, drawn from ``generator``.

    Args:
        params: parameter name -> tensor (only shapes, dtypes and devices are read).
        generator: the random stream; it must live on the parameters' device. ``None`` makes a
            fresh generator seeded with 0 per device (reproducible, never the global stream).

    Returns:
        name -> tensor with the parameter's shape, dtype and device.

    Example::

        d = random_direction(dict(model.named_parameters()), torch.Generator().manual_seed(1))
    """
    out: dict[str, Tensor] = {}
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in params.items():
        gen = generator
        if gen is None:
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(0))
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        out[name] = torch.randn(p.shape, generator=gen, device=p.device, dtype=dtype)
    return out


def filter_normalize_(
    direction: Mapping[str, Tensor], params: Mapping[str, Tensor], one_d: OneD = "zero"
) -> dict[str, Tensor]:
    """Rescale ``direction`` in place, filter by filter, to the norms of ``params``' filters.

    ``d_i <- d_i * ||w_i|| / ||d_i||`` for every slice ``i`` along dimension 0 of every weight
    with ``ndim >= 2``; 1-D parameters are zeroed (``one_d="zero"``) or scaled entry-wise to
    ``|w_j|`` (``one_d="filter"``). A zero filter of ``d`` stays zero.

    Args:
        direction: name -> direction tensor (modified in place).
        params: name -> parameter tensor with the same names and shapes.
        one_d: how to treat 1-D (and 0-D) parameters: ``"zero"`` or ``"filter"``.

    Returns:
        ``direction`` (as a dict), for chaining.

    Raises:
        ConfigurationError: ``one_d`` is not ``"zero"`` or ``"filter"``, or the names or shapes
            of ``direction`` and ``params`` differ.

    Example::

        w = {n: p.detach() for n, p in model.named_parameters()}
        d = filter_normalize_(random_direction(w, gen), w)
    """
    if one_d not in ("zero", "filter"):
        raise ConfigurationError(f"`one_d` must be 'zero' or 'filter', got {one_d!r}.")
    if set(direction) != set(params):
        raise ConfigurationError(
            "The direction and the parameters must have the same names; differing: "
            f"{sorted(set(direction) ^ set(params))}."
        )
    with torch.no_grad():
        for name, d in direction.items():
            w = params[name].detach()
            if d.shape != w.shape:
                raise ConfigurationError(
                    f"Direction `{name}` has shape {tuple(d.shape)}, the parameter "
                    f"{tuple(w.shape)}; draw the direction with `random_direction(params)`."
                )
            if w.ndim <= 1 and one_d == "zero":
                d.zero_()
                continue
            rows = d.shape[0] if d.ndim >= 1 else 1
            w = w.to(d.dtype)
            d_norm = torch.linalg.vector_norm(d.reshape(rows, -1), dim=1)
            w_norm = torch.linalg.vector_norm(w.reshape(rows, -1), dim=1)
            # A zero filter of d has no direction to scale; leave it at zero instead of NaN.
            tiny = torch.finfo(d.dtype).tiny
            scale = torch.where(d_norm > 0, w_norm / d_norm.clamp_min(tiny), 0.0)
            d.mul_(scale.reshape((rows,) + (1,) * (d.ndim - 1)) if d.ndim >= 1 else scale[0])
    return dict(direction)


def filter_normalized_direction(
    params: Mapping[str, Tensor],
    generator: torch.Generator | None = None,
    one_d: OneD = "zero",
) -> dict[str, Tensor]:
    """A filter-normalized random direction (Li et al. 2018) for ``params``.

    Equivalent to ``filter_normalize_(random_direction(params, generator), params, one_d)``:
    every filter ``i`` (slice along dim 0 of a weight with ``ndim >= 2``) of the Gaussian
    direction is rescaled to ``||w_i||_2``; 1-D parameters get zero (default) or ``|w_j|``.
    Memory: one parameter-sized tensor (the direction).

    Args:
        params: name -> parameter tensor.
        generator: the random stream (on the parameters' device); ``None`` seeds one with 0.
        one_d: ``"zero"`` (Li et al.'s default: biases and norm affines do not move) or
            ``"filter"``.

    Returns:
        name -> direction tensor, shaped like each parameter.

    Raises:
        ConfigurationError: ``one_d`` is not ``"zero"`` or ``"filter"``.

    Example::

        w = {n: p.detach() for n, p in model.named_parameters()}
        d = filter_normalized_direction(w, torch.Generator().manual_seed(0))
    """
    if one_d not in ("zero", "filter"):
        raise ConfigurationError(f"`one_d` must be 'zero' or 'filter', got {one_d!r}.")
    return filter_normalize_(random_direction(params, generator), params, one_d)
