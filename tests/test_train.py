"""The training loop, the schedule, the optimizer and the sparsity subgradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimcore.models import build_model
from slimcore.penalty import GammaPenalty, PenaltySpec, gamma_magnitudes
from slimcore_pipeline.config import RuntimeConfig, TrainConfig
from slimcore_pipeline.data import make_loader
from slimcore_pipeline.runtime import current_context
from slimcore_pipeline.train import NonFiniteLossError, Trainer, lr_factor, make_optimizer

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0, milestones=[1], weight_decay=5e-4)


def _data(n: int = 64, size: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 3, size, size, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def _trainer(cfg: TrainConfig = CFG, sparsity: float = 0.0, data: TensorDataset | None = None) -> Trainer:
    torch.manual_seed(0)
    runtime = RuntimeConfig()
    model = build_model("vgg16_bn", 4, "cifar", 0.125)
    train = make_loader(data or _data(), cfg.batch_size, train=True, seed=0, runtime=runtime)
    test = make_loader(_data(32, seed=1), 32, train=False, seed=0, runtime=runtime)
    return Trainer(model, cfg, current_context(runtime), train, test, desc="t", penalty=PenaltySpec(sparsity))


def test_schedule_warms_up_linearly_then_steps_down() -> None:
    cfg = TrainConfig(epochs=10, warmup_epochs=2, milestones=[5, 8], lr_decay=0.1)
    steps = 4
    assert lr_factor(cfg, 0, steps) == pytest.approx(1 / 8)
    assert lr_factor(cfg, 7, steps) == pytest.approx(1.0)
    assert lr_factor(cfg, 8, steps) == 1.0
    assert lr_factor(cfg, 5 * steps, steps) == pytest.approx(0.1)
    assert lr_factor(cfg, 8 * steps, steps) == pytest.approx(0.01)


def test_no_weight_decay_on_batchnorm_or_bias() -> None:
    model = build_model("resnet50", 10, "cifar", 0.125)
    opt = make_optimizer(model, TrainConfig(weight_decay=1e-4))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        is_bn_or_bias = p.ndim == 1
        assert (id(p) in decayed) != is_bn_or_bias, name


def test_l1_subgradient_is_added_to_every_gamma() -> None:
    model = build_model("mobilenet_v2", 10, "cifar", 0.125)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        bns[0].weight[0] = -0.5
    for m in bns:
        m.weight.grad = torch.zeros_like(m.weight)
    GammaPenalty(model, 0.01, "l1").before_step_()
    assert bns[0].weight.grad[0] == pytest.approx(-0.01)
    assert all(torch.allclose(m.weight.grad[1:], torch.full_like(m.weight[1:], 0.01)) for m in bns)
    assert all(m.bias.grad is None for m in bns)  # beta is not penalised
    GammaPenalty(model, 0.0, "l1").before_step_()
    assert bns[0].weight.grad[0] == pytest.approx(-0.01)  # strength 0: untouched


def test_penalty_sees_unscaled_gradients_under_a_grad_scaler() -> None:
    """The seed's bug: adding the penalty to scaled gradients divides it by the loss scale."""
    torch.manual_seed(0)
    model = build_model("vgg16_bn", 4, "cifar", 0.125)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    gamma = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).weight
    true_grad = torch.autograd.grad(loss, gamma, retain_graph=True)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    GammaPenalty(model, 1e-3, "l1").before_step_()
    assert torch.allclose(gamma.grad, true_grad + 1e-3 * gamma.sign(), atol=1e-6)


def test_fit_trains_and_sparsity_shrinks_gammas() -> None:
    dense = _trainer()
    history = dense.fit()
    assert [h.epoch for h in history] == [1, 2]
    assert history[-1].train_loss < history[0].train_loss + 1.0
    sparse = _trainer(TrainConfig(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0, milestones=[]), sparsity=0.5)
    sparse.fit()
    # 8 steps x lr 0.05 x 0.5 pull every |gamma| down by ~0.2 beyond what the loss does
    assert gamma_magnitudes(sparse.model).mean() < gamma_magnitudes(dense.model).mean() - 0.1


def test_nan_loss_stops_at_once_with_epoch_and_step() -> None:
    data = _data()
    data.tensors[0][20] = float("nan")  # lands in some batch of epoch 1
    trainer = _trainer(data=data)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step \d+/4"):
        trainer.fit()


def test_resume_after_interruption_gives_identical_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, warmup_epochs=1, milestones=[2])
    full = _trainer(cfg)
    full.fit()

    state = tmp_path / "state.pt"
    interrupted = _trainer(cfg)
    original = Trainer._train_epoch

    def stop_in_epoch_3(self: Trainer, epoch: int, on_step):  # type: ignore[no-untyped-def]
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, on_step)

    monkeypatch.setattr(Trainer, "_train_epoch", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(state_path=state, fingerprint="run")
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    assert state.is_file()

    torch.manual_seed(123)  # a fresh process would not share the RNG state either
    resumed = _trainer(cfg)
    assert resumed.try_resume(state, "run") and resumed.start_epoch == 2
    resumed.fit(state_path=state, fingerprint="run")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in full.history]

    stale = _trainer(cfg)
    assert not stale.try_resume(state, "other settings")  # a different run's state is ignored


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+GradScaler"])
def test_mixed_precision_and_channels_last_paths_train(amp_dtype: torch.dtype) -> None:
    """The GPU code paths (autocast, GradScaler under fp16, channels_last), exercised on CPU.

    Production runs enable them on CUDA only (runtime.py); here the Context is built by hand so
    CI without a GPU still runs every branch of the loop.
    """
    from dataclasses import replace

    torch.manual_seed(0)
    runtime = RuntimeConfig()
    ctx = replace(current_context(runtime), amp_dtype=amp_dtype, channels_last=True)
    assert ctx.use_grad_scaler == (amp_dtype == torch.float16)
    model = build_model("vgg16_bn", 4, "cifar", 0.125)
    train = make_loader(_data(), 16, train=True, seed=0, runtime=runtime)
    trainer = Trainer(model, CFG, ctx, train, None, desc="amp", penalty=PenaltySpec(1e-3))
    assert trainer.scaler.is_enabled() == ctx.use_grad_scaler
    before = [p.detach().clone() for p in model.parameters()]
    history = trainer.fit()
    assert all(torch.isfinite(torch.tensor(h.train_loss)) for h in history)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
