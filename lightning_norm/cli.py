"""The ``lightning-norm`` command: ``reproduce`` trains the S18 comparisons, ``report`` draws them.

``lightning-norm reproduce`` (no arguments) trains, on the embedded digits data, the VGG-like
net with every normalization variant and the deep linear network with and without BN and with
Lp normalization, all with lightning_norm's callbacks attached, writes TensorBoard logs under
``runs/s18`` and then the report (``runs/s18/report/report.html``). Every setting scales up by
arguments, e.g. S18's full CIFAR-10 run on a GPU::

    lightning-norm reproduce --setup vgg --dataset cifar10 --data-dir ~/data --download \\
        --arch vgg11 --steps 15000 --batch-size 128 --lr 0.1 --accelerator gpu

``lightning-norm report LOGDIR [--out DIR]`` renders the figures and the HTML page from any log
directory (``python -m lightning_norm.report LOGDIR`` does the same).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from lightning_norm.errors import LightningNormError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _devices(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-norm`` (subcommands ``reproduce`` and ``report``)."""
    parser = argparse.ArgumentParser(
        prog="lightning-norm",
        description="Reproduce Santurkar et al. 2018 (How Does Batch Normalization Help "
        "Optimization?) with lightning_norm's callbacks, and draw its figures.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser(
        "reproduce",
        help="train the S18 comparisons and write the report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rep.add_argument(
        "--setup", type=_csv, default=["vgg", "dln"], help="comma-separated setups: vgg, dln"
    )
    rep.add_argument(
        "--variants",
        type=_csv,
        default=None,
        help="VGG variants, comma-separated (default: none,batchnorm,noisy_bn,lp1,"
        "lp2,lpinf,layernorm,groupnorm)",
    )
    rep.add_argument(
        "--dln-variants",
        type=_csv,
        default=None,
        help="DLN variants (default: none,batchnorm,lp1,lp2,lpinf)",
    )
    rep.add_argument(
        "--dataset",
        choices=["digits", "cifar10"],
        default="digits",
        help="digits: scikit-learn's embedded 8x8 digits; cifar10: torchvision",
    )
    rep.add_argument("--data-dir", default="data", help="CIFAR-10 folder")
    rep.add_argument("--download", action="store_true", help="allow downloading CIFAR-10")
    rep.add_argument("--steps", type=int, default=300, help="VGG steps per variant (S18: 15000)")
    rep.add_argument("--lr", type=float, default=0.1, help="VGG SGD learning rate (S18: 0.1)")
    rep.add_argument("--batch-size", type=int, default=128, help="VGG batch size (S18: 128)")
    rep.add_argument(
        "--arch", default="vgg_tiny", help="VGG configuration: vgg_tiny, vgg_small, vgg11 (S18)"
    )
    rep.add_argument("--width", type=float, default=1.0, help="VGG width multiplier")
    rep.add_argument(
        "--image-size",
        type=int,
        default=8,
        help="digits image side (8 native; larger upsamples, for deeper archs)",
    )
    rep.add_argument("--dln-steps", type=int, default=1000, help="DLN steps (S18: 10000)")
    rep.add_argument(
        "--dln-lr",
        type=float,
        default=1e-4,
        help="DLN learning rate on the mean-over-samples loss (S18: 1e-6; at 1e-3 the "
        "standard DLN oscillates; see docs/reproduce.md)",
    )
    rep.add_argument("--dln-depth", type=int, default=25, help="DLN depth (S18: 25)")
    rep.add_argument(
        "--monitor-every",
        type=int,
        default=None,
        help="ActivationMoments/GradientNorms interval in steps (default: 1 VGG, 5 DLN)",
    )
    rep.add_argument(
        "--probe-every",
        type=int,
        default=None,
        help="ICSDrift/LossLandscape interval (default: steps // 25)",
    )
    rep.add_argument("--logdir", default="runs/s18", help="where the logs go")
    rep.add_argument("--out", default=None, help="report folder (default: LOGDIR/report)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument(
        "--wandb", action="store_true", help="also log offline W&B runs (grouped per setup)"
    )
    rep.add_argument("--accelerator", default="auto", help="Trainer accelerator: auto, cpu, gpu")
    rep.add_argument("--devices", type=_devices, default=1, help="Trainer devices")
    rep.add_argument("--num-workers", type=int, default=2, help="CIFAR-10 DataLoader workers")
    rep.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for digits/DLN, torch's default otherwise)",
    )
    rep.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="fits run at once in separate processes (default: 2 on a CPU-only machine with "
        ">= 2 cores, 1 with a GPU)",
    )
    rep.add_argument(
        "--hessian",
        action="store_true",
        help="also log the top Hessian eigenvalue at each landscape probe (slower)",
    )
    rep.add_argument(
        "--no-monitors", action="store_true", help="train only, without the measurement callbacks"
    )
    rep.add_argument("--no-report", action="store_true", help="skip writing the report")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    rp = sub.add_parser("report", help="draw S18's figures and one HTML page from logs")
    rp.add_argument("logdir", help="directory with TensorBoard event files / W&B offline runs")
    rp.add_argument("--out", default=None, help="output folder (default: LOGDIR/report)")
    return parser


def _report(logdir: str, out: str | None) -> int:
    from lightning_norm.report import build_report

    result = build_report(logdir, out)
    for msg in result.messages:
        print(f"note: {msg}")
    for group, found in result.findings.items():
        for claim, ok, evidence in found:
            verdict = "consistent" if ok else "NOT consistent"
            print(f"[{group}] {verdict} with S18: {claim} ({evidence})")
    print(f"wrote {len(result.figures)} figure(s) and {result.html}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from lightning_norm.experiments.runner import ReproduceConfig, default_jobs, run_many

    start = time.perf_counter()
    configs = []
    for setup in args.setup:
        vgg = setup == "vgg"
        configs.append(
            ReproduceConfig(
                setup=setup,
                variants=args.variants if vgg else args.dln_variants,
                steps=args.steps if vgg else args.dln_steps,
                lr=args.lr if vgg else args.dln_lr,
                batch_size=args.batch_size,
                dataset=args.dataset,
                data_dir=args.data_dir,
                download=args.download,
                arch=args.arch,
                width=args.width,
                image_size=args.image_size,
                depth=args.dln_depth,
                monitor_every=args.monitor_every,
                probe_every=args.probe_every,
                logdir=args.logdir,
                seed=args.seed,
                wandb=args.wandb,
                accelerator=args.accelerator,
                devices=args.devices,
                progress=not args.no_progress,
                monitors=not args.no_monitors,
                num_workers=args.num_workers,
                threads=args.threads,
                hessian=args.hessian,
            ).resolved()  # check every setup before the first one trains
        )
    run_many(configs, jobs=args.jobs or default_jobs())
    print(f"trained in {time.perf_counter() - start:.0f}s; logs in {args.logdir}")
    if args.no_report:
        return 0
    return _report(args.logdir, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-norm``; returns the exit status (2 on a configuration error).

    Example::

        main(["reproduce", "--steps", "50", "--setup", "vgg", "--variants", "none,batchnorm"])
    """
    os.environ.setdefault("MPLBACKEND", "Agg")
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "report":
            return _report(args.logdir, args.out)
        return _reproduce(args)
    except LightningNormError as err:
        print(f"lightning-norm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
