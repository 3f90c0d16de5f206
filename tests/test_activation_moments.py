"""ActivationMoments in real (CPU) fits: values against float64 brute force, no side effects."""

from __future__ import annotations

import csv
import gc
import math
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_norm.callbacks import ActivationMoments, GradientNorms
from lightning_norm.errors import ConfigurationError, SelectionError
from lightning_norm.selection import LayerSelection
from tests.helpers import Classifier, MemoryLogger, cpu_trainer, random_images, small_convnet


def ref_quantile(values, q):
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def ref_moments(values):
    mean = sum(values) / len(values)
    return mean, sum((x - mean) ** 2 for x in values) / len(values)


def capture_training_outputs(
    trainer_ref: list, module: nn.Module, store: dict, stage: str = "train"
) -> None:
    """The test's own hook: float64 copies of ``module``'s outputs per global step, in training
    (``stage="train"``) or in validation runs other than the sanity check (``"validate"``)."""

    def hook(mod, args, out):
        trainer = trainer_ref[0]
        if stage == "train":
            wanted = mod.training and trainer.training
        else:
            wanted = not mod.training and trainer.validating and not trainer.sanity_checking
        if wanted:
            store.setdefault(trainer.global_step, []).append(out.detach().double().clone())

    module.register_forward_hook(hook)


def assert_layer_matches(m: dict, base: str, x: torch.Tensor, units: list[int]) -> None:
    """The logged ``<base>/...`` statistics of ``x`` (N, C, ...) against float64 brute force."""
    flat = x.flatten().tolist()
    mean, var = ref_moments(flat)
    assert m[f"{base}/mean"] == pytest.approx(mean, abs=1e-6)
    assert m[f"{base}/std"] == pytest.approx(math.sqrt(var), rel=1e-5)
    assert m[f"{base}/nonfinite"] == 0
    for name, q in (("p15", 0.15), ("p50", 0.5), ("p85", 0.85)):
        assert m[f"{base}/{name}"] == pytest.approx(ref_quantile(flat, q), rel=1e-5)
    for u in units:
        vals = x[:, u].flatten().tolist()
        um, uv = ref_moments(vals)
        assert m[f"{base}/unit{u}_mean"] == pytest.approx(um, abs=1e-6)
        assert m[f"{base}/unit{u}_std"] == pytest.approx(math.sqrt(uv), rel=1e-5)
        for name, q in (("p15", 0.15), ("p50", 0.5), ("p85", 0.85)):
            key = f"{base}/unit{u}_{name}"
            assert m[key] == pytest.approx(ref_quantile(vals, q), rel=1e-4, abs=1e-6)


def validating_trainer(callbacks, logger, max_steps: int, val_batches: int = 1) -> L.Trainer:
    """A CPU trainer with a one-batch sanity check that validates every 2 training batches."""
    return cpu_trainer(
        callbacks=callbacks,
        logger=logger,
        max_steps=max_steps,
        num_sanity_val_steps=1,
        limit_val_batches=val_batches,
        val_check_interval=2,
    )


def forward_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_logged_values_match_brute_force_and_ignore_validation():
    torch.manual_seed(0)
    model = Classifier(small_convnet(), n=96, batch_size=16)
    logger = MemoryLogger()
    cb = ActivationMoments(every_n_steps=2, num_units=3, quantile_samples=100_000, seed=1)
    trainer = validating_trainer([cb], logger, max_steps=5)
    ref: list = [trainer]
    store: dict[int, list] = {}
    capture_training_outputs(ref, model.net[1], store)
    trainer.fit(model)
    logged = logger.by_step("activation/")
    assert sorted(logged) == [0, 2, 4]  # due steps only; steps 1, 3 recorded for the deltas
    units = cb.state_dict()["units"]["net.1"]
    assert len(units) == 3
    for step in (0, 2, 4):
        m = logged[step]
        x = torch.cat(store[step])
        assert_layer_matches(m, "activation/net.1", x, units)
        if step == 0:
            assert "activation/net.1/delta_mean" not in m  # no step before the first
            continue
        prev = torch.cat(store[step - 1])
        dm = [abs(x[:, u].mean().item() - prev[:, u].mean().item()) for u in units]
        dv = [
            abs(x[:, u].var(correction=0).item() - prev[:, u].var(correction=0).item())
            for u in units
        ]
        assert m["activation/net.1/delta_mean"] == pytest.approx(sum(dm) / 3, abs=1e-6)
        assert m["activation/net.1/delta_var"] == pytest.approx(sum(dv) / 3, rel=1e-4, abs=1e-6)
    assert "activation/net.5/mean" in logged[0]  # both BN layers, by default
    assert not logger.by_step("activation_val/")  # validation is not recorded unless asked
    assert forward_hook_count(model) == 1  # only the test's hook is left


