"""The networks of Santurkar et al. 2018 (S18), in plain PyTorch.

- :class:`VGGLike`: the VGG-style convnet of S18's CIFAR-10 experiments, with an optional
  ``BatchNorm2d`` after every convolution (variants are made from the BN model by surgery).
- :class:`DeepLinearNetwork`: S18 App. A.1's 25-layer deep linear network, with an optional
  ``BatchNorm1d`` after every layer.

Both use Glorot (Xavier-uniform) initialization, as S18 App. A.1 does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: VGG configurations: an int is a 3x3 conv with that many output channels, "M" a 2x2 max pool.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg_small": (64, "M", 128, "M", 256, 256, "M"),
    "vgg_tiny": (16, 16, "M", 32, 32, "M"),
}


def glorot_init_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Conv/Linear layer (S18 App. A.1)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VGGLike(nn.Module):
    """VGG-style convnet: [conv3x3 -> (BN) -> ReLU | maxpool]* -> global average pool -> linear.

    Args:
        config: a key of :data:`VGG_CONFIGS` or a sequence of ints (conv widths) and ``"M"``.
        num_classes: output logits.
        in_channels: input image channels (3 for CIFAR-10, 1 for grey-scale digits).
        width: multiplies every conv width (``max(1, round(c * width))``).
        batch_norm: put a ``BatchNorm2d`` after every convolution.

    Input ``(N, in_channels, H, W)`` with H and W at least ``2 ** (number of "M")``; output
    ``(N, num_classes)`` logits.
    """

    def __init__(
        self,
        config: str | Sequence[int | str] = "vgg11",
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        cfg = VGG_CONFIGS[config] if isinstance(config, str) else tuple(config)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, round(int(item) * width))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        glorot_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class DeepLinearNetwork(nn.Module):
    """S18's deep linear network: ``depth`` square ``Linear`` layers, no nonlinearity.

    Computes ``W_depth ... W_1 x`` (each optionally followed by ``BatchNorm1d``). S18 App. A.1
    uses depth 25, width 10, Glorot init and no biases.

    Args:
        depth: number of linear layers.
        width: input, hidden and output size.
        batch_norm: put a ``BatchNorm1d(width)`` after every linear layer but the last.
        bias: give the linear layers biases.
    """

    def __init__(
        self, depth: int = 25, width: int = 10, batch_norm: bool = False, bias: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(width, width, bias=bias))
            if batch_norm and i < depth - 1:
                layers.append(nn.BatchNorm1d(width))
        self.layers = nn.Sequential(*layers)
        glorot_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
