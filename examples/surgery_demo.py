"""Swap a VGG's BatchNorm layers for other normalizations and train each variant briefly.

Run: ``python examples/surgery_demo.py`` (about 15 seconds on a 2-core CPU, no download).

The same BatchNorm VGG (``lightning_norm.models.VGGLike``) is trained on a small synthetic image
task once per normalization; :class:`lightning_norm.callbacks.NormSurgery` swaps the layers when
the Trainer sets up, so the optimizer sees the new layers. It prints the surgery report of one
swap and, per variant, the training loss at the start and end and the final accuracy. The
variants are those of Santurkar et al. 2018: BatchNorm, "noisy" BN, Lp normalizations, and no
normalization at all.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_norm import swap_norms
from lightning_norm.callbacks import NormSurgery
from lightning_norm.models import VGGLike


def synthetic_images(n: int, classes: int = 4, size: int = 8, seed: int = 0) -> TensorDataset:
    """Noisy copies of one fixed random pattern per class (learnable in a few hundred steps)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, size, size, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.5 * templates[y] + torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(x, y)


class VGGClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05, steps: int = 60) -> None:
        super().__init__()
        self.net = VGGLike("vgg_tiny", num_classes=4, width=1.0)
        self.lr, self.steps = lr, steps
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(synthetic_images(32 * self.steps), batch_size=32)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per variant")
    parser.add_argument(
        "--targets", nargs="+", default=["batchnorm", "noisy_bn", "lp1", "lpinf", "none"]
    )
    args = parser.parse_args()
    # The convolutions here are tiny: thread start-up costs more than the work they split.
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")

    # The surgery on its own, plain PyTorch: what would change, then undo.
    model = VGGLike("vgg_tiny", num_classes=4)
    report = swap_norms(model, "lp1")
    print(report, end="\n\n")
    report.undo()

    test = synthetic_images(512, seed=1)
    print(f"{'variant':<12}{'first loss':>12}{'last loss':>12}{'test acc':>10}")
    for to in args.targets:
        L.seed_everything(0, verbose=False)
        module = VGGClassifier(steps=args.steps)
        callbacks = [] if to == "batchnorm" else [NormSurgery(to)]
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
        )
        trainer.fit(module)
        first = sum(module.losses[:5]) / 5
        last = sum(module.losses[-5:]) / 5
        print(f"{to:<12}{first:>12.3f}{last:>12.3f}{accuracy(module, test):>10.3f}")


if __name__ == "__main__":
    main()
