"""Cost of one ICS probe (S18 Def. 2.1) relative to one plain training step, on a VGG-like net.

For k probed layers the probe replays the step k + 1 times (one forward+backward for G, one per
layer for G'; a layer that runs first has nothing before it, so it needs no G' pass). A G' pass
is cheaper than a full forward+backward: its backward stops at the probed layer. Everything is
measured side by side in one run (interleaved repeats, median), plain PyTorch, CPU.

Run::

    python benchmarks/bench_ics.py [--repeats 7] [--width 0.125] [--batch 32] [--threads 0]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from lightning_norm.models import VGGLike
from lightning_norm.probes.ics import ics_drift
from lightning_norm.probes.replay import RngState, StepReplay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--width", type=float, default=0.125, help="VGG11 width multiplier")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = VGGLike("vgg11", num_classes=10, width=args.width, batch_norm=True)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    weights = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # skip the first layer for k < all: it has nothing before it and would cost no G' pass
    choices = {"1": weights[len(weights) // 2 : len(weights) // 2 + 1], "4": weights[1:5]}
    choices[f"all ({len(weights)})"] = weights

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net).backward()
        opt.step()

    def forward_backward() -> None:
        net.zero_grad(set_to_none=True)
        loss_fn(net).backward()

    def probe(layers: list[str]) -> None:
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        rng = RngState.capture()
        train_step()
        ics_drift(StepReplay(net, loss_fn, rng_state=rng), before, layers)

    for _ in range(2):  # warm-up
        train_step()
        probe(weights)
    timings: dict[str, list[float]] = {"step": [], "fb": [], **{k: [] for k in choices}}
    for _ in range(args.repeats):
        for key in timings:
            t0 = time.perf_counter()
            if key == "step":
                train_step()
            elif key == "fb":
                forward_backward()
            else:
                probe(choices[key])  # includes its own training step, subtracted below
            timings[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in timings.items()}

    print(
        f"VGG11 x{args.width} with BN, batch {args.batch} of 3x32x32, SGD+momentum, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}"
    )
    print(
        f"one training step: {med['step'] * 1e3:.1f} ms; one forward+backward: "
        f"{med['fb'] * 1e3:.1f} ms"
    )
    print(
        f"{'layers':>10} {'probe ms':>9} {'probe/step':>11} {'probe/fwd+bwd':>14} "
        f"{'theory (k+1) fwd+bwd':>21}"
    )
    for key, layers in choices.items():
        probe_time = med[key] - med["step"]
        passes = 1 + sum(1 for n in layers if n != weights[0])
        print(
            f"{key:>10} {probe_time * 1e3:9.1f} {probe_time / med['step']:11.2f} "
            f"{probe_time / med['fb']:14.2f} {passes:21d}"
        )


if __name__ == "__main__":
    main()
