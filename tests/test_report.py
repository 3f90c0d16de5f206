"""The report: reading TB / W&B logs back, summary numbers, figures and the HTML page.

The figures are tested on event files written by real (tiny) fits, not on mocks.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from lightning_norm.errors import ConfigurationError
from lightning_norm.experiments import ReproduceConfig, run_comparison
from lightning_norm.report import build_report, summarize
from lightning_norm.report.reader import Run, load_runs, read_tensorboard_run


@pytest.fixture(scope="module")
def tiny_logs(tmp_path_factory):
    """Two VGG variants, 6 steps each, every callback attached, probes every 2 steps."""
    logdir = tmp_path_factory.mktemp("logs")
    cfg = ReproduceConfig(
        setup="vgg",
        variants=["none", "noisy_bn"],
        steps=6,
        width=0.5,
        probe_every=2,
        val_every=3,
        logdir=str(logdir),
        progress=False,
    )
    run_comparison(cfg)
    return logdir


def test_runs_read_back_from_real_event_files(tiny_logs):
    runs = load_runs(tiny_logs)
    assert [(r.group, r.variant, r.source) for r in runs] == [
        ("vgg", "noisy_bn", "tensorboard"),
        ("vgg", "none", "tensorboard"),
    ]
    for run in runs:
        steps, loss = run.get("train/loss")
        assert steps.tolist() == list(range(6))
        assert np.isfinite(loss).all()
        acc = run.get("train/acc")[1]
        assert ((acc >= 0) & (acc <= 1)).all()
        # every callback's names made it to disk in the fixed scheme
        assert run.has("activation/net.features.1/unit0_p50") or any(
            re.match(r"activation/net\.features\.1/unit\d+_p50$", t) for t in run.scalars
        )
        assert run.has("ics/net.features.0/cosine")
        assert run.has("landscape/total/beta_eff")
        assert run.has("grad_norm/total")
        assert run.get("val/acc")[0].tolist() == [2, 5]  # validation after steps 3 and 6


def test_report_draws_every_figure_the_logs_support_and_embeds_them(tiny_logs, tmp_path):
    result = build_report(tiny_logs, tmp_path / "out")
    names = sorted(p.name for p in result.figures)
    assert names == [
        "vgg_fig1_training.png",
        "vgg_fig2_activations.png",
        "vgg_fig3_ics.png",
        "vgg_fig4_landscape.png",
        "vgg_fig8_moments.png",
    ]
    # no Lp variant in these runs: Fig. 5 is skipped, and says why
    assert any("Fig. 5" in m and "Lp variant" in m for m in result.messages)
    page = result.html.read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(result.figures)
    for data, path in zip(embedded, result.figures, strict=True):
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png == path.read_bytes()
    assert "src='http" not in page and "<script" not in page  # self-contained
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["vgg"]) == {"vgg/none", "vgg/noisy_bn"}
    assert summary["vgg"]["vgg/none"]["variant"] == "none"


def test_missing_measurements_give_messages_and_the_rest_is_drawn(tmp_path):
    run_comparison(
        ReproduceConfig(
            setup="vgg",
            variants=["lp1"],
            steps=3,
            width=0.25,
            monitors=False,
            logdir=str(tmp_path / "logs"),
            progress=False,
            val_every=3,
        )
    )
    result = build_report(tmp_path / "logs", tmp_path / "out")
    assert sorted(p.name for p in result.figures) == ["vgg_fig1_training.png", "vgg_fig5_lp.png"]
    text = " ".join(result.messages)
    for fig, callback in (
        ("Fig. 1b/2", "ActivationMoments"),
        ("Fig. 3", "ICSDrift"),
        ("Fig. 4", "LossLandscape"),
        ("Fig. 8", "ActivationMoments"),
    ):
        assert re.search(rf"{re.escape(fig)} skipped.*{callback}", text), (fig, text)
    assert "Fig. 4 skipped" in result.html.read_text()


def test_tensorboard_reader_values_and_repeated_steps(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "cmp" / "batchnorm"
    writer = SummaryWriter(str(run_dir))
    for step, value in [(0, 1.5), (1, 0.25), (2, 4.0), (1, 0.75)]:  # step 1 repeated (resume)
        writer.add_scalar("ics/a.0/l2", value, step)
    writer.close()
    run = read_tensorboard_run(run_dir, tmp_path)
    steps, values = run.get("ics/a.0/l2")
    assert steps.tolist() == [0, 1, 2]
    assert values.tolist() == [1.5, 0.75, 4.0]  # the last write of a step wins
    assert (run.group, run.variant, run.name) == ("cmp", "batchnorm", "cmp/batchnorm")


def test_load_runs_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_runs(tmp_path / "nope")
    with pytest.raises(ConfigurationError, match="No TensorBoard event files"):
        load_runs(tmp_path)


def _series(steps, values):
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=float)


def test_summary_numbers_match_a_hand_computation():
    acc = [0.1 * i for i in range(20)]  # 0.0 .. 1.9 (values need not be accuracies here)
    loss = [10.0 - i for i in range(20)]
    run = Run(
        "g/x",
        "g",
        "x",
        "tensorboard",
        {
            "train/acc": _series(range(20), acc),
            "train/loss": _series(range(20), loss),
            "val/acc": _series([9, 19], [0.5, 0.8]),
            "ics/a/l2": _series([0, 10], [1.0, 3.0]),
            "ics/b/l2": _series([0, 10], [5.0, np.nan]),
            "ics/a/cosine": _series([0, 10], [0.5, 1.0]),
            "landscape/total/beta_eff": _series([0, 10], [2.0, 4.0]),
            "activation/a/delta_mean": _series([1, 2, 3], [0.1, 0.2, 0.3]),
            "activation/a/unit0_mean": _series([1], [100.0]),  # not a delta: ignored
        },
    )
    s = summarize(run)
    assert s["train_acc_end"] == pytest.approx((1.8 + 1.9) / 2)  # last 10% = 2 points
    assert s["train_loss_end"] == pytest.approx((-8.0 + -9.0) / 2)
    assert s["train_loss_start"] == 10.0
    assert s["val_acc_end"] == 0.8
    # moving average over len//40 = 1 point is the raw series: first value >= 0.9 at step 9
    assert s["steps_to_90"] == 9
    assert s["ics_l2"] == pytest.approx((1.0 + 3.0 + 5.0) / 3)  # NaN left out
    assert s["ics_cosine"] == pytest.approx(0.75)
    assert s["beta_eff"] == pytest.approx(3.0)
    assert s["delta_mean"] == pytest.approx(0.2)
    assert s["loss_range"] is None and s["delta_var"] is None


def test_findings_follow_the_numbers():
    from lightning_norm.report import findings

    def s(**kw):
        base = dict.fromkeys(
            (
                "train_acc_end",
                "steps_to_90",
                "train_loss_end",
                "ics_l2",
                "ics_cosine",
                "loss_range",
                "grad_pred_max",
                "beta_eff",
                "delta_mean",
                "delta_var",
            ),
        )
        base.update(kw)
        return base

    summary = {
        "none": s(
            train_acc_end=0.9,
            steps_to_90=100,
            ics_l2=0.3,
            ics_cosine=0.8,
            loss_range=2.0,
            grad_pred_max=10.0,
            beta_eff=20.0,
            delta_mean=0.1,
        ),
        "batchnorm": s(
            train_acc_end=1.0,
            steps_to_90=10,
            ics_l2=0.1,
            ics_cosine=0.9,
            loss_range=0.1,
            grad_pred_max=1.0,
            beta_eff=30.0,
        ),
        "noisy_bn": s(train_acc_end=1.0, steps_to_90=None, delta_mean=0.5),
        "lp1": s(train_acc_end=1.0, steps_to_90=20),
        "lpinf": s(train_acc_end=1.0, steps_to_90=21),
    }
    got = {claim: (ok, ev) for claim, ok, ev in findings(summary)}
    assert got["BN trains faster than standard"] == (True, "steps to 90% train acc: 10 vs 100")
    assert got["noisy BN trains faster than standard"][0] is False  # never reached 90%
    assert got["noisy BN's moment changes are larger than standard's"][0] is True
    assert got["ICS is not lower with BN"][0] is False  # higher cos and lower l2 with BN
    # beta_eff is higher with BN here, so the landscape claim fails as a whole
    assert got["loss range, gradient predictiveness and β_eff are lower with BN"][0] is False
    assert got["L1 trains comparably to BN"][0] is True  # 20 <= 2 x 10
    assert got["L∞ trains comparably to BN"][0] is False  # 21 > 2 x 10
    assert "L2 trains comparably to BN" not in got  # no lp2 run: no claim
    # regression runs (no accuracy): speed is the final loss, lower is better
    dln = {"none": s(train_loss_end=40.0), "batchnorm": s(train_loss_end=30.0)}
    assert findings(dln)[0] == (
        "BN trains faster than standard",
        True,
        "final train loss: 30 vs 40",
    )
