"""GradientNorms in real (CPU) fits, every number against a float64 brute force."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_norm.callbacks import GradientNorms
from lightning_norm.errors import ConfigurationError
from lightning_norm.selection import LayerSelection
from tests.helpers import Classifier, MemoryLogger, cpu_trainer, small_convnet


def norm(tensors, p=2.0) -> float:
    v = torch.cat([t.double().flatten() for t in tensors])
    if math.isinf(p):
        return v.abs().max().item()
    return v.abs().pow(p).sum().item() ** (1 / p)


class Recording(Classifier):
    """Records, per optimizer step, the grads the optimizer gets and the weights around it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: int | None = None

    def on_before_optimizer_step(self, optimizer):
        step = self.trainer.global_step
        self.grads[step] = {n: p.grad.detach().clone() for n, p in self.named_parameters()}
        self.before[step] = {n: p.detach().clone() for n, p in self.named_parameters()}
        self._pending = step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._pending is not None:
            self.after[self._pending] = {n: p.detach().clone() for n, p in self.named_parameters()}
            self._pending = None


def layer_params(d: dict[str, torch.Tensor], layer: str) -> list[torch.Tensor]:
    return [t for n, t in d.items() if n.startswith(layer + ".")]


def test_values_match_brute_force_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = Recording(small_convnet(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    logger = MemoryLogger()
    cb = GradientNorms(every_n_steps=2)
    cpu_trainer(callbacks=[cb], logger=logger, max_steps=5).fit(model)
    logged = logger.by_step("")
    assert sorted(logged) == [0, 2, 4]
    layers = ["net.0", "net.1", "net.4", "net.5", "net.9"]  # every module with parameters
    for step in (0, 2, 4):
        m = logged[step]
        g, w0, w1 = model.grads[step], model.before[step], model.after[step]
        for layer in [*layers, "total"]:
            pick = (
                (lambda d: list(d.values()))
                if layer == "total"
                else (lambda d, name=layer: layer_params(d, name))
            )
            assert m[f"grad_norm/{layer}"] == pytest.approx(norm(pick(g)), rel=1e-5)
            assert m[f"weight_norm/{layer}"] == pytest.approx(norm(pick(w0)), rel=1e-5)
            delta = [a - b for a, b in zip(pick(w1), pick(w0), strict=True)]
            ratio = norm(delta) / norm(pick(w0))
            assert m[f"update_ratio/{layer}"] == pytest.approx(ratio, rel=1e-4)
            dist = [a - b for a, b in zip(pick(w0), pick(init), strict=True)]
            assert m[f"dist_from_init/{layer}"] == pytest.approx(norm(dist), rel=1e-4, abs=1e-7)
    assert m["update_ratio/total"] > 0


@pytest.mark.parametrize("p", [1.0, float("inf")])
def test_other_norm_types(p):
    torch.manual_seed(0)
    model = Recording(small_convnet())
    logger = MemoryLogger()
    cpu_trainer(callbacks=[GradientNorms(norm_type=p)], logger=logger, max_steps=2).fit(model)
    for step, m in logger.by_step("grad_norm/").items():
        assert m["grad_norm/total"] == pytest.approx(norm(model.grads[step].values(), p), rel=1e-5)
        g0 = layer_params(model.grads[step], "net.0")
        assert m["grad_norm/net.0"] == pytest.approx(norm(g0, p), rel=1e-5)


def test_gradient_accumulation_one_value_per_optimizer_step():
    torch.manual_seed(0)
    model = Recording(small_convnet(), batch_size=8)
    logger = MemoryLogger()
    trainer = cpu_trainer(
        callbacks=[GradientNorms()], logger=logger, max_steps=3, accumulate_grad_batches=2
    )
    trainer.fit(model)
    logged = logger.by_step("grad_norm/")
    assert sorted(logged) == [0, 1, 2] and sorted(model.grads) == [0, 1, 2]
    for step in (0, 1, 2):  # the accumulated (summed) gradient of both micro-batches
        total = norm(model.grads[step].values())
        assert logged[step]["grad_norm/total"] == pytest.approx(total, rel=1e-5)


def test_clipping_read_before_and_after():
    torch.manual_seed(0)
    model = Recording(small_convnet())
    logger = MemoryLogger()
    cb = GradientNorms(log_clipped=True)
    trainer = cpu_trainer(callbacks=[cb], logger=logger, max_steps=2, gradient_clip_val=1e-3)
    trainer.fit(model)
    for step, m in logger.by_step("grad_norm").items():
        unclipped = norm(model.grads[step].values())
        assert unclipped > 1e-2
        assert m["grad_norm/total"] == pytest.approx(unclipped, rel=1e-5)
        assert m["grad_norm_clipped/total"] == pytest.approx(1e-3, rel=1e-3)


class TwoOptimizers(Classifier):
    """Manual optimization: the convs and the head have their own optimizers."""

    def __init__(self):
        super().__init__(small_convnet())
        self.automatic_optimization = False
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        opt_body, opt_head = self.optimizers()
        x, y = batch
        first = self.trainer.global_step
        loss = nn.functional.cross_entropy(self(x), y)
        opt_body.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        self.seen[first] = {n: p.grad.detach().clone() for n, p in self.named_parameters()}
        self.seen[first].update({"w:" + n: p.detach().clone() for n, p in self.named_parameters()})
        opt_body.step()
        opt_head.step()

    def configure_optimizers(self):
        head = list(self.net[9].parameters())
        body = [p for p in self.parameters() if all(p is not h for h in head)]
        return torch.optim.SGD(body, lr=0.1), torch.optim.Adam(head, lr=0.01)


def test_manual_optimization_with_two_optimizers():
    torch.manual_seed(0)
    model = TwoOptimizers()
    logger = MemoryLogger()
    cpu_trainer(callbacks=[GradientNorms()], logger=logger, max_steps=6).fit(model)
    logged = logger.by_step("")
    assert sorted(logged) == [0, 2, 4]  # global_step counts both optimizers' steps
    for step, m in logged.items():
        grads = {n: t for n, t in model.seen[step].items() if not n.startswith("w:")}
        assert m["grad_norm/total"] == pytest.approx(norm(grads.values()), rel=1e-5)
        assert m["grad_norm/net.9"] == pytest.approx(norm(layer_params(grads, "net.9")), rel=1e-5)
        assert m["grad_norm/net.0"] == pytest.approx(norm(layer_params(grads, "net.0")), rel=1e-5)
        assert m["update_ratio/net.9"] > 0 and m["update_ratio/net.0"] > 0


def test_resumed_run_measures_distance_from_the_first_init(tmp_path):
    torch.manual_seed(0)
    model = Recording(small_convnet())
    init = copy.deepcopy(model.state_dict())
    trainer = cpu_trainer(callbacks=[GradientNorms()], max_steps=2, default_root_dir=tmp_path)
    trainer.fit(model)
    path = tmp_path / "resume.ckpt"
    trainer.save_checkpoint(path)

    resumed = Recording(small_convnet())  # other random weights: the checkpoint replaces them
    logger = MemoryLogger()
    cb = GradientNorms()
    cpu_trainer(callbacks=[cb], logger=logger, max_steps=4).fit(resumed, ckpt_path=path)
    m = logger.by_step("dist_from_init/")[3]
    names = [n for n, _ in resumed.named_parameters()]
    dist = [resumed.before[3][n] - init[n] for n in names]
    assert m["dist_from_init/total"] == pytest.approx(norm(dist), rel=1e-5)
    assert m["dist_from_init/total"] > 0
    state = cb.state_dict()["init"]
    assert torch.equal(state["net.0.weight"], init["net.0.weight"])


def test_errors_and_state_key():
    with pytest.raises(ConfigurationError, match="norm_type"):
        GradientNorms(norm_type=0)
    with pytest.raises(ConfigurationError, match="norm_type"):
        GradientNorms(norm_type="fro")
    with pytest.raises(ConfigurationError, match="every_n_steps"):
        GradientNorms(every_n_steps=-1)
    cb = GradientNorms(layers=LayerSelection(types=(nn.ReLU,)))
    with pytest.raises(ConfigurationError, match="trainable parameters"):
        cpu_trainer(callbacks=[cb]).fit(Classifier())
    assert GradientNorms().state_key != GradientNorms(norm_type=1).state_key
    cb = GradientNorms()
    cb.load_state_dict({})  # older checkpoints without the field
    assert cb.state_dict() == {}


def test_fp16_amp_gradients_are_read_unscaled():
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = Recording(small_convnet())
    init = copy.deepcopy(model.net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    logger = MemoryLogger()
    trainer = cpu_trainer(callbacks=[GradientNorms()], logger=logger, max_steps=1, plugins=[plugin])
    trainer.fit(model)
    assert trainer.precision_plugin.scaler is scaler and scaler._scale is not None  # it scaled
    # reference: the first batch through the initial weights under the same autocast, unscaled
    x, y = next(iter(model.train_dataloader()))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(init(x), y)
    loss.backward()
    ref = norm([p.grad for p in init.parameters()])
    logged = logger.by_step("grad_norm/")[0]["grad_norm/total"]
    assert logged == pytest.approx(ref, rel=1e-2)  # not 1024x (the loss scale) larger
    assert logged == pytest.approx(norm(model.grads[0].values()), rel=1e-6)


def test_activation_deltas_with_two_manual_optimizers():
    """global_step advances by 2 per batch: the batch before a due step is still recorded."""
    from lightning_norm.callbacks import ActivationMoments

    torch.manual_seed(0)
    logger = MemoryLogger()
    cb = ActivationMoments(every_n_steps=4, num_units=2)
    cpu_trainer(callbacks=[cb], logger=logger, max_steps=10).fit(TwoOptimizers())
    logged = logger.by_step("activation/")
    assert sorted(logged) == [0, 4, 8]
    assert "activation/net.1/delta_mean" not in logged[0]
    assert "activation/net.1/delta_mean" in logged[8]  # batch at step 6 recorded (stride 2)
