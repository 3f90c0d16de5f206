"""The registry of normalization layers by name: ``create_norm``, ``register_norm``.

Plain PyTorch. A target is a registered name, an ``nn.Module`` class, or a factory
``(num_channels, **options) -> nn.Module``; surgery (``swap_norms``) builds every replacement
through :func:`create_norm`, passing the module being replaced as ``source`` so a factory can
take its input rank and BatchNorm settings (eps, momentum, affine, track_running_stats).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError, UnknownNormError
from lightning_norm.layers.batchnorm import BatchNorm, FrozenBatchNorm
from lightning_norm.layers.groupnorm import DEFAULT_GROUPS, GroupNorm
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


def resolve_norm(to: NormTarget) -> NormFactory:
    """The factory that ``to`` stands for, without building anything.

    A name is looked up as :func:`create_norm` does (case, ``-``, ``_`` and spaces ignored); a
    class or callable is returned as it is. Surgery calls it to check ``to`` before it changes
    a model.

    Raises:
        UnknownNormError: ``to`` is a name that is not registered (the message lists them).
        ConfigurationError: ``to`` is neither a string nor callable.

    Example::

        resolve_norm("Noisy-BN")  # the factory registered as "noisy_bn"
    """
    if isinstance(to, str):
        fn = _REGISTRY.get(_key(to))
        if fn is None:
            raise UnknownNormError(
                f"Unknown normalization {to!r}. Registered: {', '.join(available_norms())}. "
                f"Pass one of these, an nn.Module class, a factory, or register_norm() your own."
            )
        return fn
    if callable(to):
        return to
    raise ConfigurationError(
        f"`to` must be a registered name, an nn.Module class or a factory "
        f"`(num_channels, *, source, **options) -> nn.Module`, got {type(to).__name__} {to!r}."
    )


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


def _signature_facts(fn: Callable[..., Any]) -> tuple[tuple[str, ...], bool, bool]:
    """``(options, takes **kwargs, takes source)`` of ``fn``, cached where ``fn`` is hashable.

    ``options``: the keyword names ``fn`` accepts besides ``num_channels``/``source``.
    ``inspect.signature`` costs about as much as building a small layer, and surgery asks once
    per replaced module, so the answer is kept per factory.
    """
    try:
        return _cached_signature_facts(fn)
    except TypeError:  # unhashable callable
        return _signature_facts_uncached(fn)


def _signature_facts_uncached(fn: Callable[..., Any]) -> tuple[tuple[str, ...], bool, bool]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return (), True, False
    takes_source = any(p.name == "source" for p in params)
    if inspect.isclass(fn) and params and params[0].name == "self":
        params = params[1:]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    names = tuple(
        p.name
        for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "source"
    )
    return names, var_kw, takes_source


_cached_signature_facts = functools.lru_cache(maxsize=256)(_signature_facts_uncached)


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
    fn = resolve_norm(to)
    label = repr(to) if isinstance(to, str) else getattr(to, "__name__", repr(to))
    names, var_kw, takes_source = _signature_facts(fn)
    unknown = sorted(set(options) - set(names))
    if unknown and not var_kw:
        raise ConfigurationError(
            f"Option(s) {', '.join(unknown)} do not fit normalization {label}; it accepts: "
            f"{', '.join(names) or 'no options'}."
        )
    kwargs = dict(options)
    if takes_source:
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


def _build_groupnorm(num_channels: int, source: nn.Module | None, **kwargs: Any) -> nn.Module:
    """GroupNorm; warns where the automatic group count leaves one channel per group on a
    ``BatchNorm1d`` source, whose ``(N, C)`` input would then normalize to a constant."""
    layer = GroupNorm(num_channels, **kwargs)
    if (
        kwargs.get("num_groups") is None
        and isinstance(source, nn.BatchNorm1d)
        and layer.num_groups == num_channels
    ):
        warnings.warn(
            f"GroupNorm replacing a BatchNorm1d of {num_channels} channels: the automatic "
            f"num_groups = gcd({num_channels}, {DEFAULT_GROUPS}) = {layer.num_groups} leaves "
            f"one channel per group, so on (N, C) input every group holds a single value and "
            f"the forward pass refuses it. Pass num_groups (e.g. num_groups=1, LayerNorm) or "
            f"exclude this layer.",
            UserWarning,
            stacklevel=2,
        )
    return layer


register_norm("batchnorm", _make(BatchNorm, _BN_OPTS, build=_build_batchnorm))
register_norm("noisy_bn", _make(NoisyBatchNorm, _BN_OPTS))
register_norm("lp", _make(LpBatchNorm, _BN_OPTS))
register_norm("lp1", _make(LpBatchNorm, _BN_OPTS, {"p": 1}))
register_norm("lp2", _make(LpBatchNorm, _BN_OPTS, {"p": 2}))
register_norm("lpinf", _make(LpBatchNorm, _BN_OPTS, {"p": float("inf")}))
register_norm("layernorm", _make(LayerNorm, ("affine",)))
register_norm("layernorm_cf", _make(LayerNormChannelsFirst, ("affine",)))
register_norm("groupnorm", _make(GroupNorm, ("affine",), build=_build_groupnorm))
register_norm("instancenorm", _make(InstanceNorm, ("affine",), build=_build_instancenorm))
register_norm("frozen_bn", _make(FrozenBatchNorm, ("eps", "affine")))


@register_norm("none")
def _identity(num_channels: int, *, source: nn.Module | None = None) -> nn.Module:
    """No normalization (``nn.Identity``)."""
    return nn.Identity()
