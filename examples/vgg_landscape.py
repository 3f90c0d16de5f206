"""S18 Fig. 4 in miniature: the loss landscape along the gradient, VGG-like net with and without BN.

Trains :class:`~lightning_norm.models.VGGLike` (``vgg_tiny``: conv16-conv16-pool-conv32-conv32-pool,
Glorot init) on scikit-learn's bundled 8x8 digits (1,797 images, no download) with plain SGD at
the same fixed learning rate with and without BatchNorm, probes the landscape with
:class:`~lightning_norm.callbacks.LossLandscape` every ``--every`` steps (8 step lengths over
[1/2, 4] x lr, as S18 does for VGG), reads the logged values back from the TensorBoard event
files, and prints, per model, the mean over probes of the loss range, the gradient
predictiveness and the effective beta-smoothness (S18 expects all three smaller with BN).

Usage::

    python examples/vgg_landscape.py --steps 300 --every 25 --lr 0.1 --out logs/vgg_landscape
    tensorboard --logdir logs/vgg_landscape
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_norm.callbacks import LossLandscape
from lightning_norm.models import VGGLike

METRICS = ("loss_range", "grad_pred_max", "grad_pred_mean", "beta_eff", "nonfinite")


def digits() -> TensorDataset:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    return TensorDataset(x, torch.tensor(data.target))


class DigitsVGG(L.LightningModule):
    def __init__(self, batch_norm: bool, lr: float, batch_size: int) -> None:
        super().__init__()
        self.net = VGGLike("vgg_tiny", num_classes=10, in_channels=1, batch_norm=batch_norm)
        self.lr, self.batch_size = lr, batch_size
        self.data = digits()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True)


def read_back(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every ``landscape/total/*`` and ``train_*`` scalar in the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run(batch_norm: bool, args: argparse.Namespace) -> dict[str, float]:
    L.seed_everything(args.seed, verbose=False)
    name = "bn" if batch_norm else "no_bn"
    logger = TensorBoardLogger(args.out, name=name, version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=logger,
        log_every_n_steps=10,
        callbacks=[LossLandscape(every_n_steps=args.every, slice_2d=True)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsVGG(batch_norm, args.lr, args.batch_size))
    scalars = read_back(logger.log_dir)
    out: dict[str, float] = {}
    for m in METRICS:
        values = [v for _, v in scalars.get(f"landscape/total/{m}", []) if math.isfinite(v)]
        out[m] = sum(values) / len(values) if values else float("nan")
    out["probes"] = len(scalars.get("landscape/total/beta_eff", []))
    tail = [v for _, v in scalars.get("train_loss", [])][-5:]
    out["final_train_loss"] = sum(tail) / len(tail) if tail else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="logs/vgg_landscape")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    results = {"with BN": run(True, args), "without BN": run(False, args)}
    keys = ["probes", *METRICS, "final_train_loss"]
    print(
        f"VGGLike('vgg_tiny') on 8x8 digits, SGD lr={args.lr}, batch {args.batch_size}, "
        f"{args.steps} steps, probe every {args.every} (mean over probes):"
    )
    print(f"{'':20s}" + "".join(f"{k:>14s}" for k in results))
    for k in keys:
        print(f"{k:20s}" + "".join(f"{r[k]:14.4g}" for r in results.values()))
    bn, plain = results["with BN"], results["without BN"]
    for k in ("loss_range", "grad_pred_max", "beta_eff"):
        print(f"{k}: without BN / with BN = {plain[k] / bn[k]:.3g}")


if __name__ == "__main__":
    main()
