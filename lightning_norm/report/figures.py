"""S18's figures drawn from logged runs (see :mod:`lightning_norm.report.reader`).

Each ``fig_*`` function takes the runs of one comparison (one group) and returns a
:class:`Figure`: a matplotlib figure (or ``None`` when no run has what it needs) and messages
naming what is missing, so the report draws what it can and says what it could not.

Which logged names each figure reads:

- ``fig_training`` (S18 Fig. 1a): ``train/acc`` (else ``train/loss``), ``train/loss``,
  ``val/acc``.
- ``fig_activations`` (Fig. 1b / 2): ``activation/<layer>/unit<j>_p15|_p50|_p85`` of the
  lowest sampled unit ``j`` (else the layer-wide ``p15|p50|p85``), for an early and a late layer.
- ``fig_ics`` (Fig. 3): ``ics/<layer>/l2`` and ``ics/<layer>/cosine``.
- ``fig_landscape`` (Fig. 4): ``landscape/total/loss_min|loss_max``, ``grad_pred_mean|
  grad_pred_max``, ``beta_eff``, and the curves ``curve_eta_<i>``/``curve_loss_<i>``.
- ``fig_lp`` (Fig. 5): ``train/acc`` and ``train/loss`` of the Lp variants, BN and standard.
- ``fig_moments`` (Fig. 8): ``activation/<layer>/delta_mean`` and ``delta_var``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_norm.report.reader import Run

#: Display name and colour per variant, in the order the report draws them.
VARIANT_STYLE: dict[str, tuple[str, str]] = {
    "none": ("standard", "tab:gray"),
    "batchnorm": ("BN", "tab:blue"),
    "noisy_bn": ("noisy BN", "tab:orange"),
    "lp1": ("L1", "tab:green"),
    "lp2": ("L2", "tab:red"),
    "lpinf": ("L∞", "tab:purple"),
    "layernorm": ("LayerNorm", "tab:brown"),
    "groupnorm": ("GroupNorm", "tab:pink"),
}
_EXTRA_COLOURS = ("tab:olive", "tab:cyan", "black", "gold", "navy", "lime")
LP_VARIANTS = ("none", "batchnorm", "lp1", "lp2", "lpinf")


@dataclass
class Figure:
    """A drawn figure (or ``None``) with its file stem, title, caption and missing-data notes."""

    key: str
    title: str
    caption: str
    figure: Any | None
    messages: list[str] = field(default_factory=list)


def order_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs in the canonical variant order (standard, BN, noisy BN, Lp, ...), others after."""
    rank = {v: i for i, v in enumerate(VARIANT_STYLE)}
    return sorted(runs, key=lambda r: (rank.get(r.variant, len(rank)), r.variant, r.name))


def label(run: Run) -> str:
    return VARIANT_STYLE.get(run.variant, (run.variant, ""))[0]


def colour(run: Run, runs: Sequence[Run]) -> str:
    if run.variant in VARIANT_STYLE:
        return VARIANT_STYLE[run.variant][1]
    others = [r.variant for r in order_runs(runs) if r.variant not in VARIANT_STYLE]
    return _EXTRA_COLOURS[others.index(run.variant) % len(_EXTRA_COLOURS)]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    if window <= 1 or len(values) == 0:
        return values
    c = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _logy(ax: Any) -> None:
    """Log y-axis when the drawn data allow it (a series of zeros stays linear, no warning)."""
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.lines]
    ys += [np.asarray(c.get_paths()[0].vertices[:, 1]) for c in ax.collections if c.get_paths()]
    if any((y[np.isfinite(y)] > 0).any() for y in ys if len(y)):
        ax.set_yscale("log")


