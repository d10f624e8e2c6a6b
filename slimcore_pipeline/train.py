"""One training loop for baseline, sparse and fine-tune runs.

SGD with momentum, linear warmup then multistep decay, label smoothing, no weight decay on BN
parameters or biases, optional L1 sparsity on BN gammas, AMP and DistributedDataParallel on
GPUs, a rich progress bar, per-epoch curves through dvclive, an evaluation of the validation
split after every epoch (and of the test split only when ``eval_test`` asks), and a resumable
state saved after every epoch: a run killed at any point continues from its last finished epoch and, on CPU,
ends with exactly the weights an uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from slimcore.checkpoint import CheckpointError, safe_torch_load
from slimcore.errors import ParamsError
from slimcore.penalty import PenaltySpec, gamma_magnitudes
from slimcore_pipeline.config import TrainConfig
from slimcore_pipeline.console import console
from slimcore_pipeline.process import torch_save
from slimcore_pipeline.runtime import Context, all_reduce_sum, evaluate


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf: training stops before anything is saved from this epoch."""


@dataclass
class EpochRecord:
    """What one epoch did (one row of the training curves); a split not evaluated is NaN
    (``val_*``: no validation images; ``test_*``: without ``eval_test``)."""

    epoch: int
    lr: float
    train_loss: float
    train_top1: float
    val_top1: float
    val_top5: float
    test_top1: float
    test_top5: float
    gamma_mean: float
    gamma_small: float  # fraction of |gamma| below 1e-2


@dataclass
class EpochTiming:
    """Wall-clock figures of one epoch: kept apart from :class:`EpochRecord`, which is what
    checkpoints store, so that the same inputs always give the same checkpoint bytes."""

    epoch: int
    seconds: float  # training steps and the evaluation passes
    images: int  # training images seen by all processes

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD; weight decay on conv/linear weights only (never on BN parameters or biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warmup, then x lr_decay per milestone."""
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    epoch = step // max(1, steps_per_epoch)
    return cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, batches: int, ctx: Context) -> None:
    """Recompute every BatchNorm's running statistics as the plain average over ``batches``
    training batches, with the weights as they are now ("precise BN").

    The running averages a training epoch leaves lag behind weights that changed quickly; with a
    sparsity penalty shrinking gammas every step they overestimate the variance 3-4x, and a
    model at 97% train top-1 evaluated at chance.  Recalibrating changes no gradient, only what
    evaluation (and pruning, which folds these statistics) sees.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches <= 0 or not bns:
        return
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    try:
        for step, (x, _) in enumerate(loader):
            if step >= batches:
                break
            x = x.to(ctx.device, non_blocking=True)
            if ctx.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with ctx.autocast():
                model(x)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)


class _Curves:
    """Per-epoch curves through dvclive (metrics.json + plot TSVs that `dvc plots` reads)."""

    def __init__(self, directory: Path | None) -> None:
        self.live = None
        self.directory = directory  # opened at the first epoch: a run that fails before one writes nothing

    def log(self, rec: EpochRecord) -> None:
        if self.directory is None:
            return
        if self.live is None:
            from dvclive import Live

            self.live = Live(dir=str(self.directory), save_dvc_exp=False, dvcyaml=None, report=None)
        for key, value in (("train/loss", rec.train_loss), ("train/top1", rec.train_top1),
                           ("val/top1", rec.val_top1), ("test/top1", rec.test_top1), ("lr", rec.lr),
                           ("bn/gamma_below_1e-2", rec.gamma_small)):
            if not math.isnan(value):  # a split not evaluated has no curve
                self.live.log_metric(key, round(value, 6))
        self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


