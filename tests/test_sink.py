import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_norm import LogSink
from lightning_norm.sink import Histogram


def read_events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_histogram_matches_numpy_float64():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    x[:5] = float("nan")
    h = Histogram.from_tensor(x, bins=16)
    finite = x[5:].double().numpy()
    counts, edges = np.histogram(finite, bins=16, range=(finite.min(), finite.max()))
    np.testing.assert_allclose(h.edges, edges, rtol=1e-5, atol=1e-5)
    # float32 binning may move a value sitting on an edge by one bin; totals are exact.
    assert np.abs(np.asarray(h.counts) - counts).sum() <= 4
    assert h.num == len(finite) == sum(h.counts)
    assert h.total == pytest.approx(finite.sum(), rel=1e-4)
    assert h.total_sq == pytest.approx((finite**2).sum(), rel=1e-5)


def test_histogram_of_constant_and_empty_tensors():
    h = Histogram.from_tensor(torch.full((10,), 2.0), bins=4)
    assert sum(h.counts) == 10 and h.edges[0] == 2.0
    empty = Histogram.from_tensor(torch.tensor([float("inf")]), bins=4)
    assert empty.num == 0 and sum(empty.counts) == 0


def test_tensorboard_scalars_histograms_figures_read_back(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    sink = LogSink([logger])
    sink.log_scalars({"grad_norm/total": torch.tensor(1.5), "ics/fc/l2": 0.25}, step=3)
    sink.log_scalars({"grad_norm/total": torch.tensor(2.5)}, step=7)
    sink.log_histogram("activation/fc/hist", torch.arange(100.0), step=3, bins=10)
    fig = plt.figure()
    plt.plot([0, 1], [1, 0])
    sink.log_figure("landscape/total/slice_1d", fig, step=3)
    logger.experiment.flush()
    acc = read_events(logger.log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm/total")] == [(3, 1.5), (7, 2.5)]
    assert acc.Scalars("ics/fc/l2")[0].value == 0.25
    (hist,) = acc.Histograms("activation/fc/hist")
    assert hist.step == 3 and hist.histogram_value.num == 100
    assert hist.histogram_value.sum == pytest.approx(sum(range(100)))
    assert list(hist.histogram_value.bucket) == [10.0] * 10
    assert acc.Images("landscape/total/slice_1d")[0].step == 3
    assert not plt.fignum_exists(fig.number)


def test_csv_logger_gets_scalars_and_one_notice(tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    sink = LogSink([logger])
    assert not sink.has_histogram_logger
    with caplog.at_level(logging.WARNING, logger="lightning_norm.sink"):
        sink.log_histogram("activation/a/hist", torch.randn(10), step=0)
        sink.log_histogram("activation/b/hist", torch.randn(10), step=1)
    assert sum("cannot store histograms" in r.message for r in caplog.records) == 1
    sink.log_scalars({"weight_norm/total": torch.tensor(4.0)}, step=2)
    logger.save()
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "weight_norm/total" in text and "4.0" in text


def test_several_loggers_receive_the_same_scalars(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    LogSink([tb, csv]).log_scalars({"update_ratio/total": torch.tensor(0.125)}, step=5)
    tb.experiment.flush()
    csv.save()
    assert read_events(tb.log_dir).Scalars("update_ratio/total")[0].value == 0.125
    assert "0.125" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()


def test_wandb_offline_histogram_and_scalar(tmp_path):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="sink-test")
    sink = LogSink([logger])
    sink.log_scalars({"grad_norm/total": torch.tensor(3.0)}, step=1)
    sink.log_histogram("activation/fc/hist", torch.arange(10.0), step=1, bins=5)
    run = logger.experiment
    try:
        summary = dict(run.summary)
        assert summary["grad_norm/total"] == 3.0
        assert summary["trainer/global_step"] == 1
        hist = summary["activation/fc/hist"]
        assert hist["_type"] == "histogram" and hist["values"] == [2, 2, 2, 2, 2]
    finally:
        run.finish()