def test_validation_statistics_when_asked_match_brute_force_and_leave_training_alone():
    torch.manual_seed(0)
    model = Classifier(small_convnet(), n=64, batch_size=16)  # 4 training, 2 validation batches
    logger = MemoryLogger()
    cb = ActivationMoments(
        stages=("validate", "train"),
        every_n_steps=3,
        num_units=3,
        quantile_samples=100_000,
        seed=1,
        histogram_every_n_steps=1,
    )
    trainer = validating_trainer([cb], logger, max_steps=4, val_batches=2)
    train_out: dict[int, list] = {}
    val_out: dict[int, list] = {}
    capture_training_outputs([trainer], model.net[1], train_out)
    capture_training_outputs([trainer], model.net[1], val_out, stage="validate")
    trainer.fit(model)
    assert cb.stages == ("train", "validate")
    units = cb.state_dict()["units"]["net.1"]
    val = logger.by_step("activation_val/")
    assert sorted(val) == sorted(val_out) == [2, 4]  # not the sanity check at step 0
    for step in (2, 4):
        assert len(val_out[step]) == 2  # one sample: both validation batches together
        assert_layer_matches(val[step], "activation_val/net.1", torch.cat(val_out[step]), units)
        assert "activation_val/net.5/mean" in val[step]
        assert not any("delta" in k or k.endswith("/hist") for k in val[step])
    train = logger.by_step("activation/")
    assert sorted(train) == [0, 3]
    for step in (0, 3):
        assert_layer_matches(train[step], "activation/net.1", torch.cat(train_out[step]), units)
    assert forward_hook_count(model) == 2  # only the test's hooks are left


def test_validation_only():
    logger = MemoryLogger()
    cb = ActivationMoments(stages="validate", num_units=1)
    model = Classifier()
    trainer = cpu_trainer(callbacks=[cb], logger=logger, max_steps=4, limit_val_batches=1)
    trainer.fit(model)
    assert cb.recorder is None
    assert not logger.by_step("activation/")
    assert sorted(logger.by_step("activation_val/")) == [4]  # the end of the only epoch
    trainer.validate(model, dataloaders=model.val_dataloader(), verbose=False)
    assert sorted(logger.by_step("activation_val/")) == [4]  # fit only
    assert forward_hook_count(model) == 0


def _seeded_fit(callbacks):
    L.seed_everything(7, verbose=False)
    model = Classifier(small_convnet(), momentum=0.9, n=64, batch_size=16)
    trainer = validating_trainer(callbacks, MemoryLogger(), max_steps=6)
    trainer.fit(model)
    return model, torch.get_rng_state()


