"""The S18 report: figures and one self-contained HTML page from TensorBoard / W&B logs.

``build_report(logdir, out)`` reads every run under ``logdir``
(:func:`~lightning_norm.report.reader.load_runs`), groups runs by comparison (``vgg``, ``dln``),
and for each group writes S18's figures as PNG files (``<group>_fig1_training.png``, ...), a
``summary.json`` with the numbers behind the findings, and ``report.html`` embedding every PNG as
a base64 data URI (one file to send around). Figures whose data a log lacks are skipped with a
message naming the callback to attach; the rest are drawn.

Command line: ``lightning-norm report LOGDIR [--out DIR]`` or
``python -m lightning_norm.report LOGDIR [--out DIR]``.

Example::

    from lightning_norm.report import build_report
    result = build_report("runs/s18")
    print(result.html)
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_norm.report.figures import FIGURES, Figure, label, order_runs, smooth
from lightning_norm.report.reader import Run, load_runs

__all__ = ["ReportResult", "build_report", "findings", "load_runs", "summarize"]


@dataclass
class ReportResult:
    """What :func:`build_report` wrote: the HTML page, the PNG files, the summary, messages."""

    html: Path
    figures: list[Path] = field(default_factory=list)
    summary: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    findings: dict[str, list[tuple[str, bool, str]]] = field(default_factory=dict)


def _tail_mean(values: np.ndarray, frac: float = 0.1) -> float | None:
    if len(values) == 0:
        return None
    k = max(1, int(len(values) * frac))
    return float(np.mean(values[-k:]))


def _mean_over(run: Run, pattern: str) -> float | None:
    """Mean of every finite value of the tags matching ``pattern`` (``*`` = one layer name)."""
    import re

    rx = re.compile("^" + re.escape(pattern).replace(r"\*", "[^/]+") + "$")
    vals = [run.get(t)[1] for t in run.scalars if rx.match(t)]
    if not vals:
        return None
    allv = np.concatenate(vals)
    allv = allv[np.isfinite(allv)]
    return float(allv.mean()) if len(allv) else None


def _first_step_reaching(run: Run, tag: str, level: float) -> float | None:
    s, v = run.get(tag)
    if len(s) == 0:
        return None
    sm = smooth(v, max(1, len(s) // 40))
    hit = np.nonzero(sm >= level)[0]
    return float(s[hit[0]]) if len(hit) else None


def summarize(run: Run) -> dict[str, float | None]:
    """The headline numbers of one run, as quoted in ``docs/reproduce.md``.

    - ``train_acc_end`` / ``train_loss_end``: mean over the last 10% of logged steps;
      ``train_loss_start``: first logged loss;
    - ``steps_to_90``: first step where the moving-average train accuracy reaches 0.9;
    - ``val_acc_end``: last validation accuracy;
    - ``ics_l2`` / ``ics_cosine``: mean over layers and probes;
    - ``loss_range`` / ``grad_pred_max`` / ``beta_eff``: mean over probes;
    - ``delta_mean`` / ``delta_var``: mean over layers and logged steps.
    """
    s_acc, acc = run.get("train/acc")
    s_loss, loss = run.get("train/loss")
    _, val = run.get("val/acc")
    return {
        "steps": float(max([s_acc.max() if len(s_acc) else 0, s_loss.max() if len(s_loss) else 0])),
        "train_acc_end": _tail_mean(acc),
        "train_loss_start": float(loss[0]) if len(loss) else None,
        "train_loss_end": _tail_mean(loss),
        "steps_to_90": _first_step_reaching(run, "train/acc", 0.9),
        "val_acc_end": float(val[-1]) if len(val) else None,
        "ics_l2": _mean_over(run, "ics/*/l2"),
        "ics_cosine": _mean_over(run, "ics/*/cosine"),
        "loss_range": _mean_over(run, "landscape/total/loss_range"),
        "grad_pred_max": _mean_over(run, "landscape/total/grad_pred_max"),
        "beta_eff": _mean_over(run, "landscape/total/beta_eff"),
        "delta_mean": _mean_over(run, "activation/*/delta_mean"),
        "delta_var": _mean_over(run, "activation/*/delta_var"),
    }


def findings(summary: dict[str, dict[str, float | None]]) -> list[tuple[str, bool, str]]:
    """S18's claims checked against one comparison's summary numbers.

    Args:
        summary: ``{variant: summarize(run)}`` of one group.

    Returns:
        ``(claim, consistent_with_S18, evidence)`` for every claim the logged data can decide;
        claims without the data (e.g. no noisy-BN run) are left out. Speed is "steps to 90% train
        accuracy" when accuracy was logged, else the final training loss.

    Example::

        for claim, ok, evidence in findings({r.variant: summarize(r) for r in runs}):
            print(("consistent: " if ok else "NOT consistent: ") + claim, evidence)
    """
    out: list[tuple[str, bool, str]] = []
    std, bn = summary.get("none"), summary.get("batchnorm")

    def speed(s: dict[str, float | None]) -> tuple[float | None, str]:
        if s.get("train_acc_end") is not None:
            v = s.get("steps_to_90")
            return (float("inf") if v is None else v), "steps to 90% train acc"
        return s.get("train_loss_end"), "final train loss"

    if std and bn:
        for name in ("batchnorm", "noisy_bn"):
            if name in summary:
                a, what = speed(summary[name])
                b, _ = speed(std)
                if a is not None and b is not None:
                    out.append(
                        (
                            f"{'BN' if name == 'batchnorm' else 'noisy BN'} trains faster than "
                            "standard",
                            a < b,
                            f"{what}: {_fmt(a)} vs {_fmt(b)}",
                        )
                    )
        if "noisy_bn" in summary:
            a, b = summary["noisy_bn"].get("delta_mean"), std.get("delta_mean")
            if a is not None and b is not None:
                out.append(
                    (
                        "noisy BN's moment changes are larger than standard's",
                        a > b,
                        f"mean Δ mean {_fmt(a)} vs {_fmt(b)}; Δ var "
                        f"{_fmt(summary['noisy_bn'].get('delta_var'))} vs "
                        f"{_fmt(std.get('delta_var'))}",
                    )
                )
        a, b = bn.get("ics_cosine"), std.get("ics_cosine")
        if a is not None and b is not None:
            la, lb = bn.get("ics_l2"), std.get("ics_l2")
            out.append(
                (
                    "ICS is not lower with BN",
                    a <= b or (la is not None and lb is not None and la >= lb),
                    f"cos(G, G') {_fmt(a)} vs {_fmt(b)}; ‖G−G′‖ {_fmt(la)} vs {_fmt(lb)}",
                )
            )
        keys = ("loss_range", "grad_pred_max", "beta_eff")
        if all(bn.get(k) is not None and std.get(k) is not None for k in keys):
            out.append(
                (
                    "loss range, gradient predictiveness and β_eff are lower with BN",
                    all(bn[k] < std[k] for k in keys),
                    "; ".join(f"{k} {_fmt(bn[k])} vs {_fmt(std[k])}" for k in keys),
                )
            )
    if bn:
        b, what = speed(bn)
        for name, shown in (("lp1", "L1"), ("lp2", "L2"), ("lpinf", "L∞")):
            if name in summary and b is not None:
                a, _ = speed(summary[name])
                if a is not None:
                    # "comparably": within a factor of 2 of BN (or better)
                    out.append(
                        (
                            f"{shown} trains comparably to BN",
                            a <= 2 * b,
                            f"{what}: {_fmt(a)} vs BN {_fmt(b)}",
                        )
                    )
    return out


def _findings_html(found: list[tuple[str, bool, str]]) -> str:
    if not found:
        return ""
    items = "".join(
        f"<li><b>{'consistent' if ok else 'not consistent'}</b> with S18: {html.escape(claim)} "
        f"({html.escape(evidence)})</li>"
        for claim, ok, evidence in found
    )
    return f"<h3>S18's findings on this run</h3><ul>{items}</ul>"


_COLUMNS = (
    ("train_acc_end", "train acc (end)"),
    ("steps_to_90", "steps to 90% train acc"),
    ("train_loss_end", "train loss (end)"),
    ("val_acc_end", "val acc"),
    ("ics_l2", "ICS ‖G−G′‖"),
    ("ics_cosine", "ICS cos"),
    ("loss_range", "loss range"),
    ("grad_pred_max", "grad. pred. (max)"),
    ("beta_eff", "β_eff"),
    ("delta_mean", "Δ mean"),
    ("delta_var", "Δ var"),
)


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x != x or x in (float("inf"), float("-inf")):
        return "never" if x == float("inf") else str(x)  # inf: a level never reached
    if x == int(x) and abs(x) >= 1:
        return str(int(x))
    return f"{x:.3g}"


def _table(runs: list[Run], summary: dict[str, dict[str, float | None]]) -> str:
    cols = [(k, n) for k, n in _COLUMNS if any(summary[r.name][k] is not None for r in runs)]
    head = "".join(f"<th>{html.escape(n)}</th>" for _, n in cols)
    rows = []
    for r in runs:
        cells = "".join(f"<td>{_fmt(summary[r.name][k])}</td>" for k, _ in cols)
        rows.append(f"<tr><th>{html.escape(label(r))}</th>{cells}</tr>")
    return f"<table><tr><th>variant</th>{head}</tr>{''.join(rows)}</table>"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child{text-align:left}
figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #eee}
.msg{color:#8a4b00;font-size:13px}
figcaption{font-size:13px;color:#444}
"""


