"""Train the S18 comparisons with lightning_norm's callbacks attached; used by the CLI.

:func:`run_comparison` / :func:`run_many` train each setup (``"vgg"`` or ``"dln"``) once per
normalization variant, each variant a separate Lightning fit from the same seed, logging to
``<logdir>/<setup>/<variant>/`` (TensorBoard; a previous run there is replaced) and, with
``wandb=True``, to an offline W&B run in ``<logdir>/wandb`` grouped by setup
(``group="<setup>"``, run name = variant, config ``norm`` = variant). ``jobs > 1`` runs that many
fits at once in spawned processes. Attached to every fit (:func:`monitor_callbacks`):

- :class:`~lightning_norm.callbacks.ActivationMoments` on the normalization slots (the outputs of
  the original BN positions, so every variant is measured at the same place; for ``"none"`` that
  is the convolution's output), every ``monitor_every`` steps;
- :class:`~lightning_norm.callbacks.GradientNorms` every ``monitor_every`` steps;
- :class:`~lightning_norm.callbacks.ICSDrift` on the Conv/Linear layers and
  :class:`~lightning_norm.callbacks.LossLandscape` (S18's step range: [1/2, 4] x lr for VGG,
  [1/100, 30] x lr for the DLN), every ``probe_every`` steps.

The DLN measures 4 slots and 4 layers spread over its depth (all 24 + 25 would log ~800 scalars
a step). A callback that is not available in the installed version is left out with a warning;
the report then says which figures lack data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_norm.errors import ConfigurationError
from lightning_norm.experiments.data import CIFAR10DataModule, DigitsDataModule, DLNDataModule
from lightning_norm.experiments.modules import (
    DLN_VARIANTS,
    VGG_VARIANTS,
    DLNRegression,
    S18Classifier,
)

log = logging.getLogger(__name__)

SETUPS = ("vgg", "dln")
DATASETS = ("digits", "cifar10")


@dataclass
class ReproduceConfig:
    """Settings of one S18 comparison (one setup, several variants).

    Args:
        setup: ``"vgg"`` (VGG-like convnet, classification) or ``"dln"`` (deep linear network).
        variants: normalizations to compare; default :data:`VGG_VARIANTS` / :data:`DLN_VARIANTS`.
        steps: optimizer steps per variant (S18: 15,000 for VGG, 10,000 for the DLN).
        lr: SGD learning rate; default 0.1 for VGG (S18), 1e-4 for the DLN (see
            :class:`DLNRegression`).
        batch_size: training batch (S18: 128; the DLN always uses the full batch).
        dataset: ``"digits"`` (embedded default) or ``"cifar10"`` (torchvision).
        data_dir: CIFAR-10 folder.
        download: allow downloading CIFAR-10.
        arch: VGG configuration (``"vgg_tiny"``, ``"vgg_small"``, ``"vgg11"`` or a list).
        width: VGG width multiplier.
        image_size: digits image side (8 native; larger upsamples, for deeper configs).
        depth: DLN depth (S18: 25).
        monitor_every: ActivationMoments / GradientNorms interval in steps; default 1 for VGG,
            5 for the DLN.
        probe_every: ICSDrift / LossLandscape interval; default ``max(1, steps // 25)``.
        val_every: validation interval in steps (VGG only); default ``max(1, steps // 10)``.
        logdir: root of the logs.
        seed: seeds the model, the data order and the probes.
        wandb: also log to an offline W&B run.
        accelerator / devices: passed to the Trainer.
        progress: show Lightning's progress bar.
        monitors: attach the measurement callbacks (off: train only).
        num_workers: DataLoader workers for CIFAR-10.
        threads: torch intra-op threads during the fits (restored afterwards). Default: 1 for
            the digits and DLN setups, whose tensors are too small to gain from more (and where
            2 spinning threads on a busy 2-core machine made steps ~8x slower, measured), else
            torch's default.
        hessian: also log the top Hessian eigenvalue at each landscape probe (beyond S18;
            off by default: 20 Hessian-vector products per probe cost more than the rest).
        extra_callbacks: more callbacks for every fit (picklable when ``jobs > 1``).

    Raises:
        ConfigurationError: from :meth:`resolved` (called by the runners before any fit).

    Example::

        cfg = ReproduceConfig(setup="vgg", variants=["none", "noisy_bn"], steps=100)
        run_comparison(cfg)
    """

    setup: str = "vgg"
    variants: Sequence[str] | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int = 128
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    arch: str | list[int | str] = "vgg_tiny"
    width: float = 1.0
    image_size: int = 8
    depth: int = 25
    monitor_every: int | None = None
    probe_every: int | None = None
    val_every: int | None = None
    logdir: str = "runs/s18"
    seed: int = 0
    wandb: bool = False
    accelerator: str = "auto"
    devices: int | str = 1
    progress: bool = True
    monitors: bool = True
    num_workers: int = 2
    threads: int | None = None
    hessian: bool = False
    extra_callbacks: list[Any] = field(default_factory=list)

    def resolved(self) -> ReproduceConfig:
        """A copy with every default filled in and every setting checked.

        Raises:
            ConfigurationError: an unknown setup, dataset or variant, or a non-positive number.
        """
        if self.setup not in SETUPS:
            raise ConfigurationError(f"Unknown setup {self.setup!r}; choose from {SETUPS}.")
        if self.dataset not in DATASETS:
            raise ConfigurationError(f"Unknown dataset {self.dataset!r}; choose from {DATASETS}.")
        vgg = self.setup == "vgg"
        steps = self.steps if self.steps is not None else (300 if vgg else 1000)
        monitor_every = self.monitor_every or (1 if vgg else 5)
        lr = self.lr if self.lr is not None else (0.1 if vgg else 1e-4)
        variants = tuple(self.variants or (VGG_VARIANTS if vgg else DLN_VARIANTS))
        for name, value in (
            ("steps", steps),
            ("batch_size", self.batch_size),
            ("monitor_every", monitor_every),
            ("probe_every", self.probe_every or 1),
            ("val_every", self.val_every or 1),
        ):
            if value < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {value}.")
        if lr <= 0:
            raise ConfigurationError(f"lr must be > 0, got {lr}.")
        from lightning_norm.layers import available_norms

        known = set(available_norms())
        unknown = [v for v in variants if v not in known]
        if unknown:
            raise ConfigurationError(f"Unknown variant(s) {unknown}; choose from {sorted(known)}.")
        if vgg and self.dataset == "cifar10":
            import importlib.util

            if importlib.util.find_spec("torchvision") is None:
                CIFAR10DataModule._torchvision()  # raises the error that says how to fix it
        if len(set(variants)) != len(variants):
            raise ConfigurationError(f"Variants repeat: {list(variants)}.")
        return replace(
            self,
            steps=steps,
            lr=lr,
            variants=variants,
            monitor_every=monitor_every,
            probe_every=self.probe_every or max(1, steps // 25),
            val_every=self.val_every or max(1, steps // 10),
        )


def _optional_callback(name: str, **kwargs: Any) -> L.Callback | None:
    """``lightning_norm.callbacks.<name>(**kwargs)``, or ``None`` with a warning if unavailable."""
    import importlib

    try:
        cls = getattr(importlib.import_module("lightning_norm.callbacks"), name)
    except (ImportError, AttributeError) as err:
        warnings.warn(
            f"lightning_norm.callbacks.{name} is not available ({err}); its figures will be "
            "missing from the report.",
            stacklevel=3,
        )
        return None
    return cls(**kwargs)


def spread(names: Sequence[str], k: int) -> list[str]:
    """At most ``k`` of ``names``, evenly spaced from the first to the last."""
    names = list(names)
    if len(names) <= k:
        return names
    return [names[round(i * (len(names) - 1) / (k - 1))] for i in range(k)]


def monitor_callbacks(cfg: ReproduceConfig, module: L.LightningModule) -> list[L.Callback]:
    """The measurement callbacks for one fit of ``module`` (see the module docstring).

    VGG: every normalization slot and every Conv/Linear layer. DLN: its 24 slots and 25 layers
    would log ~800 scalars a step, so 4 slots and 4 layers spread over the depth are measured
    (for ICS the first layer is left out: nothing precedes it, so its drift is zero).
    """
    from lightning_norm.selection import LayerSelection

    vgg = cfg.setup == "vgg"
    slot_names = list(module.norm_slots) if vgg else spread(module.norm_slots, 4)
    if vgg:
        weights = LayerSelection(types=(nn.Conv2d, nn.Linear))
    else:
        chosen = spread(module.linear_layers[1:], 4)
        weights = LayerSelection(types=(nn.Linear,), include=chosen)
    # outermost=False: with types=(nn.Module,) the root itself matches and would hide the slots
    slots = LayerSelection(types=(nn.Module,), include=slot_names, outermost=False)
    callbacks = [
        _optional_callback(
            "ActivationMoments",
            layers=slots,
            every_n_steps=cfg.monitor_every,
            num_units=4,
            seed=cfg.seed,
        ),
        _optional_callback(
            "GradientNorms", every_n_steps=cfg.monitor_every, layers=None if vgg else weights
        ),
        _optional_callback("ICSDrift", layers=weights, every_n_steps=cfg.probe_every),
        _optional_callback(
            "LossLandscape",
            every_n_steps=cfg.probe_every,
            eta_range=(0.5, 4.0) if vgg else (0.01, 30.0),
            spacing="linear" if vgg else "log",
            hessian=cfg.hessian,
        ),
    ]
    return [c for c in callbacks if c is not None]


def _datamodule(cfg: ReproduceConfig) -> L.LightningDataModule:
    if cfg.setup == "dln":
        return DLNDataModule(seed=cfg.seed)
    if cfg.dataset == "cifar10":
        return CIFAR10DataModule(
            cfg.data_dir, cfg.download, cfg.batch_size, cfg.num_workers, cfg.seed
        )
    return DigitsDataModule(cfg.batch_size, size=cfg.image_size, seed=cfg.seed)


def _module(cfg: ReproduceConfig, variant: str, dm: L.LightningDataModule) -> L.LightningModule:
    if cfg.setup == "dln":
        return DLNRegression(norm=variant, depth=cfg.depth, lr=cfg.lr)
    return S18Classifier(
        norm=variant,
        arch=cfg.arch,
        width=cfg.width,
        num_classes=dm.num_classes,
        in_channels=dm.in_channels,
        lr=cfg.lr,
    )


def _loggers(cfg: ReproduceConfig, variant: str) -> list[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    run_dir = Path(cfg.logdir) / cfg.setup / variant
    if run_dir.is_dir() and any(run_dir.glob("events.out.tfevents.*")):
        # a previous reproduce run of this variant: replace it rather than mixing two runs
        shutil.rmtree(run_dir)
    loggers: list[Any] = [
        TensorBoardLogger(cfg.logdir, name=cfg.setup, version=variant, default_hp_metric=False)
    ]
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ImportError as err:
            raise ConfigurationError(
                "--wandb needs wandb: `pip install 'lightning_norm[wandb]'`."
            ) from err
        loggers.append(
            WandbLogger(
                name=variant,
                save_dir=cfg.logdir,
                offline=True,
                project="lightning_norm-s18",
                group=cfg.setup,
                job_type=cfg.setup,
                config={"norm": variant, "setup": cfg.setup},
            )
        )
    return loggers


@dataclass
class VariantResult:
    """One finished fit: where it logged and how long it took (seconds, wall clock)."""

    setup: str
    variant: str
    log_dir: str
    seconds: float


def run_comparison(cfg: ReproduceConfig, jobs: int = 1) -> list[VariantResult]:
    """Train every variant of ``cfg.setup`` and return where each logged.

    Args:
        cfg: the comparison.
        jobs: fits run at once, each in its own process (see :func:`run_many`).

    Raises:
        ConfigurationError: bad settings (see :meth:`ReproduceConfig.resolved`), CIFAR-10 or
            wandb requested but unavailable.

    Example::

        run_comparison(ReproduceConfig(setup="vgg", variants=["none", "batchnorm"], steps=50))
    """
    return run_many([cfg], jobs=jobs)


def default_jobs() -> int:
    """Fits to run at once by default: 2 on a CPU-only machine with >= 2 cores, else 1.

    The S18 default nets are small enough that one thread per fit is fastest, so two fits side
    by side use a 2-core machine fully; on a GPU one fit at a time keeps timings comparable.
    """
    if torch.cuda.is_available():
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run_many(configs: Sequence[ReproduceConfig], jobs: int = 1) -> list[VariantResult]:
    """Train every variant of every config; ``jobs > 1`` runs that many fits at once.

    Each fit seeds itself (``cfg.seed``), so the logs do not depend on ``jobs``. With
    ``jobs > 1`` the fits run in spawned worker processes, each with its own Lightning
    progress bar turned off; one progress bar here counts the steps of all fits.

    Raises:
        ConfigurationError: bad settings, checked for every config before anything trains.
    """
    cfgs = [c.resolved() for c in configs]
    tasks = [(c, v) for c in cfgs for v in c.variants]
    if jobs < 1:
        raise ConfigurationError(f"jobs must be >= 1, got {jobs}.")
    if jobs == 1 or len(tasks) == 1:
        return [_fit_variant(c, v, None) for c, v in tasks]
    return _run_parallel(tasks, jobs)


def _run_parallel(tasks: list[tuple[ReproduceConfig, str]], jobs: int) -> list[VariantResult]:
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    ctx = mp.get_context("spawn")  # fork after torch/Lightning imports is not safe
    total = sum(c.steps for c, _ in tasks)
    results: dict[int, VariantResult] = {}
    with ctx.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        steps_done = manager.Queue()
        futures = {
            pool.submit(_fit_variant, c, v, steps_done if c.progress else None): k
            for k, (c, v) in enumerate(tasks)
        }
        show = any(c.progress for c, _ in tasks)
        bar = tqdm(total=total, desc=f"{len(tasks)} fits, {jobs} at a time", disable=not show)
        pending = set(futures)
        try:
            while pending:
                with contextlib.suppress(queue_mod.Empty):
                    bar.update(steps_done.get(timeout=0.2))
                for fut in [f for f in pending if f.done()]:
                    pending.discard(fut)
                    res = fut.result()  # re-raises a worker's error here
                    results[futures[fut]] = res
                    c, v = tasks[futures[fut]]
                    tag = f"[{c.setup} {list(c.variants).index(v) + 1}/{len(c.variants)}] {v}"
                    bar.write(f"{tag} done in {res.seconds:.1f}s")
        finally:
            for fut in pending:
                fut.cancel()
            bar.close()
    return [results[k] for k in range(len(tasks))]


class _StepReporter(L.Callback):
    """Sends the number of finished steps to the parent's progress bar (every 10 steps)."""

    def __init__(self, steps_done: Any) -> None:
        self.steps_done, self.pending = steps_done, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.pending += 1
        if self.pending >= 10:
            self.steps_done.put(self.pending)
            self.pending = 0

    def on_train_end(self, trainer, pl_module) -> None:
        if self.pending:
            self.steps_done.put(self.pending)
            self.pending = 0


def _fit_variant(cfg: ReproduceConfig, variant: str, steps_done: Any) -> VariantResult:
    """One fit of one variant (in this process or a worker)."""
    if steps_done is not None:
        # a worker's chatter would break the parent's progress bar; warnings still show
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
        os.environ.setdefault("WANDB_SILENT", "true")
        warnings.filterwarnings("ignore", message=".*treespec.*")
    threads = cfg.threads
    if threads is None and (cfg.setup == "dln" or cfg.dataset == "digits"):
        threads = 1
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(cfg, variant, steps_done)
    finally:
        torch.set_num_threads(previous)


def _fit(cfg: ReproduceConfig, variant: str, steps_done: Any) -> VariantResult:
    i = list(cfg.variants).index(variant)
    tag = f"[{cfg.setup} {i + 1}/{len(cfg.variants)}] {variant}"
    if steps_done is None:
        print(f"{tag}: {cfg.steps} steps, lr {cfg.lr:g}", flush=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = _datamodule(cfg)
    module = _module(cfg, variant, dm)
    loggers = _loggers(cfg, variant)
    callbacks = monitor_callbacks(cfg, module) if cfg.monitors else []
    if steps_done is not None:
        callbacks.append(_StepReporter(steps_done))
    trainer = L.Trainer(
        max_steps=cfg.steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        logger=loggers,
        callbacks=[*callbacks, *cfg.extra_callbacks],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress and steps_done is None,
        num_sanity_val_steps=0,
        val_check_interval=cfg.val_every if cfg.setup == "vgg" else None,
        check_val_every_n_epoch=None if cfg.setup == "vgg" else 1,
        limit_val_batches=None if cfg.setup == "vgg" else 0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()
    if steps_done is None:
        print(f"{tag} done in {seconds:.1f}s", flush=True)
    return VariantResult(cfg.setup, variant, loggers[0].log_dir, seconds)
