"""Model surgery: replace every BatchNorm of a model by another normalization, and undo it.

Plain PyTorch. :func:`swap_norms` walks the module tree once, collects every BatchNorm slot
(``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, a materialized ``LazyBatchNorm*``), builds all the
replacements, and only then installs them, so a bad option or an unknown target leaves the model
untouched. The returned :class:`SwapReport` says what was replaced, what was skipped and why, and
can put the original modules back.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_norm.errors import (
    ConfigurationError,
    SelectionError,
    SurgeryError,
)
from lightning_norm.layers.base import NormLayer
from lightning_norm.selection import NameFilter, _check_filter, _matches

__all__ = ["SkippedModule", "SwapOptionsError", "SwapRecord", "SwapReport", "swap_norms"]

#: What ``to`` may be: a registered name, a module class, or a factory
#: ``(num_channels, *, source, **options) -> nn.Module`` (see ``lightning_norm.layers``).
NormTarget = str | type[nn.Module] | Callable[..., nn.Module]

#: State a BatchNorm holds that a replacement without ``load_from_batchnorm`` may share.
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: Scalar settings carried over when the replacement has an attribute of the same name.
_BN_SETTINGS = ("eps", "momentum")


class SwapOptionsError(SurgeryError, ConfigurationError):
    """The options given to :func:`swap_norms` do not fit the target normalization."""


@dataclass(frozen=True)
class SwapRecord:
    """One replaced module.

    Attributes:
        names: every qualified name the module was reachable under (several for a module shared
            by two parents; ``""`` is the root).
        old_type: class name of the replaced module (``"BatchNorm2d"``).
        new_type: class name of the replacement.
        channels: ``num_features`` of the replaced module.
        transferred: names of the state and settings copied into the replacement (``weight``,
            ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``, ``eps``,
            ``momentum``). Train/eval mode, ``requires_grad``, device and dtype are always
            carried over and not listed.
    """

    names: tuple[str, ...]
    old_type: str
    new_type: str
    channels: int
    transferred: tuple[str, ...]

    @property
    def name(self) -> str:
        """The first qualified name of the module (``""`` for the root)."""
        return self.names[0]


@dataclass(frozen=True)
class SkippedModule:
    """A BatchNorm that was left in place, and why."""

    name: str
    reason: str


@dataclass
class _Slot:
    """Where a module is installed: ``parent._modules[attr]``, or the root when parent is None."""

    parent: nn.Module | None
    attr: str


@dataclass
class SwapReport:
    """What :func:`swap_norms` replaced and skipped; :meth:`undo` puts the originals back.

    ``len(report)`` is the number of replaced modules (a shared module counts once);
    ``str(report)`` is a table; iterating yields the :class:`SwapRecord` s.

    Attributes:
        model: the model after the swap. It is the model passed to :func:`swap_norms` unless that
            model was itself a BatchNorm: then it is the replacement, and the caller must use
            ``report.model`` from then on.
        target: a readable description of ``to``.
        records: one :class:`SwapRecord` per replaced module, in registration order.
        skipped: BatchNorm modules left in place, with the reason.
        dry_run: nothing was changed; the records say what a real run would do.

    Example::

        report = swap_norms(model, "lp1")
        print(report)
        report.undo()  # the original BatchNorm modules, with their values at swap time
    """

    model: nn.Module
    target: str
    records: list[SwapRecord] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    dry_run: bool = False
    # (slots, old module, new module) per record, for undo
    _installed: list[tuple[list[_Slot], nn.Module, nn.Module]] = field(
        default_factory=list, repr=False
    )
    _undone: bool = field(default=False, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SwapRecord]:
        return iter(self.records)

    @property
    def replaced_names(self) -> list[str]:
        """Every qualified name whose module was (or, in a dry run, would be) replaced."""
        return [n for r in self.records for n in r.names]

    def undo(self) -> nn.Module:
        """Put the original modules back and return the (original) root model.

        The originals are the very module objects that were replaced, with the state they had at
        swap time: training done since on the replacements is dropped for those layers (other
        layers keep it). An optimizer built after the swap still holds the replacements'
        parameters; build a new one. A dry run has nothing to undo and returns ``model``.

        Raises:
            SurgeryError: the report was already undone, or a replaced slot no longer holds the
                replacement (the model was changed since); nothing is changed then.
        """
        if self.dry_run:
            return self.model
        if self._undone:
            raise SurgeryError("This swap was already undone; undo() can run once per report.")
        for slots, _old, new in self._installed:
            for slot in slots:
                current = self.model if slot.parent is None else slot.parent._modules.get(slot.attr)
                if current is not new:
                    where = slot.attr if slot.parent is not None else "<root>"
                    raise SurgeryError(
                        f"Cannot undo: the module at {where!r} is no longer the replacement "
                        f"installed by swap_norms (the model was changed since). Undo later swaps "
                        f"first, in reverse order."
                    )
        for slots, old, _new in reversed(self._installed):
            for slot in slots:
                if slot.parent is None:
                    self.model = old
                else:
                    slot.parent._modules[slot.attr] = old
        self._undone = True
        return self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain data (strings, ints, lists) for checkpoints and logger hyperparameters."""
        return {
            "target": self.target,
            "dry_run": self.dry_run,
            "records": [
                {
                    "names": list(r.names),
                    "old_type": r.old_type,
                    "new_type": r.new_type,
                    "channels": r.channels,
                    "transferred": list(r.transferred),
                }
                for r in self.records
            ],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
        }

    def __str__(self) -> str:
        head = f"SwapReport: {len(self)} module(s) -> {self.target}"
        if self.dry_run:
            head += " (dry run, nothing changed)"
        if self._undone:
            head += " (undone)"
        rows = [("name", "old", "new", "channels", "transferred")]
        rows += [
            (
                ", ".join(n or "<root>" for n in r.names),
                r.old_type,
                r.new_type,
                str(r.channels),
                ", ".join(r.transferred) or "-",
            )
            for r in self.records
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [head]
        if self.records:
            for row in rows:
                cells = [c.ljust(w) for c, w in zip(row[:4], widths, strict=True)] + [row[4]]
                lines.append("  " + "  ".join(cells))
        if self.skipped:
            lines.append(f"Skipped ({len(self.skipped)}):")
            lines += [f"  {s.name or '<root>'}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def describe_target(to: Any) -> str:
    """A stable, readable name for ``to`` (no memory addresses), for reports and state keys."""
    if isinstance(to, str):
        return to
    if isinstance(to, functools.partial):
        args = [describe_target(to.func), *map(repr, to.args)]
        args += [f"{k}={v!r}" for k, v in to.keywords.items()]
        return f"partial({', '.join(args)})"
    module = getattr(to, "__module__", None)
    qualname = getattr(to, "__qualname__", None) or type(to).__qualname__
    return f"{module}.{qualname}" if module else str(qualname)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether :func:`swap_norms` replaces ``module``: a torch BatchNorm, not one of ours.

    torch's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``LazyBatchNorm*`` and user subclasses of
    them count; lightning_norm's own layers (:class:`~lightning_norm.layers.base.NormLayer`) do
    not, even where they subclass ``_BatchNorm``, so a second swap does not replace the first
    swap's layers.
    """
    return isinstance(module, _BatchNorm) and not isinstance(module, NormLayer)


def _registry() -> Any:
    # Deferred so that importing lightning_norm.surgery does not import every layer.
    from lightning_norm.layers import registry

    return registry


def _create_norm(to: NormTarget, num_channels: int, *, source: nn.Module, **options: Any):
    return _registry().create_norm(to, num_channels, source=source, **options)


def check_target(to: Any) -> None:
    """Raise early when ``to`` cannot name a normalization.

    A string must be a registered name (:func:`lightning_norm.layers.available_norms`, matched
    as the registry matches: case, ``-`` and ``_`` ignored); anything else must be a class or a
    callable factory. The registry's :func:`~lightning_norm.layers.registry.resolve_norm` decides.

    Raises:
        UnknownNormError: an unregistered name (the message lists the registered ones).
        ConfigurationError: ``to`` is neither a string nor callable.
    """
    _registry().resolve_norm(to)


def _check_not_compiled(model: nn.Module, bn_names: Sequence[str]) -> None:
    """Refuse models whose forward no longer reads the Python module tree."""
    kinds: list[tuple[type, str]] = [(torch.fx.GraphModule, "FX GraphModule")]
    # torch._dynamo is expensive to import; if it is not imported, nothing was compiled.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and hasattr(eval_frame, "OptimizedModule"):
        kinds.append((eval_frame.OptimizedModule, "torch.compile'd"))

    def kind_of(m: nn.Module) -> str | None:
        if isinstance(m, torch.jit.ScriptModule):
            traced = isinstance(m, torch.jit.TracedModule)
            return "traced (torch.jit.trace)" if traced else "TorchScript (torch.jit.script)"
        for cls, label in kinds:
            if isinstance(m, cls):
                return label
        return None

    root_kind = kind_of(model)
    if root_kind is not None:
        raise SurgeryError(
            f"Cannot swap normalization layers of a {root_kind} model ({type(model).__name__}): "
            f"its forward is compiled and would not see the new modules. Swap the eager model "
            f"first (swap_norms(model, ...)), then compile, script, trace or FX-transform it."
        )
    for name, m in model.named_modules():
        k = kind_of(m)
        if k is None or not name:
            continue
        if any(b.startswith(name + ".") for b in bn_names) or _script_has_bn(m):
            raise SurgeryError(
                f"Cannot swap normalization layers inside {name!r}, a {k} submodule: its forward "
                f"is compiled and would not see the new modules. Swap the eager submodule first, "
                f"then compile, script, trace or FX-transform it."
            )


def _script_has_bn(module: nn.Module) -> bool:
    if not isinstance(module, torch.jit.ScriptModule):
        return False
    return any("BatchNorm" in getattr(m, "original_name", "") for m in module.modules())


def _device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    device = dtype = None
    for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        device = device or t.device
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
    return device, dtype


def _transfer(old: nn.Module, new: nn.Module, options: dict[str, Any]) -> list[str]:
    """Copy ``old``'s values into ``new``; return what was copied."""
    load = getattr(new, "load_from_batchnorm", None)
    if callable(load):
        names = list(load(old))
    else:
        # Deferred like _registry(): the layers are imported by the time anything is built.
        from lightning_norm.layers._common import copy_matching

        names = copy_matching(new, old, _BN_STATE)
    has_stats = isinstance(getattr(new, "running_mean", None), Tensor)
    for s in _BN_SETTINGS:
        if s in options or s in names or not hasattr(new, s) or not hasattr(old, s):
            continue
        if s == "momentum" and not has_stats:
            continue
        value = getattr(old, s)
        if isinstance(getattr(new, s), (float, type(None))) and isinstance(
            value, (float, type(None))
        ):
            setattr(new, s, value)
            names.append(s)
    # requires_grad by parameter name (a wrapper's "bn.weight" matches "weight"); parameters
    # without a counterpart follow the source: frozen if all of its parameters are frozen.
    old_params = dict(old.named_parameters(recurse=False))
    all_frozen = bool(old_params) and not any(p.requires_grad for p in old_params.values())
    for pname, p in new.named_parameters():
        src = old_params.get(pname.rsplit(".", 1)[-1])
        p.requires_grad_(src.requires_grad if src is not None else not all_frozen)
    return names


def _build(name: str, old: nn.Module, to: NormTarget, options: dict[str, Any]) -> nn.Module:
    if isinstance(old, LazyModuleMixin) and old.has_uninitialized_params():
        raise SurgeryError(
            f"{name or '<root>'} is an uninitialized {type(old).__name__}: its channel count is "
            f"not known yet. Run one forward pass (or use nn.BatchNorm*d with num_features) "
            f"before swap_norms."
        )
    channels = int(old.num_features)
    try:
        new = _create_norm(to, channels, source=old, **options)
    except (SurgeryError, LookupError):
        raise
    except (ValueError, TypeError) as err:  # ConfigurationError is a ValueError
        raise SwapOptionsError(
            f"Cannot build {describe_target(to)!r} for {name or '<root>'!r} "
            f"({type(old).__name__}, {channels} channels) with options {options!r}: {err}"
        ) from err
    if not isinstance(new, nn.Module):
        raise SwapOptionsError(
            f"Target {describe_target(to)!r} returned {type(new).__name__}, not an nn.Module."
        )
    device, dtype = _device_dtype(old)
    if device is not None or dtype is not None:
        new.to(device=device, dtype=dtype)
    new.train(old.training)
    return new


def swap_norms(
    model: nn.Module,
    to: NormTarget,
    *,
    include: NameFilter | None = None,
    exclude: NameFilter | None = None,
    dry_run: bool = False,
    **options: Any,
) -> SwapReport:
    """Replace every BatchNorm of ``model`` (in place) by the normalization ``to``.

    BatchNorm here means torch's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and materialized
    ``LazyBatchNorm*`` (and user subclasses), anywhere in the tree, the root included. A module
    shared by several parents gets one replacement, shared the same way. Each replacement is
    built by ``lightning_norm.layers.create_norm(to, num_features, source=bn, **options)`` and
    takes over from the BatchNorm: affine ``weight``/``bias`` (same values), ``eps`` and
    ``momentum``, running statistics where the target keeps them (``load_from_batchnorm`` when
    the target has it, else same-named, same-shaped tensors), train/eval mode,
    ``requires_grad``, device and dtype. Forward hooks registered on the old module are not
    carried over. No values change: a BatchNorm in eval mode and an ``"batchnorm"`` replacement
    compute the same output.

    Every replacement is built before any is installed, so an error leaves the model untouched.
    BatchNorm modules inside one of lightning_norm's layers (a noisy BN's inner BatchNorm) are
    skipped, as are those filtered out by ``include``/``exclude``; the report lists them.

    Args:
        model: the eager model to change in place.
        to: a registered name (``"noisy_bn"``, ``"lp1"``, ``"lp2"``, ``"lpinf"``,
            ``"layernorm"``, ``"groupnorm"``, ``"instancenorm"``, ``"frozen_bn"``,
            ``"batchnorm"``, ``"none"``, ...; see ``available_norms()``), an ``nn.Module`` class
            or a factory ``(num_channels, *, source, **options) -> nn.Module``.
        include: glob(s) on qualified module names, or a predicate ``(name, module) -> bool``;
            only matching BatchNorms are replaced. A shared module matches if any of its names
            does.
        exclude: glob(s) or predicate; matching BatchNorms are kept. A shared module is kept if
            any of its names matches.
        dry_run: build and check the replacements but change nothing; the report says what a
            real run would do.
        **options: passed to the target's constructor (e.g. ``num_groups=8`` for
            ``"groupnorm"``, ``generator=...`` for ``"noisy_bn"``).

    Returns:
        A :class:`SwapReport`. Use ``report.model`` afterwards when ``model`` itself may be a
        BatchNorm (it is then the replacement); otherwise it is ``model``.

    Raises:
        UnknownNormError: ``to`` is not a registered name (the message lists them).
        SwapOptionsError: ``options`` do not fit the target (a ``SurgeryError`` and a
            ``ConfigurationError``).
        SurgeryError: ``model`` is (or holds around a BatchNorm) a TorchScript, traced, FX or
            ``torch.compile``'d module (swap before compiling), or holds an uninitialized lazy
            BatchNorm.
        SelectionError: ``include``/``exclude`` is malformed, or ``include`` matches none of the
            BatchNorm modules.

    Example::

        from lightning_norm import swap_norms
        report = swap_norms(model, "groupnorm", exclude="head.*", num_groups=8)
        print(report)          # a table: name, old type, new type, channels, transferred
        report.undo()          # back to the original BatchNorm modules
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"`model` must be an nn.Module, got {type(model).__name__}.")
    _check_filter("include", include)
    _check_filter("exclude", exclude)
    check_target(to)

    # Collect first (every slot holding a BatchNorm, by module identity), mutate later.
    slots: dict[int, list[_Slot]] = {}
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    inside_ours: dict[int, str] = {}
    if is_batchnorm(model):
        slots[id(model)] = [_Slot(None, "")]
        names[id(model)] = [""]
        modules[id(model)] = model
    seen_slots: set[tuple[int, str]] = set()
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None or not is_batchnorm(child):
                continue
            qualified = f"{pname}.{attr}" if pname else attr
            key = id(child)
            modules[key] = child
            if qualified not in names.setdefault(key, []):
                names[key].append(qualified)
            if (id(parent), attr) not in seen_slots:
                seen_slots.add((id(parent), attr))
                slots.setdefault(key, []).append(_Slot(parent, attr))
            if isinstance(parent, NormLayer):
                inside_ours[key] = pname

    _check_not_compiled(model, [n for ns in names.values() for n in ns])
    report = SwapReport(model=model, target=describe_target(to), dry_run=dry_run)
    if not modules:
        warnings.warn(
            f"swap_norms found no BatchNorm module in {type(model).__name__}; nothing was "
            f"replaced. (A model that builds its layers lazily must be swapped after they exist.)",
            UserWarning,
            stacklevel=2,
        )
        return report

    chosen: list[int] = []
    for key, module in modules.items():
        first = names[key][0]
        if key in inside_ours:
            owner = type(dict(model.named_modules())[inside_ours[key]]).__name__
            report.skipped.append(
                SkippedModule(first, f"part of lightning_norm layer {inside_ours[key]!r} ({owner})")
            )
        elif include is not None and not any(_matches(n, module, include) for n in names[key]):
            report.skipped.append(SkippedModule(first, f"not matched by include={include!r}"))
        elif exclude is not None and any(_matches(n, module, exclude) for n in names[key]):
            report.skipped.append(SkippedModule(first, f"matched by exclude={exclude!r}"))
        else:
            chosen.append(key)
    if include is not None and not chosen and not all(k in inside_ours for k in modules):
        candidates = ", ".join(names[k][0] or "<root>" for k in modules if k not in inside_ours)
        raise SelectionError(
            f"`include={include!r}` matches none of the BatchNorm modules ({candidates}). Use one "
            f"of these qualified names or a glob on them."
        )

    built: list[tuple[int, nn.Module, list[str]]] = []
    for key in chosen:
        old = modules[key]
        new = _build(names[key][0], old, to, options)
        transferred = _transfer(old, new, options)
        built.append((key, new, transferred))
        report.records.append(
            SwapRecord(
                names=tuple(names[key]),
                old_type=type(old).__name__,
                new_type=type(new).__name__,
                channels=int(old.num_features),
                transferred=tuple(transferred),
            )
        )
        if old._forward_hooks or old._forward_pre_hooks:
            warnings.warn(
                f"{names[key][0] or '<root>'} has forward hooks; the replacement does not get "
                f"them. Register them again on the new module.",
                UserWarning,
                stacklevel=2,
            )
    if dry_run:
        return report

    for key, new, _ in built:
        for slot in slots[key]:
            if slot.parent is None:
                report.model = new
            else:
                # _modules directly: Module.__setattr__ would do the same for a Module value,
                # but ModuleDict/Sequential keys need not be valid attribute names.
                slot.parent._modules[slot.attr] = new
        report._installed.append((slots[key], modules[key], new))
    return report
