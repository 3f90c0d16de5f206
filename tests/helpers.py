"""Small models and data shared by the tests (no download, seconds on CPU)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def random_images(n: int = 64, channels: int = 3, size: int = 8, classes: int = 4, seed: int = 0):
    """A labelled image dataset whose labels depend on the images (so training makes progress)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y % classes)


def small_convnet(channels: int = 3, width: int = 8, classes: int = 4, bn: bool = True):
    """conv -> BN -> ReLU -> dropout -> conv -> BN -> ReLU -> pool -> linear."""
    norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        norm(width),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Conv2d(width, width, 3, padding=1),
        norm(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in ``rows``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def by_step(self, prefix: str) -> dict[int, dict[str, float]]:
        """The metrics whose name starts with ``prefix``, merged per step."""
        out: dict[int, dict[str, float]] = {}
        for step, m in self.rows:
            sel = {k: v for k, v in m.items() if k.startswith(prefix)}
            if sel:
                out.setdefault(step, {}).update(sel)
        return out


class Classifier(L.LightningModule):
    """A plain classification LightningModule around any ``nn.Module`` (the tests' BoringModel).

    It calls ``self.log`` in ``training_step`` like a real module does, so tests can check that
    probes do not log.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        data_seed: int = 0,
        n: int = 64,
        batch_size: int = 16,
    ):
        super().__init__()
        self.net = net if net is not None else small_convnet()
        self.lr, self.optimizer_name = lr, optimizer
        self.momentum, self.weight_decay = momentum, weight_decay
        self.data_seed, self.n, self.batch_size = data_seed, n, batch_size

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def train_dataloader(self):
        return DataLoader(random_images(self.n, seed=self.data_seed), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(random_images(32, seed=self.data_seed + 1), batch_size=self.batch_size)


def cpu_trainer(**kwargs) -> L.Trainer:
    """A quiet CPU Trainer for tests; kwargs override the defaults."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
