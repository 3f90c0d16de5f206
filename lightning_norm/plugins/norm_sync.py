"""NormSync: Lightning's layer-sync plugin for BatchNorm and lightning_norm's own layers."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers.sync import SYNC_CLASSES

#: Attribute (in the module's ``__dict__``, not a submodule) recording what ``apply`` changed.
_MARK = "_norm_sync_original"


def _sync_class_for(cls: type) -> type | None:
    """The synchronized class for one of our layer classes; ``None`` if none or already one."""
    if cls in SYNC_CLASSES.values() or cls in _DERIVED.values():
        return None
    for ours, synced in SYNC_CLASSES.items():
        if cls is ours:
            return synced
    for ours in SYNC_CLASSES:
        if issubclass(cls, ours):
            return _sync_subclass(cls, ours)
    return None


_DERIVED: dict[type, type] = {}


def _sync_subclass(cls: type, ours: type) -> type:
    """A synchronized version of a user's subclass of one of our layers (cached)."""
    if cls not in _DERIVED:
        synced = SYNC_CLASSES[ours]
        _DERIVED[cls] = type(f"Sync{cls.__name__}", (synced, cls), {"__module__": cls.__module__})
    return _DERIVED[cls]


class NormSync(LayerSync):
    """Synchronize normalization statistics across processes: BatchNorm and lightning_norm's.

    A Lightning ``LayerSync`` plugin (``Trainer(plugins=[NormSync()])``, in place of
    ``sync_batchnorm=True``). Lightning calls :meth:`apply` in the strategy's setup when fitting
    (DDP, FSDP), after callbacks' ``setup`` (so after ``NormSurgery``), and :meth:`revert` at
    teardown. :meth:`apply` changes the class of each module in place, so parameters, buffers,
    hooks, devices and the state-dict keys stay exactly as they were:

    - torch BatchNorm (``BatchNorm1d/2d/3d``, subclasses, the inner BN of noisy BN) becomes
      ``torch.nn.SyncBatchNorm``, as ``Trainer(sync_batchnorm=True)`` does;
    - :class:`~lightning_norm.layers.LpBatchNorm` becomes
      :class:`~lightning_norm.layers.sync.SyncLpBatchNorm` (count, sum x, sum |x|^p or max |x|
      all-reduced: exactly the statistics of the global batch);
    - :class:`~lightning_norm.layers.NoisyBatchNorm` becomes
      :class:`~lightning_norm.layers.sync.SyncNoisyBatchNorm` (per-unit ``mu_j``, ``sigma_j``
      broadcast from the first rank; per-sample noise drawn on each rank).

    :meth:`revert` restores each converted module's original class (Lightning's own revert can
    only produce a generic ``_BatchNormXd``); modules the plugin did not convert (a
    ``SyncBatchNorm`` the model was built with) stay as they are. Checkpoints saved while
    converted load into the unconverted model and vice versa.

    ``torch.nn.SyncBatchNorm`` only runs on accelerators (CUDA, XPU, HPU); for CPU DDP pass
    ``batchnorm=False`` to synchronize only lightning_norm's layers (noisy BN then keeps an
    unsynchronized inner BN but still shares its unit-level noise parameters).

    Args:
        process_group: the ``torch.distributed`` group to synchronize over (``None``: world).
        batchnorm: also convert torch BatchNorm layers to ``SyncBatchNorm``.

    Raises:
        ConfigurationError: an uninitialized ``LazyBatchNorm`` (run one forward pass first).

    Example::

        trainer = Trainer(strategy="ddp", devices=4, num_nodes=2, plugins=[NormSync()],
                          callbacks=[NormSurgery("lp1")])
    """

    def __init__(self, process_group: Any = None, batchnorm: bool = True) -> None:
        self.process_group = process_group
        self.batchnorm = bool(batchnorm)

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert ``model``'s normalization layers in place to synchronized ones; returns it."""
        todo = []
        for name, module in model.named_modules(remove_duplicate=True):
            if _MARK in module.__dict__:
                continue  # converted by an earlier apply
            target = self._target_class(name, module)
            if target is not None:
                todo.append((module, target))
        for module, target in todo:  # collect first, then change
            had_group = "process_group" in module.__dict__
            module.__dict__[_MARK] = (type(module), had_group, module.__dict__.get("process_group"))
            module.__class__ = target
            module.process_group = self.process_group
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Give every module converted by :meth:`apply` back its original class; returns it."""
        for module in list(model.modules()):
            record = module.__dict__.pop(_MARK, None)
            if record is None:
                continue
            cls, had_group, group = record
            for attr in getattr(type(module), "sync_attributes", ()):
                module.__dict__.pop(attr, None)
            module.__class__ = cls
            if had_group:
                module.process_group = group
            else:
                module.__dict__.pop("process_group", None)
        return model

    def _target_class(self, name: str, module: nn.Module) -> type | None:
        synced = _sync_class_for(type(module))
        if synced is not None:
            return synced
        if not self.batchnorm or not isinstance(module, _BatchNorm):
            return None
        if isinstance(module, SyncBatchNorm):
            return None
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise ConfigurationError(
                f"NormSync: {name or '<root>'} is a LazyBatchNorm whose size is not known yet; "
                f"run one forward pass (or give num_features) before fitting."
            )
        return SyncBatchNorm

    def __repr__(self) -> str:
        return f"NormSync(process_group={self.process_group!r}, batchnorm={self.batchnorm})"
