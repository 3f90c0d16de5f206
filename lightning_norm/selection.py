"""Which modules a measurement looks at: by type, by qualified-name glob, or by predicate.

Plain PyTorch. Every callback resolves its selection once, at ``setup``, so a bad type or a glob
that matches nothing fails before the first step, with the names that do exist in the message.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_norm.errors import SelectionError
from lightning_norm.layers.base import NormLayer

#: torch's own normalization layers (SyncBatchNorm and LazyBatchNorm are ``_BatchNorm``s).
TORCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
#: Layers that own the weights of the model (the default when a model has no norm layer).
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
)

NamePredicate = Callable[[str, nn.Module], bool]
NameFilter = str | Sequence[str] | NamePredicate


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (torch's or lightning_norm's)."""
    return isinstance(module, (*TORCH_NORM_TYPES, NormLayer))


def _matches(name: str, module: nn.Module, flt: NameFilter) -> bool:
    if callable(flt):
        return bool(flt(name, module))
    patterns = [flt] if isinstance(flt, str) else list(flt)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_filter(arg: str, flt: NameFilter | None) -> None:
    if flt is None or callable(flt):
        return
    patterns = [flt] if isinstance(flt, str) else flt
    if not isinstance(patterns, Iterable) or not all(isinstance(p, str) for p in patterns):
        raise SelectionError(
            f"`{arg}` must be a glob string, a list of glob strings or a predicate "
            f"`(name, module) -> bool`, got {flt!r}."
        )


@dataclass(frozen=True)
class LayerSelection:
    """A rule choosing modules of a model by type and qualified name.

    Args:
        types: module classes to select (a module matches if it is an instance of any). ``None``
            uses ``default``: normalization layers, falling back to Conv/Linear layers when the
            model has none.
        include: glob(s) on the qualified module name (``"features.*"``), or a predicate
            ``(name, module) -> bool``; only matching modules are kept.
        exclude: glob(s) or predicate; matching modules are dropped.
        outermost: drop a selected module nested inside another selected module (a noisy BN's
            inner ``BatchNorm`` is not a second layer).

    Raises:
        SelectionError: ``types`` holds something that is not an ``nn.Module`` subclass, or a
            filter is malformed (at construction); nothing matches (at :meth:`resolve`).

    Example::

        LayerSelection(include="features.*", exclude="*.3").resolve(model)
    """

    types: tuple[type[nn.Module], ...] | None = None
    include: NameFilter | None = None
    exclude: NameFilter | None = None
    outermost: bool = True

    def __post_init__(self) -> None:
        if self.types is not None:
            types = (self.types,) if isinstance(self.types, type) else tuple(self.types)
            bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
            if bad or not types:
                raise SelectionError(
                    f"`types` must be nn.Module subclasses such as nn.BatchNorm2d or nn.Conv2d, "
                    f"got {bad or self.types!r}."
                )
            object.__setattr__(self, "types", types)
        _check_filter("include", self.include)
        _check_filter("exclude", self.exclude)

    def resolve(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The selected ``(qualified_name, module)`` pairs in registration order.

        A module reachable under several names (shared) is listed once, under its first name.
        The root module has the name ``""``.
        """
        named = list(model.named_modules())
        if self.types is not None:
            candidates = [(n, m) for n, m in named if isinstance(m, self.types)]
            what = "of types " + ", ".join(t.__name__ for t in self.types)
        else:
            candidates = [(n, m) for n, m in named if is_norm_layer(m)]
            what = "normalization layers"
            if not candidates:
                candidates = [(n, m) for n, m in named if isinstance(m, WEIGHT_LAYER_TYPES)]
                what = "Conv/Linear layers (the model has no normalization layer)"
        if self.outermost:
            chosen = [n for n, _ in candidates]
            candidates = [
                (n, m)
                for n, m in candidates
                if not any(p != n and (p == "" or n.startswith(p + ".")) for p in chosen)
            ]
        if not candidates:
            raise SelectionError(
                f"The model has no modules {what}. Pass `types=` with classes the model uses "
                f"(it has: {_type_summary(named)})."
            )
        selected = candidates
        if self.include is not None:
            selected = [(n, m) for n, m in selected if _matches(n, m, self.include)]
            if not selected:
                raise SelectionError(
                    f"`include={self.include!r}` matches none of the candidate {what}: "
                    f"{_names(candidates)}. Use one of these qualified names or a glob on them."
                )
        if self.exclude is not None:
            selected = [(n, m) for n, m in selected if not _matches(n, m, self.exclude)]
            if not selected:
                raise SelectionError(
                    f"`exclude={self.exclude!r}` removes every candidate ({_names(candidates)}); "
                    f"loosen the pattern."
                )
        return selected


def _names(pairs: Sequence[tuple[str, nn.Module]], limit: int = 20) -> str:
    names = [n or "<root>" for n, _ in pairs]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _type_summary(named: Sequence[tuple[str, nn.Module]]) -> str:
    types = sorted({type(m).__name__ for _, m in named})
    return ", ".join(types)
