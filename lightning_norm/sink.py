"""One place where measurements leave the process: scalars, histograms and figures.

Plain PyTorch plus duck typing on the logger objects, so the core needs no Lightning import. Given
``trainer.loggers``, it writes scalars through every logger's ``log_metrics``, histograms and
figures through TensorBoard (``SummaryWriter``) and W&B (``wandb.Histogram`` / ``wandb.Image``),
and tells the user once when an attached logger cannot take histograms or figures (CSVLogger).

Lightning's loggers already write on rank zero only (``log_metrics`` is ``rank_zero_only``), so
the sink does not re-implement that; callers make sure every rank holds the same values (the
reductions in :mod:`lightning_norm.stats` do).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_norm import dashboard as _dashboard

log = logging.getLogger(__name__)

#: The W&B step metric the sink logs against (Lightning's WandbLogger uses the same key).
WANDB_STEP_METRIC = "trainer/global_step"


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _kind(logger: Any) -> str:
    """``"tensorboard"``, ``"wandb"`` or ``"other"``, without importing the logger packages."""
    name = type(logger).__name__
    if name == "TensorBoardLogger" or hasattr(
        getattr(logger, "_experiment", None), "add_histogram"
    ):
        return "tensorboard"
    if name == "WandbLogger":
        return "wandb"
    return "other"


@dataclass(frozen=True)
class Histogram:
    """A histogram computed on the tensor's device, moved to the host in one transfer.

    ``counts[i]`` counts values in ``[edges[i], edges[i+1])`` (the last bin is closed); ``num``,
    ``total`` and ``total_sq`` are the count, sum and sum of squares of the finite values, in the
    units of the input. Non-finite values are left out of every field.
    """

    counts: list[float]
    edges: list[float]
    num: float
    total: float
    total_sq: float

    @classmethod
    def from_tensor(cls, values: Tensor, bins: int = 64) -> Histogram:
        x = values.detach().reshape(-1).float()
        x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return cls([0.0] * bins, torch.linspace(0, 1, bins + 1).tolist(), 0.0, 0.0, 0.0)
        lo, hi = x.min(), x.max()
        hi = torch.where(hi > lo, hi, lo + 1e-6)
        edges = torch.linspace(0, 1, bins + 1, device=x.device) * (hi - lo) + lo
        idx = ((x - lo) / (hi - lo) * bins).long().clamp_(0, bins - 1)
        counts = torch.bincount(idx, minlength=bins).float()
        summary = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
        host = torch.cat([counts, edges, summary]).cpu().tolist()
        return cls(
            counts=host[:bins],
            edges=host[bins : 2 * bins + 1],
            num=host[-3],
            total=host[-2],
            total_sq=host[-1],
        )


class LogSink:
    """Writes measurements to every attached logger at ``step`` (``trainer.global_step``).

    Args:
        loggers: the loggers to write to, usually ``trainer.loggers``.

    Example::

        sink = LogSink(trainer.loggers)
        sink.log_scalars({"grad_norm/total": 1.5}, step=trainer.global_step)
    """

    def __init__(self, loggers: Sequence[Any]) -> None:
        self.loggers = list(loggers)
        self._warned: set[tuple[str, str]] = set()

    @property
    def has_histogram_logger(self) -> bool:
        return any(_kind(lg) in ("tensorboard", "wandb") for lg in self.loggers)

    def log_scalars(self, metrics: Mapping[str, float | Tensor], step: int) -> None:
        """Write scalars; tensors are moved to the host together, in one transfer."""
        if not metrics or not self.loggers:
            return
        keys = list(metrics)
        tensors = [k for k in keys if isinstance(metrics[k], Tensor)]
        values: dict[str, float] = {k: float(metrics[k]) for k in keys if k not in tensors}
        if tensors:
            stacked = torch.stack([metrics[k].detach().float().reshape(()) for k in tensors])
            values.update(zip(tensors, stacked.cpu().tolist(), strict=True))
        ordered = {k: values[k] for k in keys}
        _dashboard.observe(self.loggers, keys)  # TB layout / W&B metric definitions
        for logger in self.loggers:
            logger.log_metrics(ordered, step=step)

    def log_histogram(
        self, name: str, values: Tensor | Histogram, step: int, bins: int = 64
    ) -> None:
        """Write a histogram of ``values`` (computed on their device) to TensorBoard and W&B."""
        if not self.loggers:
            return
        hist = values if isinstance(values, Histogram) else Histogram.from_tensor(values, bins)
        if _rank() != 0:
            return
        for logger in self.loggers:
            kind = _kind(logger)
            if kind == "tensorboard":
                logger.experiment.add_histogram_raw(
                    name,
                    min=hist.edges[0],
                    max=hist.edges[-1],
                    num=hist.num,
                    sum=hist.total,
                    sum_squares=hist.total_sq,
                    bucket_limits=hist.edges[1:],
                    bucket_counts=hist.counts,
                    global_step=step,
                )
            elif kind == "wandb":
                import wandb

                logger.experiment.log(
                    {
                        name: wandb.Histogram(np_histogram=(hist.counts, hist.edges)),
                        WANDB_STEP_METRIC: step,
                    }
                )
            else:
                self._notice_once(logger, "histograms")

    def log_figure(self, name: str, figure: Any, step: int, close: bool = True) -> None:
        """Write a matplotlib figure to TensorBoard and W&B, then close it."""
        try:
            if _rank() != 0:
                return
            for logger in self.loggers:
                kind = _kind(logger)
                if kind == "tensorboard":
                    logger.experiment.add_figure(name, figure, global_step=step, close=False)
                elif kind == "wandb":
                    import wandb

                    logger.experiment.log({name: wandb.Image(figure), WANDB_STEP_METRIC: step})
                else:
                    self._notice_once(logger, "figures")
        finally:
            if close:
                import matplotlib.pyplot as plt

                plt.close(figure)

    def _notice_once(self, logger: Any, what: str) -> None:
        key = (type(logger).__name__, what)
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "%s cannot store %s; lightning_norm logs only scalars to it. Attach a "
                "TensorBoardLogger or WandbLogger to see %s.",
                type(logger).__name__,
                what,
                what,
            )
