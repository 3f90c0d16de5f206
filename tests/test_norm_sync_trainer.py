"""NormSync inside a Trainer: with NormSurgery in either order, checkpoint resume, 2-process DDP."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_norm import swap_norms
from lightning_norm.layers import BatchNorm, LpBatchNorm, NoisyBatchNorm
from lightning_norm.layers.sync import SyncLpBatchNorm, SyncNoisyBatchNorm
from lightning_norm.plugins import NormSync
from tests.helpers import Classifier, cpu_trainer, small_convnet

try:
    from lightning_norm.callbacks import NormSurgery
except ImportError:  # pragma: no cover - written before the callback existed
    NormSurgery = None

needs_surgery = pytest.mark.skipif(NormSurgery is None, reason="NormSurgery is not importable")


class SeenDuringFit(Callback):
    """Records the layer classes each training step runs with; checks cross-rank agreement."""

    def __init__(self):
        self.classes: set[type] = set()
        self.agree: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for m in pl_module.modules():
            if isinstance(m, (LpBatchNorm, NoisyBatchNorm)):
                self.classes.add(type(m))
        if trainer.world_size > 1:
            stats = torch.cat(
                [m.running_mean for m in pl_module.modules() if isinstance(m, LpBatchNorm)]
            )
            gathered = trainer.strategy.all_gather(stats)
            # Synchronized statistics: every rank holds the global batch's running estimates,
            # although each rank trains on different samples (DistributedSampler).
            assert torch.equal(gathered[0], gathered[1]), gathered
            self.agree.append(True)

    def state_dict(self):
        return {}


def ddp_in_process(**kwargs):
    """A one-process DDP Trainer: the strategy runs NormSync's apply/revert as in multi-process."""
    return cpu_trainer(strategy="ddp", devices=1, **kwargs)


@pytest.fixture
def no_process_group_left():
    """In-process DDP leaves a process group and launcher variables (LOCAL_RANK, WORLD_SIZE,
    MASTER_PORT, ...) in this process; later Trainers would think they were launched by
    torchrun. Restore both."""
    env = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def test_trainer_accepts_the_plugin(no_process_group_left):
    plugin = NormSync()
    trainer = cpu_trainer(strategy="ddp", devices=1, plugins=[plugin])
    assert trainer.strategy._layer_sync is plugin


def test_lightning_cli_builds_the_plugin_from_class_path(no_process_group_left, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["cli"])  # the config comes from `args` only
    cli = LightningCLI(
        Classifier,
        run=False,
        save_config_callback=None,
        seed_everything_default=False,
        args={
            "trainer": {
                "accelerator": "cpu",
                "devices": 1,
                "strategy": "ddp",
                "logger": False,
                "plugins": [
                    {
                        "class_path": "lightning_norm.plugins.NormSync",
                        "init_args": {"batchnorm": False},
                    }
                ],
            }
        },
    )
    plugin = cli.trainer.strategy._layer_sync
    assert isinstance(plugin, NormSync) and plugin.batchnorm is False


@needs_surgery
@pytest.mark.ddp
def test_norm_surgery_then_plugin_and_checkpoint_resume(tmp_path, no_process_group_left):
    torch.manual_seed(0)
    model = Classifier(small_convnet())
    swap_norms(model, "noisy_bn", include="net.1")  # swapped before fit (plugin sees it later)
    seen = SeenDuringFit()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = ddp_in_process(
        max_steps=3,
        callbacks=[NormSurgery("lp1"), seen, ckpt],
        plugins=[NormSync(batchnorm=False)],
        enable_checkpointing=True,
    )
    trainer.fit(model)
    # During fit: our layers ran as their synchronized versions (NormSurgery swapped first,
    # the strategy's setup then converted).
    assert seen.classes == {SyncNoisyBatchNorm, SyncLpBatchNorm}
    # After fit: the original classes are back, including the noisy BN's inner BatchNorm.
    assert type(model.net[1]) is NoisyBatchNorm and type(model.net[1].bn) is BatchNorm
    assert type(model.net[5]) is LpBatchNorm and model.net[5].p == 1.0
    assert not any("process_group" in m.__dict__ for m in model.modules())
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3
    assert (
        "net.5.running_scale" in state["state_dict"]
        and "net.1.bn.running_var" in state["state_dict"]
    )
    # The checkpoint of the converted model loads strictly into the unconverted one.
    model.load_state_dict(state["state_dict"], strict=True)

    # Resume, callbacks in the other order; the resumed weights are the checkpoint's.
    torch.manual_seed(1)
    resumed = Classifier(small_convnet())
    swap_norms(resumed, "noisy_bn", include="net.1")
    seen2 = SeenDuringFit()

    class CheckLoaded(Callback):
        def on_train_start(self, trainer, pl_module):
            torch.testing.assert_close(
                pl_module.net[5].running_scale, state["state_dict"]["net.5.running_scale"]
            )
            self.ok = True

    loaded = CheckLoaded()
    trainer2 = ddp_in_process(
        max_steps=5,
        callbacks=[seen2, loaded, NormSurgery("lp1")],
        plugins=[NormSync(batchnorm=False)],
    )
    trainer2.fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert loaded.ok and trainer2.global_step == 5
    assert seen2.classes == {SyncNoisyBatchNorm, SyncLpBatchNorm}


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_ddp_fit_synchronizes_lp_statistics():
    torch.manual_seed(0)
    model = Classifier(small_convnet(), batch_size=8)
    swap_norms(model, "lp1", include="net.1")
    swap_norms(model, "lpinf", include="net.5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = cpu_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_steps=2,
        callbacks=[SeenDuringFit()],
        plugins=[NormSync(batchnorm=False)],
    )
    trainer.fit(model)  # the callback's cross-rank assertion runs in both workers
    assert model.net[5].p == math.inf and type(model.net[5]) is LpBatchNorm
    # rank 0's trained weights came back to this process
    assert not torch.equal(model.state_dict()["net.1.running_mean"], before["net.1.running_mean"])
