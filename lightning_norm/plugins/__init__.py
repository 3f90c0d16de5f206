"""Lightning plugins: :class:`NormSync`, layer synchronization for lightning_norm's layers."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "NormSync": "lightning_norm.plugins.norm_sync",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_norm.plugins' has no attribute {name!r}")
