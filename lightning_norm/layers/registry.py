"""The registry of normalization layers by name: ``create_norm``, ``register_norm``.

Plain PyTorch. A target is a registered name, an ``nn.Module`` class, or a factory
``(num_channels, **options) -> nn.Module``; surgery (``swap_norms``) builds every replacement
through :func:`create_norm`, passing the module being replaced as ``source`` so a factory can
take its input rank and BatchNorm settings (eps, momentum, affine, track_running_stats).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError, UnknownNormError
from lightning_norm.layers.batchnorm import BatchNorm, FrozenBatchNorm
from lightning_norm.layers.groupnorm import GroupNorm
from lightning_norm.layers.instancenorm import InstanceNorm
from lightning_norm.layers.layernorm import LayerNorm, LayerNormChannelsFirst
from lightning_norm.layers.lp import LpBatchNorm
from lightning_norm.layers.noisy import NoisyBatchNorm

NormFactory = Callable[..., nn.Module]
NormTarget = str | type[nn.Module] | NormFactory

_REGISTRY: dict[str, NormFactory] = {}
_NAMES: dict[str, str] = {}  # normalized key -> the name as registered


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")


def available_norms() -> list[str]:
    """The registered normalization names, sorted (as registered, before case folding).

    Example::

        available_norms()  # ['batchnorm', 'frozen_bn', 'groupnorm', ...]
    """
    return sorted(_NAMES.values())


def register_norm(
    name: str, factory: NormFactory | None = None, *, overwrite: bool = False
) -> NormFactory | Callable[[NormFactory], NormFactory]:
    """Register ``factory`` under ``name``; usable as a decorator.

    Names match case-insensitively, ignoring ``-`` and ``_`` (``"noisy-BN"`` is
    ``"noisy_bn"``). The factory is called as ``factory(num_channels, **options)``; if it takes
    a ``source`` parameter it also receives the module being replaced (or ``None``).

    Args:
        name: the name users pass as ``to``.
        factory: a class or callable; omitted when used as ``@register_norm("name")``.
        overwrite: replace an existing registration of the same name.

    Raises:
        ConfigurationError: the name is empty, already registered (without ``overwrite``), or
            the factory is not callable.

    Example::

        @register_norm("rms")
        def rms_norm(num_channels, eps=1e-6):
            return MyRMSNorm(num_channels, eps=eps)
    """
    if not isinstance(name, str) or not _key(name):
        raise ConfigurationError(f"register_norm: `name` must be a non-empty string, got {name!r}.")

    def decorator(fn: NormFactory) -> NormFactory:
        if not callable(fn):
            raise ConfigurationError(
                f"register_norm({name!r}): the factory must be a class or a callable "
                f"`(num_channels, **options) -> nn.Module`, got {fn!r}."
            )
        key = _key(name)
        if key in _REGISTRY and not overwrite:
            raise ConfigurationError(
                f"register_norm: {name!r} is already registered (as {_NAMES[key]!r}); pick "
                f"another name or pass overwrite=True."
            )
        _REGISTRY[key], _NAMES[key] = fn, name
        return fn

    return decorator if factory is None else decorator(factory)


def _accepted(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    """Keyword names ``fn`` accepts besides ``num_channels``/``source``, and whether it takes
    ``**kwargs``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return [], True
    if inspect.isclass(fn) and params and params[0].name == "self":
        params = params[1:]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    names = [
        p.name
        for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "source"
    ]
    return names, var_kw


def _takes_source(fn: Callable[..., Any]) -> bool:
    try:
        return "source" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def create_norm(
    to: NormTarget, num_channels: int, *, source: nn.Module | None = None, **options: Any
) -> nn.Module:
    """Build a normalization layer for ``num_channels`` channels.

    Args:
        to: a registered name (see :func:`available_norms`; case, ``-`` and ``_`` are ignored),
            an ``nn.Module`` class (called as ``cls(num_channels, **options)``) or a factory
            ``(num_channels, **options) -> nn.Module``.
        num_channels: the channel count ``C`` of the layer's input.
        source: the module being replaced, if any. Built-in factories read its input rank
            (``"batchnorm"``, ``"instancenorm"``) and its ``eps``/``momentum``/``affine``/
            ``track_running_stats`` as defaults; explicit ``options`` win. Values (weights,
            running statistics) are not copied here: that is surgery's job.
        **options: keyword arguments of the target.

    Returns:
        The new module (on CPU, float32, in training mode).

    Raises:
        UnknownNormError: ``to`` is a name that is not registered (the message lists them).
        ConfigurationError: ``options`` the target does not accept (the message lists those it
            does), checked before anything is built; ``to`` of another type; bad option values.

    Example::

        create_norm("lp1", 64)
        create_norm("groupnorm", 64, num_groups=8)
        create_norm("batchnorm", 64, source=noisy_layer)
    """
    if isinstance(to, str):
        fn = _REGISTRY.get(_key(to))
        if fn is None:
            raise UnknownNormError(
                f"Unknown normalization {to!r}. Registered: {', '.join(available_norms())}. "
                f"Pass one of these, an nn.Module class, a factory, or register_norm() your own."
            )
        label = repr(to)
    elif callable(to):
        fn, label = to, getattr(to, "__name__", repr(to))
    else:
        raise ConfigurationError(
            f"`to` must be a registered name, an nn.Module class or a factory, got "
            f"{type(to).__name__} {to!r}."
        )
    names, var_kw = _accepted(fn)
    unknown = sorted(set(options) - set(names))
    if unknown and not var_kw:
        raise ConfigurationError(
            f"Option(s) {', '.join(unknown)} do not fit normalization {label}; it accepts: "
            f"{', '.join(names) or 'no options'}."
        )
    kwargs = dict(options)
    if _takes_source(fn):
        kwargs["source"] = source
    module = fn(num_channels, **kwargs)
    if not isinstance(module, nn.Module):
        raise ConfigurationError(
            f"Normalization {label} returned {type(module).__name__}, not an nn.Module."
        )
    return module


