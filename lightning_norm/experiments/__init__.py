"""The S18 setups as plain data, LightningModules and LightningDataModules, and their runner.

Used by ``lightning-norm reproduce`` and by ``examples/s18_vgg.py`` / ``examples/s18_dln.py``
(LightningCLI). See ``docs/reproduce.md``.
"""

from lightning_norm.experiments.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    DLNDataModule,
    dln_tensors,
    load_digits_tensors,
)
from lightning_norm.experiments.modules import (
    DLN_VARIANTS,
    VGG_VARIANTS,
    DLNRegression,
    S18Classifier,
    apply_norm,
)
from lightning_norm.experiments.runner import ReproduceConfig, VariantResult, run_comparison

__all__ = [
    "DLN_VARIANTS",
    "VGG_VARIANTS",
    "CIFAR10DataModule",
    "DLNDataModule",
    "DLNRegression",
    "DigitsDataModule",
    "ReproduceConfig",
    "S18Classifier",
    "VariantResult",
    "apply_norm",
    "dln_tensors",
    "load_digits_tensors",
    "run_comparison",
]