def test_monitors_do_not_change_training_bit_for_bit(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # seed_everything sets it; undo after the test
    bare, rng_bare = _seeded_fit([])
    monitored, rng_mon = _seeded_fit(
        [
            ActivationMoments(num_units=4, histogram_every_n_steps=2),
            GradientNorms(log_clipped=True),
        ]
    )
    sd_bare, sd_mon = bare.state_dict(), monitored.state_dict()
    assert sd_bare.keys() == sd_mon.keys()
    for k in sd_bare:  # parameters, BN running stats and num_batches_tracked
        assert torch.equal(sd_bare[k], sd_mon[k]), k
    assert torch.equal(rng_bare, rng_mon)


def test_hooks_removed_after_fit_error_and_keyboard_interrupt_and_no_leak():
    class Failing(Classifier):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise self.exc
            return super().training_step(batch, batch_idx)

    cb = ActivationMoments()
    model = Failing(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cpu_trainer(callbacks=[cb]).fit(model)
    assert forward_hook_count(model) == 0

    model = Failing(KeyboardInterrupt())
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl+C into a graceful exit(1)
            cpu_trainer(callbacks=[cb]).fit(model)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert forward_hook_count(model) == 0

    # a normal fit, then validate/test/predict log nothing of ours; a second fit logs again
    logger = MemoryLogger()
    model = Classifier()
    trainer = cpu_trainer(callbacks=[cb], logger=logger, max_steps=2, limit_val_batches=2)
    trainer.fit(model)
    n_fit = len(logger.by_step("activation/"))
    assert n_fit == 2 and forward_hook_count(model) == 0
    trainer.validate(model, dataloaders=model.val_dataloader(), verbose=False)
    assert forward_hook_count(model) == 0
    assert len(logger.by_step("activation/")) == n_fit
    trainer2 = cpu_trainer(callbacks=[cb], logger=logger, max_steps=4)
    trainer2.fit(model, ckpt_path=None)
    assert forward_hook_count(model) == 0
    assert sorted(logger.by_step("activation/")) == [0, 1, 2, 3]


def test_gradient_accumulation_merges_micro_batches_of_one_step():
    torch.manual_seed(0)
    model = Classifier(small_convnet(), n=64, batch_size=8)
    logger = MemoryLogger()
    cb = ActivationMoments(num_units=2, quantile_samples=100_000)
    trainer = cpu_trainer(callbacks=[cb], logger=logger, max_steps=3, accumulate_grad_batches=2)
    store: dict[int, list] = {}
    capture_training_outputs([trainer], model.net[1], store)
    trainer.fit(model)
    logged = logger.by_step("activation/")
    assert sorted(logged) == [0, 1, 2]
    for step in (0, 1, 2):
        assert len(store[step]) == 2  # two micro-batches per optimizer step
        flat = torch.cat(store[step]).flatten().tolist()
        mean, var = ref_moments(flat)
        assert logged[step]["activation/net.1/mean"] == pytest.approx(mean, abs=1e-6)
        assert logged[step]["activation/net.1/std"] == pytest.approx(math.sqrt(var), rel=1e-5)
        p50 = ref_quantile(flat, 0.5)
        assert logged[step]["activation/net.1/p50"] == pytest.approx(p50, rel=1e-5, abs=1e-6)


def test_bf16_autocast_statistics_in_float32():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4))
    model = Classifier(net, n=32, batch_size=16)
    logger = MemoryLogger()
    cb = ActivationMoments(layers=LayerSelection(types=(nn.Linear,)), quantile_samples=10_000)
    trainer = cpu_trainer(callbacks=[cb], logger=logger, max_steps=2, precision="bf16-mixed")
    store: dict[int, list] = {}
    dtypes = []
    net[1].register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    capture_training_outputs([trainer], net[1], store)
    trainer.fit(model)
    assert dtypes[0] == torch.bfloat16  # the layer really ran in bf16
    logged = logger.by_step("activation/")
    for step in (0, 1):
        flat = torch.cat(store[step]).flatten().tolist()
        mean, var = ref_moments(flat)  # float64 statistics of the bf16 values
        assert logged[step]["activation/net.1/mean"] == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert logged[step]["activation/net.1/std"] == pytest.approx(math.sqrt(var), rel=1e-5)


