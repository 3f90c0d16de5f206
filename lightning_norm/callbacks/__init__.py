"""Lightning callbacks: thin adapters that schedule the core measurements and log them."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "NormSurgery": "lightning_norm.callbacks.norm_surgery",
    "ActivationMoments": "lightning_norm.callbacks.activation_moments",
    "GradientNorms": "lightning_norm.callbacks.gradient_norms",
    "ICSDrift": "lightning_norm.callbacks.ics_drift",
    "LossLandscape": "lightning_norm.callbacks.loss_landscape",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_norm.callbacks' has no attribute {name!r}")