def build_report(logdir: str | os.PathLike, out: str | os.PathLike | None = None) -> ReportResult:
    """Write S18's figures (PNG), ``summary.json`` and one self-contained ``report.html``.

    Args:
        logdir: directory holding TensorBoard event files and/or W&B offline runs (searched
            recursively).
        out: output directory; default ``<logdir>/report``.

    Returns:
        the :class:`ReportResult` (paths written, per-group per-run summary, messages about
        figures that could not be drawn).

    Raises:
        ConfigurationError: ``logdir`` does not exist or holds no run.

    Example::

        build_report("runs/s18", out="runs/s18/report")
    """
    import matplotlib.pyplot as plt

    runs = load_runs(logdir)
    out = Path(out) if out is not None else Path(logdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    result = ReportResult(html=out / "report.html")
    body = [
        "<h1>lightning_norm: Santurkar et al. 2018 reproduction</h1>",
        f"<p>Log directory: <code>{html.escape(str(Path(logdir).resolve()))}</code>. "
        f"{len(runs)} run(s) in {len(groups)} comparison(s).</p>",
    ]
    for group, members in groups.items():
        members = order_runs(members)
        summary = {r.name: summarize(r) for r in members}
        result.summary[group] = {r.name: {"variant": r.variant, **summary[r.name]} for r in members}
        body.append(f"<h2>{html.escape(group)}</h2>")
        body.append(
            "<p>Runs: "
            + ", ".join(
                f"{html.escape(label(r))} (<code>{html.escape(r.name)}</code>, {r.source})"
                for r in members
            )
            + "</p>"
        )
        body.append(_table(members, summary))
        found = findings({r.variant: summary[r.name] for r in members})
        body.append(_findings_html(found))
        result.findings[group] = found
        for make in FIGURES:
            fig: Figure = make(members, group)
            result.messages.extend(fig.messages)
            msgs = "".join(f"<p class='msg'>{html.escape(m)}</p>" for m in fig.messages)
            if fig.figure is None:
                body.append(f"<h3>{html.escape(fig.title)}</h3>{msgs}")
                continue
            png = _png(fig.figure)
            plt.close(fig.figure)
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in group)
            path = out / f"{safe}_{fig.key}.png"
            path.write_bytes(png)
            result.figures.append(path)
            data = base64.b64encode(png).decode("ascii")
            body.append(
                f"<figure><h3>{html.escape(fig.title)}</h3>"
                f"<img alt='{html.escape(fig.key)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(fig.caption)}</figcaption>{msgs}</figure>"
            )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>lightning_norm S18 report</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>"
    )
    result.html.write_text(page, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_norm.report LOGDIR [--out DIR]``."""
    from lightning_norm.cli import main as cli_main

    return cli_main(["report", *(argv if argv is not None else sys.argv[1:])])
