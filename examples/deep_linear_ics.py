"""S18 Fig. 3 in miniature: ICS (gradient drift) of a 25-layer deep linear network, with/without BN.

Santurkar et al. 2018, App. A.1: 25 square linear layers of width 10, no nonlinearity, Glorot
init; A is a 10 x 10 matrix of i.i.d. N(0, 1) entries; 1,000 inputs x ~ N(0, I); the loss is
``||W_25 ... W_1 x - A x||^2`` (here averaged over the 1,000 samples, summed over the 10 outputs);
full-batch gradient descent. S18 trains 10,000 steps at learning rate 1e-6 (``--steps 10000
--lr 1e-6 --bn-lr 1e-6``). With this script's mean-over-samples loss, 1e-6 barely moves either
network in a short run (cos(G, G') = 1.000 for both), so the defaults are 1,000 steps at 1e-4 for
both networks, where both train and the standard network is still stable (at 1e-3 it oscillates);
docs/ics.md gives the measured figures for each choice.

For layers 9 and 17 (1-based, counting linear layers) it logs ``ics/<layer>/l2`` and
``ics/<layer>/cosine`` with :class:`lightning_norm.callbacks.ICSDrift` and prints, per network,
the median over the probed steps. S18's finding: with BN, cos(G, G') is far below the standard
network's, which stays near 1.

Run::

    python examples/deep_linear_ics.py                      # about a minute on 2 CPU cores
    python examples/deep_linear_ics.py --steps 10000 --lr 1e-6 --bn-lr 1e-6   # S18's setting
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_norm.callbacks import ICSDrift
from lightning_norm.models import DeepLinearNetwork


class DLNTask(L.LightningModule):
    """Full-batch gradient descent on ``mean_x ||net(x) - A x||^2``."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, target = batch
        loss = ((self.net(x) - target) ** 2).sum(dim=1).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class FullBatch(Dataset):
    """``steps`` copies of the whole data set as one batch: full-batch gradient descent."""

    def __init__(self, x: torch.Tensor, target: torch.Tensor, steps: int) -> None:
        self.x, self.target, self.steps = x, target, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.target


class MemoryLogger(Logger):
    """Keeps the logged scalars in memory, for the summary printed at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    name = "memory"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


def linear_names(net: nn.Module, prefix: str = "net.") -> list[str]:
    """Qualified names of the linear layers, in forward order (1-based index = position + 1)."""
    return [prefix + n for n, m in net.named_modules() if isinstance(m, nn.Linear)]


def run(batch_norm: bool, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(args.seed)
    a = torch.randn(10, 10, generator=g)
    x = torch.randn(1000, 10, generator=g)
    # the same full batch, once per step, in one epoch (Lightning's per-epoch overhead would
    # dominate a one-batch epoch of this tiny network)
    data = DataLoader(FullBatch(x, x @ a.T, args.steps), batch_size=None)

    torch.manual_seed(args.seed)
    net = DeepLinearNetwork(depth=25, width=10, batch_norm=batch_norm)
    names = linear_names(net)
    layers = [names[i - 1] for i in args.layers]
    lr = args.bn_lr if batch_norm else args.lr
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ICSDrift(layers=layers, every_n_steps=args.every)],
    )
    trainer.fit(DLNTask(net, lr), train_dataloaders=data)

    losses = [m["train_loss"] for _, m in logger.rows if "train_loss" in m]
    summary: dict[str, dict[str, float]] = {}
    for i, layer in zip(args.layers, layers, strict=True):
        cos = [m[f"ics/{layer}/cosine"] for _, m in logger.rows if f"ics/{layer}/cosine" in m]
        l2 = [m[f"ics/{layer}/l2"] for _, m in logger.rows if f"ics/{layer}/l2" in m]
        summary[f"layer {i} ({layer})"] = {
            "median cosine": statistics.median(cos),
            "min cosine": min(cos),
            "median l2": statistics.median(l2),
            "probes": len(cos),
        }
    summary["loss"] = {"first": losses[0], "last": losses[-1], "lr": lr}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="S18: 10,000")
    parser.add_argument("--lr", type=float, default=1e-4, help="standard DLN; S18: 1e-6")
    parser.add_argument("--bn-lr", type=float, default=1e-4, help="DLN with BN; S18: 1e-6")
    parser.add_argument("--every", type=int, default=25, help="probe every N steps")
    parser.add_argument("--layers", type=int, nargs="+", default=[9, 17], help="1-based")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    # 10 x 10 matrices: extra threads only add synchronization (several times slower on 2 cores)
    torch.set_num_threads(args.threads)
    for batch_norm in (False, True):
        print(f"\n== {'with BN' if batch_norm else 'standard'} ==")
        for key, values in run(batch_norm, args).items():
            print(f"{key:24s} " + "  ".join(f"{k} {v:.4g}" for k, v in values.items()))


if __name__ == "__main__":
    main()
