"""All callbacks in one Trainer: they must not disturb training or each other's measurements."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_norm.callbacks import ActivationMoments, GradientNorms, ICSDrift, LossLandscape
from lightning_norm.probes.replay import RngState, StepReplay, is_replaying
from tests.helpers import Classifier, cpu_trainer


def fit(callbacks, log_root):
    L.seed_everything(0)
    module = Classifier(n=64, batch_size=16)
    logger = TensorBoardLogger(log_root, name="run", version=0)
    cpu_trainer(max_steps=6, callbacks=callbacks, logger=logger).fit(module)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}
    return module, scalars


def test_probes_neither_change_training_nor_pollute_activation_statistics(tmp_path):
    bare, _ = fit([], tmp_path / "bare")
    alone, acts_alone = fit([ActivationMoments()], tmp_path / "alone")
    together, acts_together = fit(
        [
            ActivationMoments(),
            GradientNorms(),
            ICSDrift(every_n_steps=2),
            LossLandscape(every_n_steps=2, slice_at_end=False),
        ],
        tmp_path / "together",
    )
    for a, b, c in zip(
        bare.state_dict().values(),
        alone.state_dict().values(),
        together.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b) and torch.equal(a, c)
    activation_keys = [k for k in acts_alone if k.startswith("activation/")]
    assert "activation/net.1/mean" in activation_keys
    # The probes' replayed forwards (at other parameter values) reach the same hooked modules;
    # the logged statistics must still be those of the real training step only.
    for key in activation_keys:
        assert acts_together[key] == acts_alone[key], key
    assert any(k.startswith("ics/") for k in acts_together)
    assert "landscape/total/beta_eff" in acts_together
    assert "grad_norm/total" in acts_together


def test_is_replaying_is_true_only_inside_a_replay():
    seen = []
    net = torch.nn.Linear(2, 1)
    x = torch.randn(4, 2)

    def compute_loss(module):
        seen.append(is_replaying())
        return module(x).pow(2).mean()

    replay = StepReplay(net, compute_loss, rng_state=RngState.capture())
    assert not is_replaying()
    replay.loss()
    replay.loss_and_grad(wrt=["weight"])
    assert seen == [True, True]
    assert not is_replaying()


def test_landscape_without_logger_writes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callback = LossLandscape(every_n_steps=1)
    cpu_trainer(max_steps=2, callbacks=[callback]).fit(Classifier())
    assert callback.last_slice is not None  # the end-of-fit slice still ran
    assert list(tmp_path.iterdir()) == []


def _noisy_net():
    from torch import nn

    from lightning_norm.layers import NoisyBatchNorm

    generator = torch.Generator().manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        NoisyBatchNorm(4, generator=generator),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    )


def test_probes_replay_and_restore_a_layer_s_own_generator(tmp_path):
    """Noisy BN with its own torch.Generator: probes replay its draws and leave it untouched."""

    def run(callbacks):
        L.seed_everything(0)
        module = Classifier(net=_noisy_net(), n=64, batch_size=16)
        cpu_trainer(max_steps=4, callbacks=callbacks).fit(module)
        return module, module.net[1].generator.get_state()

    bare, bare_gen = run([])
    probed, probed_gen = run(
        [ICSDrift(every_n_steps=1), LossLandscape(every_n_steps=1, slice_at_end=False)]
    )
    assert torch.equal(bare_gen, probed_gen)
    for a, b in zip(bare.state_dict().values(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_replay_reproduces_the_noise_of_a_layer_s_own_generator():
    net = _noisy_net()
    x = torch.randn(8, 3, 5, 5)
    rng = RngState.capture(net)
    real = net(x).sum()
    after_real = net[1].generator.get_state()
    replay = StepReplay(net, lambda m: m(x).sum(), rng_state=rng)
    torch.testing.assert_close(replay.loss(), real.detach(), rtol=0, atol=0)
    assert torch.equal(net[1].generator.get_state(), after_real)


@pytest.mark.parametrize("surgery_first", [True, False])
def test_monitors_follow_a_surgery_listed_in_either_order(surgery_first):
    from lightning_norm.callbacks import NormSurgery
    from lightning_norm.layers import LpBatchNorm
    from tests.helpers import MemoryLogger

    monitors = [ActivationMoments(), GradientNorms()]
    surgery = NormSurgery("lp1")
    callbacks = [surgery, *monitors] if surgery_first else [*monitors, surgery]
    logger = MemoryLogger()
    module = Classifier()
    cpu_trainer(max_steps=2, callbacks=callbacks, logger=logger).fit(module)
    assert isinstance(module.net[1], LpBatchNorm)
    assert [name for name, _ in monitors[0].layers] == ["net.1", "net.5"]
    assert monitors[0].layers[0][1] is module.net[1]
    keys = set().union(*(row[1] for row in logger.rows))
    assert {"activation/net.1/mean", "activation/net.5/std"} <= keys
    assert {"grad_norm/net.1", "weight_norm/net.5"} <= keys
