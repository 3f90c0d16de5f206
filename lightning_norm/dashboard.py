"""Dashboards built from the names that pass through :class:`~lightning_norm.sink.LogSink`.

Every scalar lightning_norm logs is named ``<group>/<layer>/<metric>`` (or ``<group>/<layer>``
for one-number-per-layer groups such as ``grad_norm``). :func:`observe` is called by
``LogSink.log_scalars`` with those names and, whenever a group, layer or metric appears for the
first time, (re)writes for each attached logger:

- **TensorBoard**: a custom-scalars layout (the "Custom Scalars" tab) with one category per
  group. In a category: one multi-line chart per metric holding every layer
  (``^activation/[^/]+/std$``), and one per layer holding that layer's metrics
  (``^activation/net\\.features\\.1/(mean|p15|...)$``); indexed families (sampled units
  ``unit<j>_<stat>``, landscape curve points ``curve_eta_<i>``/``curve_loss_<i>``) get one
  per-layer chart each, so they do not swamp the summaries.
  Two-part groups get one chart with every layer. TensorBoard reads the last layout a run wrote
  and merges the layouts of all runs in a log directory, so runs compared side by side share
  one dashboard.
- **W&B**: ``define_metric("<group>/*", step_metric="trainer/global_step")`` for each group, so
  every chart's x-axis is the Trainer's step (Lightning's ``WandbLogger`` defines ``"*"`` the
  same way when it creates the run; this also covers runs the user created with
  ``wandb.init``). Sections come from the first name component, so scalars, histograms
  (``activation/<layer>/hist``) and figures (``landscape/total/slice_1d``) of a group share a
  section. Grouping runs of one comparison is the run's ``group=`` (``WandbLogger(group=...)``;
  ``lightning-norm reproduce`` sets it).

Plain Python plus duck typing on the loggers (no Lightning import); the layout is written on
rank zero only.

Example::

    from lightning_norm.dashboard import tensorboard_layout
    tensorboard_layout(["grad_norm/total", "activation/features.1/std"])
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

#: The W&B step metric every lightning_norm metric is plotted against.
WANDB_STEP_METRIC = "trainer/global_step"

#: Indexed families of metrics: sampled units (``unit<j>_<stat>``) and the loss(eta) curve points
#: of a landscape probe (``curve_eta_<i>``, ``curve_loss_<i>``). Each family gets one chart per
#: layer instead of one chart per member.
_FAMILIES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("sampled units", re.compile(r"^unit\d+_.+$"), r"unit\d+_.+"),
    ("curve_eta_<i>", re.compile(r"^curve_eta_\d+$"), r"curve_eta_\d+"),
    ("curve_loss_<i>", re.compile(r"^curve_loss_\d+$"), r"curve_loss_\d+"),
)


def _family(metric: str | None) -> int | None:
    if metric is None:
        return None
    for i, (_, pattern, _) in enumerate(_FAMILIES):
        if pattern.match(metric):
            return i
    return None


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _split(name: str) -> tuple[str, str, str | None] | None:
    """``(group, layer, metric)`` of a logged name; metric ``None`` for two-part names.

    Layer names may contain dots but not slashes (qualified module names), so the first and the
    last component are the group and the metric.
    """
    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1], None
    if len(parts) >= 3 and all(parts):
        return parts[0], "/".join(parts[1:-1]), parts[-1]
    return None


def tensorboard_layout(names: Iterable[str]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout for ``names``, in ``SummaryWriter.add_custom_scalars`` form.

    Returns ``{category: {chart title: ["Multiline", [tag regexes]]}}``; categories and charts
    are sorted so that the same names always give the same layout.

    Example::

        tensorboard_layout(["ics/features.0/l2", "ics/features.3/l2"])
        # {"ics": {"ics · l2 (all layers)": ["Multiline", ["^ics/[^/]+/l2$"]],
        #          "ics · features.0": ["Multiline", ["^ics/features\\.0/(l2)$"]], ...}}
    """
    groups: dict[str, dict[str, set[str]]] = {}
    flat: dict[str, set[str]] = {}
    for name in names:
        parsed = _split(name)
        if parsed is None:
            continue
        group, layer, metric = parsed
        if metric is None:
            flat.setdefault(group, set()).add(layer)
        else:
            groups.setdefault(group, {}).setdefault(layer, set()).add(metric)
    layout: dict[str, dict[str, list[Any]]] = {}
    for group in sorted(flat):
        g = re.escape(group)
        layout.setdefault(group, {})[f"{group} (all layers)"] = ["Multiline", [rf"^{g}/[^/]+$"]]
    for group in sorted(groups):
        g = re.escape(group)
        charts = layout.setdefault(group, {})
        metrics = sorted({m for ms in groups[group].values() for m in ms if _family(m) is None})
        for metric in metrics:
            charts[f"{group} · {metric} (all layers)"] = [
                "Multiline",
                [rf"^{g}/.+/{re.escape(metric)}$"],
            ]
        for layer in sorted(groups[group]):
            lay = re.escape(layer)
            own = sorted(m for m in groups[group][layer] if _family(m) is None)
            if own:
                alt = "|".join(re.escape(m) for m in own)
                charts[f"{group} · {layer}"] = ["Multiline", [rf"^{g}/{lay}/({alt})$"]]
            present = {_family(m) for m in groups[group][layer]} - {None}
            for i in sorted(present):
                title, _, regex = _FAMILIES[i]
                charts[f"{group} · {layer} · {title}"] = ["Multiline", [rf"^{g}/{lay}/{regex}$"]]
    return layout


