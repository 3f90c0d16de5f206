"""Lightning callbacks: thin adapters that schedule the core measurements and log them."""

from lightning_norm.callbacks.activation_moments import ActivationMoments
from lightning_norm.callbacks.gradient_norms import GradientNorms
from lightning_norm.callbacks.ics_drift import ICSDrift
from lightning_norm.callbacks.loss_landscape import LossLandscape
from lightning_norm.callbacks.norm_surgery import NormSurgery

__all__ = ["ActivationMoments", "GradientNorms", "ICSDrift", "LossLandscape", "NormSurgery"]
