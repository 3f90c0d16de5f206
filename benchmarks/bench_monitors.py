"""Step time of ActivationMoments / GradientNorms relative to bare training, side by side.

Trains ``VGGLike("vgg_small", width=0.25)`` on random 32x32 CIFAR-shaped images with SGD and
measures the median time per training step (from one ``on_train_batch_start`` to the next, so
every callback hook and the logger are included) for:

* ``bare``: no monitor;
* ``activation_moments``: ``ActivationMoments()`` at its defaults, logging every step;
* ``gradient_norms``: ``GradientNorms()`` at its defaults, logging every step;
* ``wandb_watch``: ``WandbLogger.watch(model, log="all", log_freq=1)`` (offline);
* ``naive_hook``: a forward hook on the same layers that copies each activation to host memory
  and computes its histogram and moments with NumPy (what pl_bolts' ModuleDataMonitor does).

Every configuration except W&B writes to an in-memory logger, so the ratios measure the
monitors, not disk I/O. Rounds interleave the configurations so that load from other processes
affects all of them alike; the reported figure is the median over rounds of each round's median.

Usage::

    python benchmarks/bench_monitors.py [--steps 40] [--rounds 3] [--batch-size 128]
    python benchmarks/bench_monitors.py --threads 1 --clock cpu   # on a shared machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_norm.callbacks import ActivationMoments, GradientNorms
from lightning_norm.models import VGGLike
from lightning_norm.selection import LayerSelection


class MemoryLogger(Logger):
    """Keeps metrics in a list (what a fast logger costs: nothing)."""

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


class Net(L.LightningModule):
    def __init__(self, batch_size: int, n_batches: int) -> None:
        super().__init__()
        self.net = VGGLike("vgg_small", num_classes=10, width=0.25)
        self.batch_size, self.n_batches = batch_size, n_batches

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        n = self.batch_size * self.n_batches
        x = torch.randn(n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


class StepTimer(L.Callback):
    """Per-step wall time, or process CPU time (robust to other processes sharing the cores)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(self.clock())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(self.clock())

    def median_step(self, skip: int) -> float:
        d = np.diff(self.starts)[skip:]
        return float(np.median(d))


class NaiveHook(L.Callback):
    """Copies each selected activation to host memory and summarises it with NumPy."""

    def __init__(self) -> None:
        self.handles = []
        self.summaries = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        for _, module in LayerSelection().resolve(pl_module):
            self.handles.append(module.register_forward_hook(self.hook))

    def hook(self, module, args, output) -> None:
        if not module.training:
            return
        host = output.detach().to("cpu", copy=True).numpy()
        np.histogram(host, bins=64)
        host.mean(), host.std()
        self.summaries += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        for h in self.handles:
            h.remove()


def run(config: str, steps: int, batch_size: int, skip: int, tmp: str, clock) -> float:
    torch.manual_seed(0)
    model = Net(batch_size, steps)
    timer = StepTimer(clock)
    callbacks: list[L.Callback] = [timer]
    logger: Logger = MemoryLogger()
    if config == "activation_moments":
        callbacks.append(ActivationMoments())
    elif config == "gradient_norms":
        callbacks.append(GradientNorms())
    elif config == "naive_hook":
        callbacks.append(NaiveHook())
    elif config == "wandb_watch":
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(save_dir=tmp, offline=True, project="bench_monitors")
        logger.watch(model, log="all", log_freq=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model)
    if config == "wandb_watch":
        import wandb

        logger.experiment.unwatch(model)
        wandb.finish()
    return timer.median_step(skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter; cpu: process CPU time (use on a shared machine, 1 thread)",
    )
    parser.add_argument(
        "--configs",
        default="bare,activation_moments,gradient_norms,wandb_watch,naive_hook",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    configs = args.configs.split(",")
    times: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for c in configs:
                clock = time.perf_counter if args.clock == "wall" else time.process_time
                times[c].append(run(c, args.steps, args.batch_size, args.skip, tmp, clock))
    bare = statistics.median(times["bare"]) if "bare" in times else None
    print(
        f"VGGLike('vgg_small', width=0.25), batch {args.batch_size}x3x32x32, SGD, "
        f"{args.steps} steps x {args.rounds} rounds, torch threads {args.threads}, "
        f"{args.clock} clock"
    )
    print(f"{'config':<20} {'median step (ms)':>16} {'ratio to bare':>14}")
    for c in configs:
        t = statistics.median(times[c])
        ratio = f"{t / bare:.3f}x" if bare else "-"
        print(f"{c:<20} {1000 * t:>16.2f} {ratio:>14}")


if __name__ == "__main__":
    main()
