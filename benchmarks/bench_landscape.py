"""Cost of LossLandscape: one probe vs one training step, and the default schedule's overhead.

Runs side by side in one process, on the same model and data, alternating the configurations
(bare, probe every step, default schedule) ``--repeats`` times and keeping each one's fastest run,
so a busy machine disturbs the ratios as little as possible. Prints:

- ``step``: seconds per bare training step (forward, backward, SGD update);
- ``one probe``: extra seconds per probe at the default settings (8 grid points, no Hessian, no
  slice) divided by the bare step time, measured with ``every_n_steps=1``;
- ``+ Hessian``: the extra cost of ``hessian=True`` (power iteration, up to 20 products);
- ``default schedule``: wall time of ``--steps`` steps with ``LossLandscape()`` at its defaults
  (every 200 steps, slice at the end) divided by the bare run's (target <= 1.10).

Usage: ``python benchmarks/bench_landscape.py [--steps 1000] [--probe-steps 6] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_norm.callbacks.loss_landscape import LossLandscape
from lightning_norm.models import VGGLike


class NullLogger(Logger):
    """Accepts metrics and drops them (the cost of a real logger is not what is measured)."""

    @property
    def name(self):
        return "null"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Net(L.LightningModule):
    def __init__(self, bn: bool, batch_size: int, n: int, size: int):
        super().__init__()
        self.net = VGGLike("vgg_tiny", num_classes=10, batch_norm=bn)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, size, size, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        self.data = TensorDataset(x, y)
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class Timer(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def run(steps: int, callback: L.Callback | None, args) -> float:
    L.seed_everything(0, verbose=False)
    model = Net(bn=True, batch_size=args.batch_size, n=args.batch_size * 16, size=args.size)
    timer = Timer()
    callbacks = [timer] + ([callback] if callback is not None else [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=NullLogger(),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    trainer.fit(model)
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--probe-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    best: dict[str, float] = {}
    for _ in range(args.repeats):
        runs = {
            "bare_short": lambda: run(args.probe_steps, None, args),
            "probe_every_step": lambda: run(
                args.probe_steps, LossLandscape(every_n_steps=1, slice_at_end=False), args
            ),
            "hessian_every_step": lambda: run(
                args.probe_steps,
                LossLandscape(every_n_steps=1, slice_at_end=False, hessian=True),
                args,
            ),
            "bare_long": lambda: run(args.steps, None, args),
            "default": lambda: run(args.steps, LossLandscape(), args),
        }
        for name, fn in runs.items():
            seconds = fn()
            best[name] = min(best.get(name, float("inf")), seconds)
    step = best["bare_long"] / args.steps
    probe = (best["probe_every_step"] - best["bare_short"]) / args.probe_steps
    hessian = (best["hessian_every_step"] - best["probe_every_step"]) / args.probe_steps
    print(
        f"model: VGGLike('vgg_tiny', batch_norm=True), batch {args.batch_size}, "
        f"{args.size}x{args.size} inputs, torch threads {torch.get_num_threads()}"
    )
    print(f"bare step:                  {step * 1e3:8.1f} ms")
    print(f"one probe (defaults):       {probe * 1e3:8.1f} ms = {probe / step:6.1f} x one step")
    print(
        f"+ Hessian (hessian=True):   {hessian * 1e3:8.1f} ms = {hessian / step:6.1f} x one step "
        f"(up to 20 Hessian-vector products)"
    )
    print(
        f"default schedule, {args.steps} steps: {best['default'] / best['bare_long']:6.3f} x bare "
        f"(every {LossLandscape().schedule.every_n_steps} steps + slice at the end)"
    )


if __name__ == "__main__":
    main()
