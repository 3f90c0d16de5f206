"""LightningModules for the S18 setups; every variant is made by surgery of one BN model.

Both modules build the BatchNorm network of S18 (:class:`~lightning_norm.models.VGGLike` or
:class:`~lightning_norm.models.DeepLinearNetwork` with ``batch_norm=True``) and, unless
``norm="batchnorm"``, replace every BN with :func:`lightning_norm.swap_norms`, so the variants
differ only in the normalization layer. ``norm="none"`` (S18's "standard" network) swaps BN for
an identity; the convolutions then have no bias (``VGGLike`` drops it when BN follows), which
is the only difference from a network built without BN and is immaterial at zero-initialized
biases.

Logged by the modules (``self.log``; x-axis ``trainer.global_step``):

- ``train/loss``, ``train/acc`` (classifier) every step: loss and accuracy of the training batch
  in train mode, the quantities S18 Fig. 1 plots;
- ``val/loss``, ``val/acc`` (classifier) at each validation: eval mode, running statistics.
- ``train/loss`` (DLN) every step: ``mean_n ||W x_n - A x_n||^2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError
from lightning_norm.models import VGG_CONFIGS, DeepLinearNetwork, VGGLike

#: The VGG variants of S18 (Fig. 1, 2, 4, 5) plus LayerNorm and GroupNorm, in report order.
VGG_VARIANTS: tuple[str, ...] = (
    "none",
    "batchnorm",
    "noisy_bn",
    "lp1",
    "lp2",
    "lpinf",
    "layernorm",
    "groupnorm",
)
#: The deep-linear-network variants (S18 Fig. 3, 10, 12, 13).
DLN_VARIANTS: tuple[str, ...] = ("none", "batchnorm", "lp1", "lp2", "lpinf")


def apply_norm(net: nn.Module, norm: str, options: dict[str, Any] | None = None) -> list[str]:
    """Turn the BN network ``net`` into the ``norm`` variant in place; return the BN slots.

    The slots are the qualified names of the original BN modules; after surgery they name the
    replacement (the identity for ``"none"``), so every variant exposes the same layer names and
    the monitors can be pointed at them.

    Raises:
        ConfigurationError: ``net`` has no BatchNorm, or the surgery replaced the root module.
        UnknownNormError: ``norm`` is not a registered normalization.
    """
    slots = [n for n, m in net.named_modules() if isinstance(m, _BatchNorm)]
    if not slots:
        raise ConfigurationError("apply_norm needs a network with BatchNorm layers to swap.")
    if norm != "batchnorm":
        from lightning_norm import swap_norms

        report = swap_norms(net, norm, **(options or {}))
        root = getattr(report, "model", net)
        if root is not net:
            raise ConfigurationError("apply_norm cannot swap a BatchNorm at the root.")
    return slots


class S18Classifier(L.LightningModule):
    """S18's VGG-like classifier with a chosen normalization, trained by plain SGD.

    Cross-entropy loss, SGD with a fixed learning rate (S18: 0.1, no momentum, no weight decay).

    Args:
        norm: normalization in place of BN: a name of :func:`lightning_norm.available_norms`
            (``"none"``, ``"batchnorm"``, ``"noisy_bn"``, ``"lp1"``, ``"lp2"``, ``"lpinf"``,
            ``"layernorm"``, ``"groupnorm"``, ...).
        arch: a key of :data:`lightning_norm.models.VGG_CONFIGS` or a list of conv widths and
            ``"M"`` (max pool).
        width: multiplies every conv width.
        num_classes: output classes.
        in_channels: image channels (1 for digits, 3 for CIFAR-10).
        lr: SGD learning rate.
        momentum: SGD momentum (S18: 0).
        weight_decay: SGD weight decay (S18: 0).
        norm_options: keyword options for the replacement layer (e.g. ``{"num_groups": 4}``).

    Raises:
        ConfigurationError: ``lr <= 0``, an unknown ``arch``.
        UnknownNormError: an unknown ``norm``.

    Example::

        trainer.fit(S18Classifier(norm="lp1", arch="vgg_tiny"), datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        norm: str = "batchnorm",
        arch: str | list[int | str] = "vgg_tiny",
        width: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 1,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigurationError(f"lr must be > 0, got {lr}.")
        if isinstance(arch, str) and arch not in VGG_CONFIGS:
            raise ConfigurationError(
                f"Unknown arch {arch!r}; choose one of {sorted(VGG_CONFIGS)} or pass a list of "
                "conv widths and 'M'."
            )
        self.save_hyperparameters()
        self.net = VGGLike(arch, num_classes, in_channels, width, batch_norm=True)
        self.norm_slots = ["net." + s for s in apply_norm(self.net, norm, norm_options)]
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


class DLNRegression(L.LightningModule):
    """S18's deep linear network fitting ``y = A x`` by full-batch gradient descent.

    Loss ``mean_n ||W_depth ... W_1 x_n - y_n||_2^2`` (squared output units); plain gradient
    descent (SGD on the full batch). S18 App. A.1 uses lr 1e-6 for 10,000 steps and does not say
    whether its loss sums or averages over samples (a sum makes it lr 1e-3 here). The default,
    1e-4, trains both the standard and the BN network visibly in 1,000 steps; at 1e-3 the
    standard network oscillates (its cos(G, G') goes to -1, measured in ``docs/reproduce.md``).

    Args:
        norm: normalization after every layer but the last (``"none"``, ``"batchnorm"``,
            ``"lp1"``, ``"lp2"``, ``"lpinf"``, ...).
        depth: number of linear layers (S18: 25).
        width: layer width (S18: 10).
        lr: gradient-descent learning rate.
        norm_options: keyword options for the replacement layer.

    Raises:
        ConfigurationError: ``lr <= 0``, ``depth < 2``.

    Example::

        trainer.fit(DLNRegression(norm="batchnorm"), datamodule=DLNDataModule())
    """

    def __init__(
        self,
        norm: str = "none",
        depth: int = 25,
        width: int = 10,
        lr: float = 1e-4,
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigurationError(f"lr must be > 0, got {lr}.")
        if depth < 2:
            raise ConfigurationError(f"depth must be >= 2 (BN sits between layers), got {depth}.")
        self.save_hyperparameters()
        self.net = DeepLinearNetwork(depth, width, batch_norm=True)
        self.norm_slots = ["net." + s for s in apply_norm(self.net, norm, norm_options)]
        self.linear_layers = [
            "net." + n for n, m in self.net.named_modules() if isinstance(m, nn.Linear)
        ]
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = (self(x) - y).pow(2).sum(dim=1).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
