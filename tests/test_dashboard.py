"""Dashboards: TB custom-scalars layouts and W&B metric definitions, read back from disk."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_norm.dashboard import observe, tensorboard_layout
from lightning_norm.sink import LogSink


def read_layout(log_dir: str):
    """The last custom-scalars layout written to ``log_dir``, via TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = ea.EventAccumulator(log_dir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert metadata.CONFIG_SUMMARY_TAG in acc.Tags()["tensors"]
    events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[-1].tensor_proto.string_val[0])
    return layout, len(events)


def charts(layout) -> dict[str, dict[str, list[str]]]:
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


def matching(regexes: list[str], names: list[str]) -> set[str]:
    return {n for n in names if any(re.match(r, n) for r in regexes)}


NAMES = [
    "activation/net.features.1/mean",
    "activation/net.features.1/std",
    "activation/net.features.1/unit0_p50",
    "activation/net.features.1/unit3_p50",
    "activation/net.features.4/mean",
    "activation/net.features.4/std",
    "grad_norm/net.features.0",
    "grad_norm/total",
    "ics/net.features.0/l2",
    "ics/net.features.0/cosine",
    "landscape/total/beta_eff",
    "landscape/total/curve_eta_0",
    "landscape/total/curve_eta_1",
    "landscape/total/curve_loss_0",
    "landscape/total/curve_loss_1",
]


def test_layout_regexes_select_exactly_the_intended_names():
    layout = tensorboard_layout(NAMES)
    assert sorted(layout) == ["activation", "grad_norm", "ics", "landscape"]
    # curve points: one chart per family, not one per point
    assert sorted(layout["landscape"]) == [
        "landscape · beta_eff (all layers)",
        "landscape · total",
        "landscape · total · curve_eta_<i>",
        "landscape · total · curve_loss_<i>",
    ]
    assert matching(layout["landscape"]["landscape · total · curve_loss_<i>"][1], NAMES) == {
        "landscape/total/curve_loss_0",
        "landscape/total/curve_loss_1",
    }
    assert matching(layout["landscape"]["landscape · total"][1], NAMES) == {
        "landscape/total/beta_eff"
    }
    act = layout["activation"]
    # one chart per metric with every layer; per layer one chart with its metrics
    assert matching(act["activation · mean (all layers)"][1], NAMES) == {
        "activation/net.features.1/mean",
        "activation/net.features.4/mean",
    }
    assert matching(act["activation · net.features.1"][1], NAMES) == {
        "activation/net.features.1/mean",
        "activation/net.features.1/std",
    }
    # sampled units have their own per-layer chart and stay out of the summary charts
    assert matching(act["activation · net.features.1 · sampled units"][1], NAMES) == {
        "activation/net.features.1/unit0_p50",
        "activation/net.features.1/unit3_p50",
    }
    assert "activation · unit0_p50 (all layers)" not in act
    # a dot in a layer name is literal: features.1 must not match features_1 or featuresX1
    assert not matching(act["activation · net.features.1"][1], ["activation/net.featuresX1/mean"])
    assert matching(layout["grad_norm"]["grad_norm (all layers)"][1], NAMES) == {
        "grad_norm/net.features.0",
        "grad_norm/total",
    }
    assert layout["ics"]["ics · cosine (all layers)"] == ["Multiline", [r"^ics/.+/cosine$"]]
    assert tensorboard_layout(reversed(NAMES)) == layout  # order-independent


