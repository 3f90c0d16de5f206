"""lightning_norm: callbacks and plugins for studying normalization layers while a model trains.

The core (layers, surgery, statistics, probes) is plain PyTorch; :mod:`lightning_norm.callbacks`
and :mod:`lightning_norm.plugins` adapt it to Lightning. Importing ``lightning_norm`` imports the
core only, never Lightning: import the callbacks and plugins from their subpackages.
"""

from lightning_norm.errors import (
    ConfigurationError,
    LightningNormError,
    SelectionError,
    SurgeryError,
    UnknownNormError,
)
from lightning_norm.layers import (
    LpBatchNorm,
    NoisyBatchNorm,
    available_norms,
    create_norm,
    register_norm,
)
from lightning_norm.probes.replay import StepReplay
from lightning_norm.schedule import StepSchedule
from lightning_norm.selection import LayerSelection
from lightning_norm.sink import LogSink
from lightning_norm.surgery import SwapReport, swap_norms

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "LayerSelection",
    "LightningNormError",
    "LogSink",
    "LpBatchNorm",
    "NoisyBatchNorm",
    "SelectionError",
    "StepReplay",
    "StepSchedule",
    "SurgeryError",
    "SwapReport",
    "UnknownNormError",
    "available_norms",
    "create_norm",
    "register_norm",
    "swap_norms",
]