def _window(steps: np.ndarray) -> int:
    return max(1, len(steps) // 40)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def layers_with(runs: Sequence[Run], group: str, metric: str) -> list[str]:
    """Layers ``L`` with ``<group>/L/<metric>`` logged by every run that logged the group."""
    pat = re.compile(rf"^{re.escape(group)}/(.+)/{re.escape(metric)}$")
    per_run = []
    for run in runs:
        found = {m.group(1) for t in run.scalars if (m := pat.match(t))}
        if found:
            per_run.append(found)
    if not per_run:
        return []
    # heads without an index (``classifier``) run last in S18's nets, so they sort last
    return sorted(
        set.intersection(*per_run),
        key=lambda n: (not any(c.isdigit() for c in n), _natural_key(n)),
    )


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _pick(layers: list[str], k: int) -> list[str]:
    """``k`` layers spread from first to last (S18 shows an early and a late layer)."""
    if len(layers) <= k:
        return layers
    idx = np.linspace(0, len(layers) - 1, k).round().astype(int)
    return [layers[i] for i in dict.fromkeys(idx)]


def _skipped(key: str, title: str, caption: str, message: str) -> Figure:
    """A figure that could not be drawn: no picture, one message saying what to log."""
    return Figure(key, title, caption, None, [message])


def _finish(fig: Any, group: str, title: str) -> None:
    fig.suptitle(f"{group}: {title}", fontsize=10)
    fig.tight_layout()


def _missing(runs: Sequence[Run], tags: Sequence[str], what: str) -> list[str]:
    lacking = [label(r) for r in runs if not any(r.has(t) for t in tags)]
    if lacking and len(lacking) < len(runs):
        return [f"{what}: no data for {', '.join(lacking)}."]
    return []


def fig_training(runs: Sequence[Run], group: str) -> Figure:
    """S18 Fig. 1a: training accuracy (and loss, validation accuracy) per variant."""
    runs = order_runs(runs)
    title = "Training speed per variant (S18 Fig. 1a)"
    caption = (
        "Training-batch accuracy and loss (moving average) and validation accuracy per "
        "normalization variant, against the optimizer step."
    )
    has_acc = [r for r in runs if r.has("train/acc")]
    has_loss = [r for r in runs if r.has("train/loss")]
    if not has_acc and not has_loss:
        return _skipped(
            "fig1_training",
            title,
            caption,
            f"Fig. 1a skipped for {group!r}: no run logged train/acc or train/loss "
            "(log them from the LightningModule, as lightning_norm.experiments does).",
        )
    panels = []
    if has_acc:
        panels.append(("train/acc", "train accuracy", False))
    if has_loss:
        panels.append(("train/loss", "train loss", True))
    if any(r.has("val/acc") for r in runs):
        panels.append(("val/acc", "validation accuracy", False))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (tag, name, logy) in zip(axes[0], panels, strict=True):
        for run in runs:
            if not run.has(tag):
                continue
            s, v = run.get(tag)
            ys = smooth(v, _window(s)) if tag.startswith("train/") else v
            ax.plot(
                s,
                ys,
                label=label(run),
                color=colour(run, runs),
                lw=1.4,
                marker="o" if tag.startswith("val/") else None,
                ms=3,
            )
        ax.set_xlabel("step")
        ax.set_title(name)
        if logy:
            _logy(ax)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _finish(fig, group, title)
    return Figure(
        "fig1_training", title, caption, fig, _missing(runs, ["train/acc", "train/loss"], "Fig. 1a")
    )


def _unit_of(run: Run, layer: str) -> str | None:
    pat = re.compile(rf"^activation/{re.escape(layer)}/unit(\d+)_p50$")
    units = sorted(int(m.group(1)) for t in run.scalars if (m := pat.match(t)))
    return f"unit{units[0]}_" if units else None


def fig_activations(runs: Sequence[Run], group: str) -> Figure:
    """S18 Fig. 1b/2: a sampled unit's activation percentiles over training, per variant."""
    runs = order_runs(runs)
    title = "Activation distributions over training (S18 Fig. 1b / 2)"
    caption = (
        "15th–85th percentile band and median of one sampled unit (channel) of an early and a "
        "late normalization slot, over training; one column per variant. Wide, drifting bands "
        "mean unstable layer-input distributions (noisy BN makes them so on purpose)."
    )
    layers = layers_with(runs, "activation", "p50")
    if not layers:
        return _skipped(
            "fig2_activations",
            title,
            caption,
            f"Fig. 1b/2 skipped for {group!r}: no run logged activation/<layer>/p50 or "
            "unit<j>_p50 (attach lightning_norm.callbacks.ActivationMoments).",
        )
    chosen = _pick(layers, 2)
    shown = [r for r in runs if any(r.has(f"activation/{lay}/p50") for lay in chosen)]
    plt = _plt()
    fig, axes = plt.subplots(
        len(chosen),
        len(shown),
        figsize=(2.6 * len(shown) + 0.6, 2.4 * len(chosen)),
        squeeze=False,
        sharex=True,
    )
    notes = []
    for i, layer in enumerate(chosen):
        for j, run in enumerate(shown):
            ax = axes[i][j]
            unit = _unit_of(run, layer)
            prefix = f"activation/{layer}/{unit or ''}"
            if unit is None:
                notes.append(f"{label(run)} {layer}: no sampled units, layer-wide percentiles.")
            s15, p15 = run.get(prefix + "p15")
            s50, p50 = run.get(prefix + "p50")
            s85, p85 = run.get(prefix + "p85")
            c = colour(run, runs)
            if len(s15) == len(s85) == len(s50) and len(s50):
                ax.fill_between(s50, p15, p85, color=c, alpha=0.3, lw=0)
            ax.plot(s50, p50, color=c, lw=1.2)
            if i == 0:
                ax.set_title(label(run), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{layer}\n{(unit or 'layer ').rstrip('_')}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    _finish(fig, group, title)
    msgs = _missing(runs, [f"activation/{chosen[0]}/p50"], "Fig. 1b/2") + notes[:2]
    return Figure("fig2_activations", title, caption, fig, msgs)


def fig_ics(runs: Sequence[Run], group: str) -> Figure:
    """S18 Fig. 3: ICS as gradient drift, l2 difference and cosine, per variant."""
    runs = order_runs(runs)
    title = "Internal covariate shift as gradient drift (S18 Fig. 3)"
    caption = (
        "||G − G'||₂ and cos(G, G') (S18 Definition 2.1) for layers from first to last, per "
        "variant; ideal is 0 and 1. S18 finds BN does not lower it (and raises it in the DLN)."
    )
    layers = layers_with(runs, "ics", "l2")
    if not layers:
        return _skipped(
            "fig3_ics",
            title,
            caption,
            f"Fig. 3 skipped for {group!r}: no run logged ics/<layer>/l2 and cosine "
            "(attach lightning_norm.callbacks.ICSDrift).",
        )
    chosen = _pick(layers, 3)
    plt = _plt()
    fig, axes = plt.subplots(2, len(chosen), figsize=(3.8 * len(chosen), 5.6), squeeze=False)
    for j, layer in enumerate(chosen):
        for i, metric in enumerate(("l2", "cosine")):
            ax = axes[i][j]
            for run in runs:
                tag = f"ics/{layer}/{metric}"
                if run.has(tag):
                    s, v = run.get(tag)
                    ax.plot(
                        s, v, label=label(run), color=colour(run, runs), lw=1.2, marker=".", ms=3
                    )
            ax.set_title(f"{layer}: {'‖G−G′‖₂' if metric == 'l2' else 'cos(G, G′)'}", fontsize=9)
            if metric == "l2":
                _logy(ax)
            ax.grid(alpha=0.3)
            ax.set_xlabel("step", fontsize=8)
    axes[0][0].legend(fontsize=7)
    _finish(fig, group, title)
    return Figure(
        "fig3_ics", title, caption, fig, _missing(runs, [f"ics/{chosen[0]}/l2"], "Fig. 3")
    )


def _curves(run: Run) -> tuple[int, np.ndarray, np.ndarray] | None:
    """The loss(eta) curve of the last probe: ``(step, etas, losses)``."""
    idx = sorted(
        int(m.group(1))
        for t in run.scalars
        if (m := re.match(r"^landscape/total/curve_eta_(\d+)$", t))
    )
    if not idx:
        return None
    steps = run.get(f"landscape/total/curve_eta_{idx[0]}")[0]
    if len(steps) == 0:
        return None
    step = steps[-1]
    etas, losses = [], []
    for i in idx:
        se, e = run.get(f"landscape/total/curve_eta_{i}")
        sl, lo = run.get(f"landscape/total/curve_loss_{i}")
        if step in se and step in sl:
            etas.append(e[list(se).index(step)])
            losses.append(lo[list(sl).index(step)])
    return int(step), np.array(etas), np.array(losses)


def fig_landscape(runs: Sequence[Run], group: str) -> Figure:
    """S18 Fig. 4: loss variation, gradient predictiveness and effective beta per variant."""
    runs = order_runs(runs)
    title = "Loss landscape along the gradient (S18 Fig. 4)"
    caption = (
        "(a) band between the lowest and highest loss L(w − ηg) over the step-size grid; "
        "(b) gradient predictiveness ‖∇L(w) − ∇L(w − ηg)‖₂, mean (line) to max (band top); "
        "(c) effective β-smoothness max ‖∇L(w) − ∇L(w − ηg)‖ / ‖ηg‖; (d) loss along the "
        "gradient at the last probe. S18: all smaller with BN."
    )
    base = "landscape/total/"
    shown = [r for r in runs if r.has(base + "loss_min") or r.has(base + "beta_eff")]
    if not shown:
        return _skipped(
            "fig4_landscape",
            title,
            caption,
            f"Fig. 4 skipped for {group!r}: no run logged landscape/total/loss_min, "
            "grad_pred_max or beta_eff (attach lightning_norm.callbacks.LossLandscape).",
        )
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for run in shown:
        c, lab = colour(run, runs), label(run)
        s0, lo = run.get(base + "loss_min")
        s1, hi = run.get(base + "loss_max")
        if len(s0) and len(s0) == len(s1):
            axes[0].fill_between(s0, lo, hi, color=c, alpha=0.35, lw=0, label=lab)
        s2, gm = run.get(base + "grad_pred_mean")
        s3, gx = run.get(base + "grad_pred_max")
        if len(s3):
            axes[1].plot(s3, gx, color=c, lw=1.2, label=lab)
            if len(s2) == len(s3):
                axes[1].fill_between(s3, gm, gx, color=c, alpha=0.25, lw=0)
        s4, be = run.get(base + "beta_eff")
        if len(s4):
            axes[2].plot(s4, be, color=c, lw=1.2, marker=".", ms=3, label=lab)
        curve = _curves(run)
        if curve is not None:
            step, etas, losses = curve
            axes[3].plot(etas, losses, color=c, marker=".", lw=1.2, label=f"{lab} (step {step})")
    for ax, name in zip(
        axes,
        ("loss range", "gradient predictiveness", "effective β", "loss along −g"),
        strict=True,
    ):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("η" if name.startswith("loss along") else "step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[:3]:
        _logy(ax)
    axes[0].legend(fontsize=7)
    if axes[3].lines:
        axes[3].legend(fontsize=6)
    _finish(fig, group, title)
    msgs = _missing(runs, [base + "loss_min", base + "beta_eff"], "Fig. 4")
    if not any(_curves(r) for r in shown):
        msgs.append("Fig. 4d: no landscape/total/curve_eta_<i> / curve_loss_<i> logged.")
    return Figure("fig4_landscape", title, caption, fig, msgs)


def fig_lp(runs: Sequence[Run], group: str) -> Figure:
    """S18 Fig. 5: training curves of the Lp normalizations next to BN and standard."""
    runs = order_runs(runs)
    title = "Lp normalizations vs BN (S18 Fig. 5)"
    caption = (
        "Training accuracy and loss (moving average) of L1, L2 and L∞ normalization, which "
        "fix the mean but not the variance, next to BN and the standard network."
    )
    shown = [r for r in runs if r.variant in LP_VARIANTS]
    if not any(r.variant.startswith("lp") for r in shown):
        return _skipped(
            "fig5_lp",
            title,
            caption,
            f"Fig. 5 skipped for {group!r}: no Lp variant (lp1, lp2, lpinf) among the runs.",
        )
    tags = [t for t in ("train/acc", "train/loss") if any(r.has(t) for r in shown)]
    if not tags:
        return _skipped(
            "fig5_lp",
            title,
            caption,
            f"Fig. 5 skipped for {group!r}: no train/acc or train/loss logged.",
        )
    plt = _plt()
    fig, axes = plt.subplots(1, len(tags), figsize=(4.6 * len(tags), 3.4), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        for run in shown:
            if run.has(tag):
                s, v = run.get(tag)
                ax.plot(
                    s,
                    smooth(v, _window(s)),
                    color=colour(run, runs),
                    label=label(run),
                    lw=1.4,
                    ls="--" if run.variant in ("none", "batchnorm") else "-",
                )
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        if tag.endswith("loss"):
            _logy(ax)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _finish(fig, group, title)
    return Figure("fig5_lp", title, caption, fig, [])


def fig_moments(runs: Sequence[Run], group: str) -> Figure:
    """S18 Fig. 8: change of the sampled units' mean and variance between successive steps."""
    runs = order_runs(runs)
    title = "Distributional stability: moment changes between steps (S18 Fig. 8)"
    caption = (
        "delta_mean and delta_var of an early and a late normalization slot (as defined by "
        "ActivationMoments: change of the sampled units' mean and variance from one step to "
        "the next), per variant. S18: far larger with noisy BN."
    )
    layers = layers_with(runs, "activation", "delta_mean")
    if not layers:
        return _skipped(
            "fig8_moments",
            title,
            caption,
            f"Fig. 8 skipped for {group!r}: no run logged activation/<layer>/delta_mean "
            "(attach lightning_norm.callbacks.ActivationMoments).",
        )
    chosen = _pick(layers, 2)
    plt = _plt()
    fig, axes = plt.subplots(len(chosen), 2, figsize=(9, 2.9 * len(chosen)), squeeze=False)
    for i, layer in enumerate(chosen):
        for j, metric in enumerate(("delta_mean", "delta_var")):
            ax = axes[i][j]
            for run in runs:
                tag = f"activation/{layer}/{metric}"
                if run.has(tag):
                    s, v = run.get(tag)
                    ax.plot(
                        s, smooth(v, _window(s)), color=colour(run, runs), label=label(run), lw=1.2
                    )
            ax.set_title(f"{layer}: {metric}", fontsize=9)
            _logy(ax)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _finish(fig, group, title)
    return Figure(
        "fig8_moments",
        title,
        caption,
        fig,
        _missing(runs, [f"activation/{chosen[0]}/delta_mean"], "Fig. 8"),
    )


FIGURES = (fig_training, fig_activations, fig_ics, fig_landscape, fig_lp, fig_moments)