def test_tensorboard_layout_written_through_logsink_and_updated_for_new_layers(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run", version="v")
    sink = LogSink([logger])
    sink.log_scalars({"grad_norm/total": 1.0, "activation/a.0/std": torch.tensor(2.0)}, step=0)
    sink.log_scalars({"grad_norm/total": 1.5, "activation/a.0/std": 2.5}, step=1)  # nothing new
    logger.experiment.flush()
    layout, writes = read_layout(logger.log_dir)
    assert writes == 1
    assert charts(layout) == {
        "activation": {
            "activation · std (all layers)": [r"^activation/.+/std$"],
            "activation · a.0": [r"^activation/a\.0/(std)$"],
        },
        "grad_norm": {"grad_norm (all layers)": [r"^grad_norm/[^/]+$"]},
    }
    # a second callback's sink on the same logger adds a group: one layout holds both
    LogSink([logger]).log_scalars({"ics/a.0/l2": 0.1}, step=2)
    logger.experiment.flush()
    layout, writes = read_layout(logger.log_dir)
    assert writes == 2
    assert set(charts(layout)) == {"activation", "grad_norm", "ics"}
    assert charts(layout)["ics"]["ics · a.0"] == [r"^ics/a\.0/(l2)$"]
    # the scalars themselves are still written
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logger.log_dir)
    acc.Reload()
    assert [e.value for e in acc.Scalars("grad_norm/total")] == [1.0, 1.5]


def test_layout_from_a_real_fit_with_a_monitor(tmp_path):
    from lightning_norm.callbacks import GradientNorms
    from tests.helpers import Classifier, cpu_trainer

    logger = TensorBoardLogger(str(tmp_path), name="fit", version="0")
    torch.manual_seed(0)
    cpu_trainer(max_steps=3, logger=logger, callbacks=[GradientNorms()]).fit(Classifier())
    layout, _ = read_layout(logger.log_dir)
    cats = charts(layout)
    assert "grad_norm" in cats and "weight_norm" in cats
    tags = matching(cats["grad_norm"]["grad_norm (all layers)"], list(_scalar_tags(logger)))
    assert "grad_norm/total" in tags and any(t.startswith("grad_norm/net.") for t in tags)


def _scalar_tags(logger):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(logger.log_dir)
    acc.Reload()
    return acc.Tags()["scalars"]


class TensorBoardLogger_:
    """A TB-looking logger whose writer raises: the dashboard must not stop training."""

    class experiment:
        @staticmethod
        def add_custom_scalars(layout):
            raise OSError("disk full")

        add_histogram = None


def test_dashboard_failure_is_a_warning_not_an_error(caplog):
    broken = type("TensorBoardLogger", (TensorBoardLogger_,), {})()
    observe([broken], ["grad_norm/total"])
    assert "could not update" in caplog.text


# --- W&B -----------------------------------------------------------------------------------


def wandb_records(run_file: Path):
    """Parse a W&B offline ``.wandb`` file with the report's reader, as protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    from lightning_norm.report.reader import _wandb_records

    out = []
    for raw in _wandb_records(run_file):
        rec = pb.Record()
        rec.ParseFromString(raw)
        out.append(rec)
    return out


def test_wandb_metric_definitions_and_group_read_back_from_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, group="cmp", name="bn", project="t")
    sink = LogSink([logger])
    sink.log_scalars({"ics/a.0/l2": 0.5, "grad_norm/total": 2.0}, step=3)
    sink.log_scalars({"ics/a.0/l2": 0.25, "grad_norm/total": 1.0}, step=7)
    logger.experiment.finish()
    (run_file,) = tmp_path.rglob("run-*.wandb")
    recs = wandb_records(run_file)
    with open(run_file, "rb") as f:
        assert struct.unpack("<4sHB", f.read(7))[0] == b":W&B"
    runs = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_group == "cmp" and runs[0].display_name == "bn"
    metrics = [r.metric for r in recs if r.WhichOneof("record_type") == "metric"]
    globs = {m.glob_name: m.step_metric for m in metrics if m.glob_name}
    assert globs["ics/*"] == "trainer/global_step"
    assert globs["grad_norm/*"] == "trainer/global_step"
    assert any(m.name == "trainer/global_step" for m in metrics)
    # the values land against trainer/global_step
    from lightning_norm.report.reader import read_wandb_run

    run = read_wandb_run(run_file, tmp_path)
    steps, values = run.get("ics/a.0/l2")
    assert steps.tolist() == [3, 7] and values.tolist() == [0.5, 0.25]
    assert run.group == "cmp" and run.variant == "bn"