def test_settings_errors_state_key_and_state_dict():
    with pytest.raises(ConfigurationError, match="every_n_steps"):
        ActivationMoments(every_n_steps=0)
    with pytest.raises(ConfigurationError, match="capture"):
        ActivationMoments(capture="weights")
    for stages in ((), ("train", "test"), "sanity_check"):
        with pytest.raises(ConfigurationError, match="stages"):
            ActivationMoments(stages=stages)
    with pytest.raises(ConfigurationError, match="quantiles"):
        ActivationMoments(quantiles=(0.5, 1.5))
    with pytest.raises(ConfigurationError, match="LayerSelection"):
        ActivationMoments(layers="net.*")
    cb = ActivationMoments(layers=LayerSelection(include="no_such_layer*"))
    model = Classifier()
    steps = []
    model.on_train_batch_start = lambda *a: steps.append(1)
    with pytest.raises(SelectionError, match="no_such_layer"):
        cpu_trainer(callbacks=[cb]).fit(model)
    assert steps == []  # failed at setup, before any step
    a, b = ActivationMoments(), ActivationMoments(capture="input")
    assert a.state_key != b.state_key
    assert "stages" not in a.state_key  # the default keeps the key of older checkpoints
    keys = {ActivationMoments(stages=s).state_key for s in ("validate", ("train", "validate"))}
    assert len(keys | {a.state_key}) == 3
    a.load_state_dict({"units": {"net.1": [0, 5]}})
    assert a.state_dict() == {"units": {"net.1": [0, 5]}}
    a.load_state_dict({})  # older checkpoints without the field
    assert a.state_dict() == {"units": {}}


def test_resumed_run_keeps_the_sampled_units(tmp_path):
    cb = ActivationMoments(num_units=2, seed=3)
    model = Classifier()
    trainer = cpu_trainer(callbacks=[cb], max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model)
    units = cb.state_dict()["units"]
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    cb2 = ActivationMoments(num_units=2, seed=99)  # another seed would pick other units...
    cb2_key = cb2.state_key
    cb2.__class__ = ActivationMoments
    assert cb2_key != cb.state_key
    cb3 = ActivationMoments(num_units=2, seed=3)
    logger = MemoryLogger()
    cpu_trainer(callbacks=[cb3], logger=logger, max_steps=3).fit(Classifier(), ckpt_path=path)
    assert cb3.state_dict()["units"] == units  # ...the checkpoint's units are kept
    keys = logger.by_step("activation/")[2]
    for u in units["net.1"]:
        assert f"activation/net.1/unit{u}_p50" in keys


def test_tensorboard_event_files_hold_unit_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = ActivationMoments(num_units=2, histogram_every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    cpu_trainer(callbacks=[cb], logger=logger, max_steps=2).fit(Classifier())
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    units = cb.state_dict()["units"]["net.1"]
    for u in units:
        for metric in ("mean", "std", "p15", "p50", "p85"):
            events = acc.Scalars(f"activation/net.1/unit{u}_{metric}")
            assert [e.step for e in events] == [0, 1]
    assert "activation/net.5/hist" in tags["histograms"]
    hist = acc.Histograms("activation/net.5/hist")
    assert [h.step for h in hist] == [0, 1] and hist[0].histogram_value.num > 0


def test_csv_logger_gets_scalars_and_a_notice_for_histograms(tmp_path, caplog):
    cb = ActivationMoments(num_units=1, histogram_every_n_steps=1)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    with caplog.at_level("WARNING"):
        cpu_trainer(callbacks=[cb], logger=logger, max_steps=2).fit(Classifier())
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("activation/net.1/mean") not in (None, "") for r in rows)
    assert sum("cannot store histograms" in r.message for r in caplog.records) == 1


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.slow
def test_no_memory_growth_over_hundreds_of_steps():
    class Tiny(Classifier):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(64, 6, generator=g), torch.randint(0, 4, (64,), generator=g)
            return DataLoader(TensorDataset(x, y), batch_size=8)

    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model = Tiny(net)
    counts = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (40, 200):
                counts[trainer.global_step] = live_tensors()

    class Discard(MemoryLogger):
        def log_metrics(self, metrics, step=None) -> None:
            self.rows = [(step, {})]

    am, gn = ActivationMoments(every_n_steps=3, num_units=2), GradientNorms()
    cpu_trainer(callbacks=[am, gn, Probe()], max_steps=200, logger=Discard()).fit(model)
    assert counts[200] <= counts[40]  # no tensor accumulates from step to step
    assert forward_hook_count(model) == 0
    assert am.recorder is not None and am.recorder._acc == {}  # released at the end of fit