@dataclass
class Trainer:
    """Trains ``model`` in place with one schedule; see :meth:`fit`.

    After every epoch the main process evaluates ``val_loader`` (the validation split; None or
    empty: not evaluated) and ``test_loader`` (None unless ``train.eval_test`` asked for it).
    """

    model: nn.Module
    cfg: TrainConfig
    ctx: Context
    train_loader: DataLoader
    val_loader: DataLoader | None
    desc: str = "train"
    # the penalty on BN gammas (None: none), built for this run's steps per epoch and epochs
    penalty: PenaltySpec | None = None
    test_loader: DataLoader | None = None  # evaluated after every epoch too (train.eval_test)
    # prox/group: re-resolves the penalty's target from the model at the start of every epoch (penalty.target
    # auto: the share of BN channels the prune targets remove from the model as it is then)
    retarget: Callable[[nn.Module], float] | None = None

    def __post_init__(self) -> None:
        self.model.to(self.ctx.device)
        if self.ctx.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if self.ctx.distributed:
            ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ParamsError(
                f"batch_size={self.cfg.batch_size} x {self.ctx.world_size} process(es) is larger "
                f"than the training set ({len(self.train_loader.dataset)} images)"  # type: ignore[arg-type]
            )
        self.gamma_penalty = (self.penalty or PenaltySpec(0.0)).build(self.model, self.steps_per_epoch,
                                                                       self.cfg.epochs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(self.cfg, s, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.ctx.use_grad_scaler)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.cfg.label_smoothing)
        self.history: list[EpochRecord] = []
        self.timings: list[EpochTiming] = []  # wall-clock, never part of a checkpoint
        self.start_epoch = 0

    # ---------------------------------------------------------------- resumable state
    def state_dict(self, fingerprint: str) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint,
            "epoch": len(self.history),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "history": [asdict(r) for r in self.history],
            "timings": [asdict(t) for t in self.timings],
        }

    def try_resume(self, path: Path, fingerprint: str) -> bool:
        """Continue from a saved state of the same run; a stale or foreign state is ignored."""
        if not path.is_file():
            return False
        try:
            state = safe_torch_load(path, map_location=self.ctx.device)
        except CheckpointError as err:
            console.log(f"[yellow]ignoring unreadable resume state[/]: {err}")
            return False
        if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
            console.log(f"[yellow]ignoring resume state from different settings[/]: {path}")
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state({k: (v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v])
                        for k, v in state["rng"].items()})
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.timings = [EpochTiming(**t) for t in state.get("timings", [])]
        self.start_epoch = int(state["epoch"])
        self.gamma_penalty.steps = self.start_epoch * self.steps_per_epoch
        console.log(f"{self.desc}: resuming after epoch {self.start_epoch}/{self.cfg.epochs} from {path}")
        return True

    # ---------------------------------------------------------------- training
    def _train_epoch(self, epoch: int, on_step: Callable[[int, Callable[[], tuple[float, float]]], None]
                     ) -> tuple[float, float, int]:
        """One pass over the training data: mean loss, top-1 and images seen (all processes)."""
        self.net.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        device = self.ctx.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for step, (x, y) in enumerate(self.train_loader):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if self.ctx.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.ctx.autocast():
                logits = self.net(x)
                loss = self.criterion(logits, y)
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLossError(
                    f"{self.desc}: loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}/"
                    f"{self.steps_per_epoch} (lr {self.scheduler.get_last_lr()[0]:.4g}); lower "
                    "the learning rate or check the data; nothing from this epoch was saved"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)  # the penalty must see unscaled gradients
            self.gamma_penalty.before_step_()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.gamma_penalty.after_step_(self.optimizer.param_groups[-1]["lr"])
            self.scheduler.step()
            n = y.shape[0]
            seen += n
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == y).sum()
            # running stats as a thunk: reading them waits for the GPU, so only a visible bar does
            on_step(step, lambda ls=loss_sum, c=correct, n=seen: (float(ls) / n, float(c) / n))
        total_loss, total_correct, total_seen = all_reduce_sum(
            [float(loss_sum), float(correct), float(seen)], self.ctx)
        return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1), int(total_seen)

    def fit(self, state_path: Path | None = None, fingerprint: str = "",
            curves_dir: Path | None = None) -> list[EpochRecord]:
        """Train to ``cfg.epochs``, resuming from ``state_path`` when it holds this run's state."""
        if state_path is not None:
            self.try_resume(state_path, fingerprint)
        curves = _Curves(curves_dir if self.ctx.is_main else None)
        for rec in self.history:  # a resumed run rewrites the curves it already had
            curves.log(rec)
        show = self.ctx.is_main and console.is_terminal
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                            console=console, transient=True, disable=not show)
        try:
            with progress:
                for epoch in range(self.start_epoch, self.cfg.epochs):
                    if self.retarget is not None and self.gamma_penalty.active:
                        self.gamma_penalty.target = float(self.retarget(self.model))
                    rec, timing = self._run_epoch(epoch, progress)
                    self.history.append(rec)
                    self.timings.append(timing)
                    if self.ctx.is_main:
                        if state_path is not None:
                            torch_save(self.state_dict(fingerprint), state_path)
                        curves.log(rec)
                        evaluated = "".join(f"  {name} {value:.2%}" for name, value in
                                            (("val", rec.val_top1), ("test", rec.test_top1))
                                            if not math.isnan(value))
                        left = self.cfg.epochs - epoch - 1  # ETA: the mean of the last 3 epochs
                        recent = [t.seconds for t in self.timings[-3:]]
                        eta = f"  ETA {left * sum(recent) / len(recent):.0f}s" if left else "  last epoch"
                        console.log(
                            f"{self.desc} epoch {epoch + 1}/{self.cfg.epochs}  loss {rec.train_loss:.4f}  "
                            f"train {rec.train_top1:.2%}{evaluated}  lr {rec.lr:.4g}  "
                            f"|gamma|<1e-2 {rec.gamma_small:.1%}  {timing.seconds:.1f}s "
                            f"({timing.images_per_second:.0f} img/s){eta}"
                        )
        finally:
            curves.close()
        return self.history

    def _run_epoch(self, epoch: int, progress: Progress) -> tuple[EpochRecord, EpochTiming]:
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        task = progress.add_task(f"{self.desc} {epoch + 1}/{self.cfg.epochs}",
                                 total=self.steps_per_epoch, stats="")

        def on_step(step: int, running: Callable[[], tuple[float, float]]) -> None:
            if progress.disable:
                return
            if step % 10 == 9 or step == self.steps_per_epoch - 1:  # a host sync every 10 steps at most
                loss, acc = running()
                progress.update(task, completed=step + 1, stats=f"loss {loss:.3f} acc {acc:.1%}")
            else:
                progress.update(task, completed=step + 1)

        train_loss, train_top1, images = self._train_epoch(epoch, on_step)
        progress.remove_task(task)
        recalibrate_bn(self.model, self.train_loader, self.cfg.bn_recalibrate_batches, self.ctx)
        scores = {}
        for split, loader in (("val", self.val_loader), ("test", self.test_loader)):
            scores[split] = {"top1": math.nan, "top5": math.nan}
            if loader is not None and len(loader.dataset) and self.ctx.is_main:  # type: ignore[arg-type]
                scores[split] = evaluate(self.model, loader, self.ctx)
        gammas = gamma_magnitudes(self.model)
        record = EpochRecord(
            epoch=epoch + 1, lr=lr, train_loss=train_loss, train_top1=train_top1,
            val_top1=scores["val"]["top1"], val_top5=scores["val"]["top5"],
            test_top1=scores["test"]["top1"], test_top5=scores["test"]["top5"],
            gamma_mean=float(gammas.mean()) if gammas.numel() else 0.0,
            gamma_small=float((gammas < 1e-2).float().mean()) if gammas.numel() else 0.0,
        )
        return record, EpochTiming(epoch=epoch + 1, seconds=time.perf_counter() - start, images=images)


__all__ = ["EpochRecord", "EpochTiming", "NonFiniteLossError", "Trainer", "lr_factor", "make_optimizer",
           "recalibrate_bn"]
