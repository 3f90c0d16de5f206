"""Cost of LossLandscape: one probe vs one training step, and the default schedule's overhead.

The machine this runs on is often shared, so wall times of separate runs drift; the per-probe
cost is therefore measured *inside* one run: every step is timed (``on_train_batch_start`` to
``on_train_batch_end``), the callback probes every ``--every`` steps, and the probe's cost is the
median probed step minus the median unprobed step of the same run. Prints:

- ``bare step``: median unprobed step (forward, backward, SGD update), seconds;
- ``one probe``: extra time of a probe at the default settings (8 grid points, no Hessian);
- ``+ Hessian``: the extra cost of ``hessian=True`` (power iteration, up to 20 products);
- ``end slice``: the end-of-fit 1-D slice (21 forwards);
- ``default schedule``: the amortized overhead of ``LossLandscape()`` (every 200 steps, slice at
  the end) over runs of 1,000 and 15,000 steps (S18's length), from the measured costs:
  ``1 + (probes * probe + slice) / (steps * step)``;
- ``side by side``: wall time of ``--steps`` steps with ``LossLandscape()`` over a bare run of
  the same length, alternated ``--repeats`` times, fastest of each (noisy on a shared machine).

Usage: ``python benchmarks/bench_landscape.py [--steps 400] [--every 5] [--probed-steps 40]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
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
    """Whole-fit wall time, each step's time, and the time spent in ``on_train_end`` hooks."""

    def __init__(self) -> None:
        self.steps: list[float] = []

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last = time.perf_counter()
        self.steps.append(self.last - self.t0)

    def on_train_end(self, trainer, pl_module):  # listed last: runs after the callback's slice
        self.end_hooks = time.perf_counter() - self.last
        self.seconds = time.perf_counter() - self.start


def run(steps: int, callback: L.Callback | None, args) -> Timer:
    L.seed_everything(0, verbose=False)
    model = Net(bn=True, batch_size=args.batch_size, n=args.batch_size * 16, size=args.size)
    timer = Timer()
    callbacks = ([callback] if callback is not None else []) + [timer]
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
    return timer


def probe_cost(timer: Timer, every: int) -> tuple[float, float]:
    """(median unprobed step, median probed step - median unprobed step), step 0 left out."""
    probed = [t for i, t in enumerate(timer.steps) if i % every == 0 and i > 0]
    other = [t for i, t in enumerate(timer.steps) if i % every != 0 and i > 1]
    step = statistics.median(other)
    return step, statistics.median(probed) - step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--probed-steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_norm").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    a = run(args.probed_steps, LossLandscape(every_n_steps=args.every), args)
    step, probe = probe_cost(a, args.every)
    slice_cost = a.end_hooks
    b = run(args.probed_steps, LossLandscape(every_n_steps=args.every, hessian=True), args)
    step_h, probe_h = probe_cost(b, args.every)
    hessian = probe_h - probe * step_h / step
    every = LossLandscape().schedule.every_n_steps
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, cb in (("bare", None), ("default", LossLandscape())):
            best[name] = min(best.get(name, float("inf")), run(args.steps, cb, args).seconds)

    print(
        f"model: VGGLike('vgg_tiny', batch_norm=True), batch {args.batch_size}, "
        f"{args.size}x{args.size} inputs, SGD, torch threads {torch.get_num_threads()}"
    )
    print(f"bare step:            {step * 1e3:8.1f} ms")
    print(f"one probe (defaults): {probe * 1e3:8.1f} ms = {probe / step:6.1f} x one step")
    print(f"+ Hessian:            {hessian * 1e3:8.1f} ms = {hessian / step_h:6.1f} x one step")
    print(f"end slice (21 fwd):   {slice_cost * 1e3:8.1f} ms = {slice_cost / step:6.1f} x one step")
    for n in (1000, 15000):
        probes = (n - 1) // every + 1
        ratio = 1 + (probes * probe + slice_cost) / (n * step)
        print(
            f"default schedule (every {every}), {n:5d} steps: {ratio:6.3f} x bare (from the above)"
        )
    print(
        f"side by side, {args.steps} steps, fastest of {args.repeats}: "
        f"{best['default'] / best['bare']:6.3f} x bare"
    )


if __name__ == "__main__":
    main()
