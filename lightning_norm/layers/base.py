"""Marker base class shared by lightning_norm's normalization layers."""

from __future__ import annotations

from torch import nn


class NormLayer(nn.Module):
    """Base of every lightning_norm normalization layer.

    It adds no behaviour; it lets layer selection (monitors, probes) recognise our layers as
    normalization layers without a list of classes. A layer that wraps a torch norm module (noisy
    BN wraps a ``BatchNorm``) is selected as one layer: the wrapper, not its child.
    """
