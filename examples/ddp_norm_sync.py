"""Train a small VGG with synchronized Lp / noisy batch normalization under DDP.

``NormSurgery`` swaps the model's BatchNorm layers for a lightning_norm layer in ``setup``;
``NormSync`` (a Lightning ``LayerSync`` plugin, used instead of ``sync_batchnorm=True``) then
makes their batch statistics span all processes: Lp normalization all-reduces its per-channel
sums (exactly the global batch's statistics), noisy BN synchronizes its inner BatchNorm and
shares the per-unit noise parameters across ranks. Random CIFAR-sized data keeps it offline.

Single machine, 2 CPU processes (gloo; torch's SyncBatchNorm needs GPUs, so ``--norm lp1`` and
``--no-sync-bn`` there)::

    python examples/ddp_norm_sync.py --accelerator cpu --devices 2 --norm lp1 --no-sync-bn

One node with 4 GPUs::

    python examples/ddp_norm_sync.py --accelerator gpu --devices 4 --norm noisy_bn

Two nodes with 8 GPUs each (run on every node; NODE_RANK 0 on the master)::

    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NODE_RANK=0 \\
        python examples/ddp_norm_sync.py --accelerator gpu --devices 8 --num-nodes 2 \\
        --norm noisy_bn

or with torchrun (same on each node, ``--node_rank`` 0 and 1)::

    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr 10.0.0.1 \\
        --master_port 29500 examples/ddp_norm_sync.py --accelerator gpu --devices 8 \\
        --num-nodes 2 --norm lp2
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_norm.callbacks import NormSurgery
from lightning_norm.models import VGGLike
from lightning_norm.plugins import NormSync


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.net = VGGLike("vgg_tiny", num_classes=10, in_channels=3, batch_norm=True)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="lp1", help="registered name: lp1, lp2, noisy_bn, ...")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument(
        "--no-sync-bn",
        action="store_true",
        help="leave torch BatchNorm layers unsynchronized (needed on CPU)",
    )
    args = parser.parse_args()
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp_spawn" if args.accelerator == "cpu" else "ddp",
        max_steps=args.max_steps,
        callbacks=[NormSurgery(args.norm)],
        plugins=[NormSync(batchnorm=not args.no_sync_bn)],
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(Classifier(), data())


if __name__ == "__main__":
    main()