class _Dashboard:
    """What one logger has been shown so far, and the writes that keep its dashboard current."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.keys: set[tuple[str, str, str]] = set()
        self.wandb_groups: set[str] = set()

    def observe(self, logger: Any, names: Iterable[str]) -> None:
        new_keys = set()
        for name in names:
            if name in self.names:
                continue
            parsed = _split(name)
            if parsed is None:
                continue
            self.names.add(name)
            group, layer, metric = parsed
            # a new member of a family (unit, curve point) changes no regex: no rewrite
            fam = _family(metric)
            kind = f"family{fam}" if fam is not None else (metric or "")
            key = (group, layer, kind)
            if key not in self.keys:
                new_keys.add(key)
        if not new_keys:
            return
        self.keys |= new_keys
        kind = _logger_kind(logger)
        if kind == "tensorboard":
            writer = logger.experiment
            if hasattr(writer, "add_custom_scalars"):
                writer.add_custom_scalars(tensorboard_layout(self.names))
        elif kind == "wandb":
            run = logger.experiment
            define = getattr(run, "define_metric", None)
            if define is None:
                return
            if not self.wandb_groups:
                define(WANDB_STEP_METRIC)
            for group in sorted({k[0] for k in new_keys} - self.wandb_groups):
                define(f"{group}/*", step_metric=WANDB_STEP_METRIC)
                self.wandb_groups.add(group)


def _logger_kind(logger: Any) -> str:
    from lightning_norm.sink import _kind

    return _kind(logger)


_DASHBOARDS: weakref.WeakKeyDictionary[Any, _Dashboard] = weakref.WeakKeyDictionary()
_FALLBACK: dict[int, _Dashboard] = {}


def _dashboard_for(logger: Any) -> _Dashboard:
    try:
        return _DASHBOARDS.setdefault(logger, _Dashboard())
    except TypeError:  # a logger that cannot be weakly referenced
        return _FALLBACK.setdefault(id(logger), _Dashboard())


def observe(loggers: Sequence[Any], names: Iterable[str]) -> None:
    """Keep each logger's dashboard in step with ``names`` (called by ``LogSink.log_scalars``).

    Cheap when nothing is new (a set lookup per name); writes a layout only when a group, layer
    or metric appears for the first time. Never raises: a dashboard is a convenience and must
    not stop training, so a failing write is logged and skipped.

    Args:
        loggers: the attached loggers (``trainer.loggers``).
        names: the scalar names just logged.
    """
    if _rank() != 0:
        return
    names = list(names)
    for logger in loggers:
        try:
            _dashboard_for(logger).observe(logger, names)
        except Exception as err:  # never break training for a dashboard
            import logging

            logging.getLogger(__name__).warning(
                "lightning_norm could not update the %s dashboard: %s", type(logger).__name__, err
            )
