"""The library's exceptions: a small tree under ``ValueError`` so callers can catch ours."""

from __future__ import annotations


class LightningNormError(ValueError):
    """Base class of every error lightning_norm raises on bad input or configuration."""


class ConfigurationError(LightningNormError):
    """A setting (argument, schedule, layer choice) cannot work; the message names the fix."""


class SelectionError(ConfigurationError):
    """A layer selection (type, name glob, predicate) matches nothing or is malformed."""


class UnknownNormError(LightningNormError, KeyError):
    """A normalization name is not in the registry; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0]) if self.args else ""


class SurgeryError(LightningNormError):
    """A model cannot be changed safely (compiled, scripted, traced, or options do not fit)."""
