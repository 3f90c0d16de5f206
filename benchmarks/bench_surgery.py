"""Time swap_norms on a ResNet-152-shaped model (155 BatchNorm2d layers, 64..2048 channels).

Run: ``python benchmarks/bench_surgery.py [--repeats 7]``. Prints, per target, the median time
of one ``swap_norms`` call over the whole model (each swap is undone, untimed, before the next),
the time of ``undo()`` and of a ``dry_run``, and the ratio to a baseline measured in the same run:
building 155 plain ``nn.BatchNorm2d`` of the same sizes and copying their state (the work any
swap must do). Target (issue 3): a swap of ~150 BN layers under 100 ms.

torchvision is not a dependency, so the model is built here: torchvision's ResNet-152 layout
(bottleneck blocks [3, 8, 36, 3], expansion 4, a projection shortcut per stage), ~60 M
parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from lightning_norm import swap_norms


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet152(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 8, 2), (256, 36, 2), (512, 3, 2)):
        stage = []
        for i in range(blocks):
            stage.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
        layers.append(nn.Sequential(*stage))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["batchnorm", "frozen_bn", "lp1", "lp2", "noisy_bn", "groupnorm", "none"],
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    model = resnet152()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-152-shaped model: {len(bns)} BatchNorm2d, {params / 1e6:.1f} M parameters")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    def baseline() -> None:
        # the floor: one new BN per layer and a copy of its five tensors
        for bn in bns:
            new = nn.BatchNorm2d(bn.num_features)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(new, name).copy_(getattr(bn, name))
                new.num_batches_tracked.copy_(bn.num_batches_tracked)

    base = median_ms(baseline, args.repeats)
    print(f"baseline (build {len(bns)} nn.BatchNorm2d + copy state): {base:8.2f} ms\n")
    header = f"{'target':<12}{'swap ms':>10}{'x baseline':>12}{'undo ms':>10}{'dry run ms':>12}"
    print(header + "   < 100 ms?")
    print("-" * (len(header) + 12))
    for to in args.targets:
        reports = []

        def swap(to=to, reports=reports) -> None:
            reports.append(swap_norms(model, to))

        def undo(reports=reports) -> None:
            reports.pop().undo()

        swap_times, undo_times = [], []
        for _ in range(args.repeats):
            swap_times.append(median_ms(swap, 1))
            undo_times.append(median_ms(undo, 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dry = median_ms(lambda to=to: swap_norms(model, to, dry_run=True), args.repeats)
        swap_ms, undo_ms = statistics.median(swap_times), statistics.median(undo_times)
        ok = "yes" if swap_ms < 100 else "NO"
        print(f"{to:<12}{swap_ms:>10.2f}{swap_ms / base:>12.2f}{undo_ms:>10.2f}{dry:>12.2f}   {ok}")
    assert all(isinstance(m, nn.BatchNorm2d) for m in bns)  # every swap was undone


if __name__ == "__main__":
    main()
