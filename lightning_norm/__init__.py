"""lightning_norm: callbacks and plugins for studying normalization layers while a model trains.

The core (layers, surgery, statistics, probes) is plain PyTorch; :mod:`lightning_norm.callbacks`
and :mod:`lightning_norm.plugins` adapt it to Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each; resolved on first access so that importing the
# package stays cheap and plain-PyTorch users never import Lightning.
_EXPORTS: dict[str, str] = {
    # surgery
    "swap_norms": "lightning_norm.surgery",
    "SwapReport": "lightning_norm.surgery",
    # layers and their registry
    "create_norm": "lightning_norm.layers",
    "register_norm": "lightning_norm.layers",
    "available_norms": "lightning_norm.layers",
    "NoisyBatchNorm": "lightning_norm.layers",
    "LpBatchNorm": "lightning_norm.layers",
    # shared machinery
    "StepReplay": "lightning_norm.probes.replay",
    "StepSchedule": "lightning_norm.schedule",
    "LayerSelection": "lightning_norm.selection",
    "LogSink": "lightning_norm.sink",
    # errors
    "LightningNormError": "lightning_norm.errors",
    "ConfigurationError": "lightning_norm.errors",
    "SelectionError": "lightning_norm.errors",
    "SurgeryError": "lightning_norm.errors",
    "UnknownNormError": "lightning_norm.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_norm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
