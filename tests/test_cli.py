"""``lightning-norm reproduce`` / ``report`` end to end on a tiny run."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import pytest

from lightning_norm.cli import build_parser, main


@pytest.mark.slow
def test_reproduce_end_to_end_writes_logs_wandb_runs_and_the_report(tmp_path, capsys):
    logdir = tmp_path / "runs"
    rc = main(
        [
            "reproduce",
            "--setup",
            "vgg,dln",
            "--variants",
            "none,batchnorm",
            "--dln-variants",
            "batchnorm",
            "--steps",
            "4",
            "--dln-steps",
            "4",
            "--dln-depth",
            "4",
            "--probe-every",
            "2",
            "--width",
            "0.25",
            "--logdir",
            str(logdir),
            "--no-progress",
            "--wandb",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "[vgg 2/2] batchnorm done" in out and "[dln 1/1] batchnorm done" in out
    for run in ("vgg/none", "vgg/batchnorm", "dln/batchnorm"):
        assert list((logdir / run).glob("events.out.tfevents.*"))
    assert len(list(logdir.rglob("run-*.wandb"))) == 3  # one offline W&B run per fit
    from lightning_norm.report.reader import load_runs, read_wandb_run

    # W&B copies are matched to their TensorBoard twins by (group, variant) and skipped
    runs = load_runs(logdir)
    assert sorted((r.group, r.variant, r.source) for r in runs) == [
        ("dln", "batchnorm", "tensorboard"),
        ("vgg", "batchnorm", "tensorboard"),
        ("vgg", "none", "tensorboard"),
    ]
    wb = [read_wandb_run(p, logdir) for p in logdir.rglob("run-*.wandb")]
    assert sorted((r.group, r.variant) for r in wb) == [
        ("dln", "batchnorm"),
        ("vgg", "batchnorm"),
        ("vgg", "none"),
    ]
    tb = {(r.group, r.variant): r for r in runs}
    for r in wb:  # the same numbers reach both loggers
        s_tb, v_tb = tb[(r.group, r.variant)].get("train/loss")
        s_wb, v_wb = r.get("train/loss")
        assert s_wb.tolist() == s_tb.tolist()
        assert v_wb == pytest.approx(v_tb, rel=1e-6)
    report = logdir / "report"
    html = (report / "report.html").read_text()
    pngs = sorted(report.glob("*.png"))
    # VGG: Fig. 1, 1b/2, 3, 4, 8 (no Lp variant, so no Fig. 5); DLN: no accuracy, same figures
    assert {p.name for p in pngs} >= {
        "vgg_fig1_training.png",
        "vgg_fig2_activations.png",
        "vgg_fig3_ics.png",
        "vgg_fig4_landscape.png",
        "vgg_fig8_moments.png",
        "dln_fig1_training.png",
        "dln_fig3_ics.png",
        "dln_fig4_landscape.png",
    }
    embedded = [base64.b64decode(d) for d in re.findall(r"base64,([A-Za-z0-9+/=]+)'", html)]
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary) == {"vgg", "dln"}
    assert summary["dln"]["dln/batchnorm"]["train_loss_end"] > 0
    assert "wrote" in out and "report.html" in out


def test_report_command_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["reproduce", "--variants", "batchnorm,bogus", "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Unknown variant" in err and "noisy_bn" in err  # lists the choices
    assert not (tmp_path / "vgg").exists()  # nothing trained before the settings were checked


def test_parser_defaults_are_the_documented_ones():
    args = build_parser().parse_args(["reproduce"])
    assert args.setup == ["vgg", "dln"]
    assert (args.steps, args.lr, args.batch_size, args.dataset) == (300, 0.1, 128, "digits")
    assert args.logdir == "runs/s18" and not args.wandb and not args.download


@pytest.mark.slow
def test_python_dash_m_report_runs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "logs" / "cmp" / "batchnorm"))
    for step in range(5):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.close()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_norm.report",
            str(tmp_path / "logs"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "report.html").is_file()
    assert (tmp_path / "out" / "cmp_fig1_training.png").is_file()
    assert "Fig. 3 skipped" in proc.stdout