# -- DDP (2 CPU processes, gloo) -----------------------------------------------------------------
class DDPNet(Classifier):
    def __init__(self):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 4),
        )
        super().__init__(net, n=64, batch_size=8)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_moments_describe_the_global_batch_and_grad_norms_the_synced_grads(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # the sampler's seed is then 0
    logger = CSVLogger(tmp_path, name="csv", version=0)
    cbs = [
        ActivationMoments(num_units=4, quantile_samples=10_000),
        GradientNorms(),
    ]
    trainer = cpu_trainer(
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        logger=logger,
        callbacks=cbs,
        log_every_n_steps=1,
    )
    trainer.fit(DDPNet())
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        row = {k: v for r in csv.DictReader(f) if r["step"] == "0" for k, v in r.items() if v}

    # brute force: each rank's first batch, as Lightning's DistributedSampler (shuffled, seed 0)
    # draws it, goes through the untouched initial model; BN normalises each by its own stats
    ref = DDPNet()
    ds = random_images(64, seed=0)
    x, y = ds.tensors
    shards = []
    for r in range(2):
        idx = list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0))[:8]
        shards.append((x[idx], y[idx]))
    outs, grads = [], []
    for xs, ys in shards:
        ref.zero_grad()
        outs.append(ref.net[:2](xs).detach().double())
        nn.functional.cross_entropy(ref(xs), ys).backward()
        grads.append([p.grad.double().clone() for p in ref.parameters()])
    full = torch.cat(outs)
    mean, var = ref_moments(full.flatten().tolist())
    assert float(row["activation/net.1/mean"]) == pytest.approx(mean, abs=1e-6)
    assert float(row["activation/net.1/std"]) == pytest.approx(math.sqrt(var), rel=1e-5)
    p50 = ref_quantile(full.flatten().tolist(), 0.5)
    assert float(row["activation/net.1/p50"]) == pytest.approx(p50, rel=1e-5, abs=1e-6)
    for u in range(4):
        um, _ = ref_moments(full[:, u].flatten().tolist())
        assert float(row[f"activation/net.1/unit{u}_mean"]) == pytest.approx(um, abs=1e-6)
    synced = [(a + b) / 2 for a, b in zip(*grads, strict=True)]  # DDP averages over ranks
    total = math.sqrt(sum(g.pow(2).sum().item() for g in synced))
    assert float(row["grad_norm/total"]) == pytest.approx(total, rel=1e-5)
    conv = math.sqrt(synced[0].pow(2).sum().item() + synced[1].pow(2).sum().item())
    assert float(row["grad_norm/net.0"]) == pytest.approx(conv, rel=1e-5)


def test_log_spaced_schedule_logs_due_steps_with_deltas():
    from lightning_norm.schedule import StepSchedule

    logger = MemoryLogger()
    cb = ActivationMoments(log_spaced=True, points_per_octave=2, num_units=2)
    model = Classifier(n=160, batch_size=16)
    cpu_trainer(callbacks=[cb], logger=logger, max_steps=10).fit(model)
    logged = logger.by_step("activation/")
    schedule = StepSchedule(1, log_spaced=True, points_per_octave=2)
    assert sorted(logged) == [s for s in range(10) if schedule.is_due(s)] == [0, 1, 2, 3, 4, 6, 8]
    for step in sorted(logged)[1:]:  # the step before each due step was recorded for the deltas
        assert logged[step]["activation/net.1/delta_var"] >= 0


def test_two_instances_coexist_in_one_trainer_and_checkpoint(tmp_path):
    a = ActivationMoments(num_units=1, seed=0)
    b = ActivationMoments(num_units=2, seed=1, capture="input", every_n_steps=2)
    logger = MemoryLogger()
    trainer = cpu_trainer(callbacks=[a, b], logger=logger, max_steps=2)
    trainer.fit(Classifier())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key] == a.state_dict() and saved[b.state_key] == b.state_dict()
    assert len(saved[a.state_key]["units"]["net.1"]) == 1
    assert len(saved[b.state_key]["units"]["net.1"]) == 2
    # both wrote under the same names at step 0 (same layers); the output one alone at step 1
    steps = [step for step, m in logger.rows if "activation/net.1/mean" in m]
    assert steps == [0, 0, 1]