# --- built-in factories ---------------------------------------------------------------------


def _bn_of(source: nn.Module | None) -> _BatchNorm | None:
    """The BatchNorm whose settings a replacement inherits (noisy BN: its inner BN)."""
    if isinstance(source, _BatchNorm):
        return source
    inner = getattr(source, "bn", None)
    return inner if isinstance(inner, _BatchNorm) else None


def _defaults(source: nn.Module | None, given: dict[str, Any], *names: str) -> dict[str, Any]:
    """``given`` completed with the same-named settings of ``source`` (a BN or one of ours)."""
    out = dict(given)
    ref = _bn_of(source)
    ref = source if ref is None else ref
    for name in names:
        if name not in out and ref is not None and hasattr(ref, name):
            value = getattr(ref, name)
            if isinstance(value, (bool, int, float)) or value is None:
                out[name] = value
    return out


def _rank_of(source: nn.Module | None) -> int | None:
    """Input rank implied by the source's class (BatchNorm2d: 4); ``None`` if unknown."""
    for cls, rank in (
        (nn.BatchNorm2d, 4),
        (nn.BatchNorm3d, 5),
        (nn.InstanceNorm2d, 4),
        (nn.InstanceNorm3d, 5),
    ):
        if isinstance(source, cls):
            return rank
    return None


_BN_OPTS = ("eps", "momentum", "affine", "track_running_stats")


def _make(
    sig_cls: type[nn.Module],
    inherit: tuple[str, ...],
    fixed: dict[str, Any] | None = None,
    build: Callable[..., nn.Module] | None = None,
) -> NormFactory:
    """A factory with ``sig_cls``'s keyword options; options not passed come from ``source``.

    ``build(num_channels, source, **kwargs)`` picks the class when it depends on the source.
    """
    fixed = fixed or {}
    params = list(inspect.signature(sig_cls.__init__).parameters.values())[2:]
    params = [p for p in params if p.name not in ("device", "dtype", *fixed)]

    def factory(num_channels: int, *, source: nn.Module | None = None, **options: Any):
        kwargs = {**fixed, **_defaults(source, options, *inherit)}
        if build is not None:
            return build(num_channels, source, **kwargs)
        return sig_cls(num_channels, **kwargs)

    factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("num_channels", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params],
            inspect.Parameter("source", inspect.Parameter.KEYWORD_ONLY, default=None),
        ]
    )
    factory.__name__ = factory.__qualname__ = sig_cls.__name__
    factory.__doc__ = sig_cls.__doc__
    return factory


def _build_batchnorm(num_channels: int, source: nn.Module | None, **kwargs: Any) -> nn.Module:
    """``BatchNorm1d/2d/3d`` matching a torch BN source, else the rank-agnostic BatchNorm."""
    torch_bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    cls = type(source) if type(source) in torch_bn else BatchNorm
    return cls(num_channels, **kwargs)


def _build_instancenorm(num_channels: int, source: nn.Module | None, **kwargs: Any) -> nn.Module:
    """torch's ``InstanceNorm2d/3d`` for a 2-D/3-D source, else the rank-agnostic one.

    The rank-agnostic :class:`InstanceNorm` stands in for ``InstanceNorm1d``, which would
    silently read ``(N, C)`` input as one unbatched sample.
    """
    rank = _rank_of(source)
    cls = {4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}.get(rank, InstanceNorm)  # type: ignore
    return cls(num_channels, **kwargs)


register_norm("batchnorm", _make(BatchNorm, _BN_OPTS, build=_build_batchnorm))
register_norm("noisy_bn", _make(NoisyBatchNorm, _BN_OPTS))
register_norm("lp", _make(LpBatchNorm, _BN_OPTS))
register_norm("lp1", _make(LpBatchNorm, _BN_OPTS, {"p": 1}))
register_norm("lp2", _make(LpBatchNorm, _BN_OPTS, {"p": 2}))
register_norm("lpinf", _make(LpBatchNorm, _BN_OPTS, {"p": float("inf")}))
register_norm("layernorm", _make(LayerNorm, ("affine",)))
register_norm("layernorm_cf", _make(LayerNormChannelsFirst, ("affine",)))
register_norm("groupnorm", _make(GroupNorm, ("affine",)))
register_norm("instancenorm", _make(InstanceNorm, ("affine",), build=_build_instancenorm))
register_norm("frozen_bn", _make(FrozenBatchNorm, ("eps", "affine")))


@register_norm("none")
def _identity(num_channels: int, *, source: nn.Module | None = None) -> nn.Module:
    """No normalization (``nn.Identity``)."""
    return nn.Identity()
