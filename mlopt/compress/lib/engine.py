"""The one training engine behind every pass that trains (train, fine-tune, distill, later QAT).

It owns what must work the same everywhere: mixed precision (bf16 autocast on CPU and CUDA, fp16
with a gradient scaler on CUDA), data parallelism under torchrun (DistributedDataParallel with a
DistributedSampler), checkpoints written atomically every N steps and at each epoch end, exact
resume (model, optimizer, scheduler, scaler, RNG states and the position in the epoch), learning
rate schedules with warm-up, gradient clipping, early stopping, and the progress bar.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlopt.core import console
from mlopt.core.contracts import cli

from mlopt.core.errors import InputError, RunError
from mlopt.core.sections import Table
from mlopt.runtime import distributed
from mlopt.runtime.data import Dataset, require_labels
from mlopt.runtime.evaluation import evaluate_torch

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingConfig(BaseModel):
    """Optimiser, schedule, precision and checkpoint settings shared by every pass that trains."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(5, gt=0, description="training epochs", json_schema_extra=cli(short="-e"))
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of sgd")
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear learning-rate warm-up")
    step_epochs: int = Field(30, gt=0, description="step schedule: epochs between decays")
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    early_stopping: int | None = Field(
        None, gt=0, description="stop after this many epochs without a better validation accuracy; keep the best weights"
    )
    batch_size: int | None = Field(None, gt=0, description="per-process batch size; defaults to the data's batch_size")
    seed: int = 0
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision: bf16 (CPU, CUDA) or fp16 (CUDA)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int | None = Field(None, gt=0, description="also checkpoint every N optimiser steps")


@dataclass
class Objective:
    """What the engine minimises. The default is cross-entropy on the labels; distillation adds terms.

    `loss(model, x, y, indices)` returns (loss, logits); `indices` are the batch's positions in the
    train split (for cached teacher outputs). `modules` are extra trainable modules (for example
    feature projections) that are optimised, checkpointed and moved to the device with the model.
    """

    loss: Callable[[Any, Any, Any, Any], tuple[Any, Any]] | None = None
    modules: list[Any] = field(default_factory=list)
    to_device: Callable[[Any], None] | None = None


def resolve_device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but CUDA is not available")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _check_precision(amp: str, device: str) -> None:
    import torch

    if amp == "fp16" and device != "cuda":
        raise InputError("fp16 mixed precision needs CUDA; on the CPU use --amp bf16")
    if amp == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU does not support bf16; use --amp fp16")


def config_fingerprint(cfg: BaseModel, extra: Any = None) -> str:
    """A hash of everything that changes the trained result (a resume must match it)."""
    data = cfg.model_dump(mode="json", exclude={"checkpoint_every", "early_stopping"})
    return hashlib.sha256(json.dumps([data, extra], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _lr_factor(cfg: TrainingConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((step - warmup) // (cfg.step_epochs * steps_per_epoch))
        return 1.0

    return factor


def _epoch_batches(n: int, batch_size: int, epoch: int, seed: int, dist: distributed.Dist) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch (torch's DistributedSampler order)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # through a Python file, so a full disk raises OSError(ENOSPC) with its path
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)
        raise


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"checkpoint {path} is unreadable ({type(exc).__name__}); start again with --overwrite") from exc


@dataclass
class Progress:
    """Where training stands; checkpoints store it as a dict under "progress" (these fields are its keys)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seen: int = 0
    train_time: float = 0.0
    best_acc: float = -1.0
    best_epoch: int = 0
    stale: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0


@dataclass
class _Run:
    """What one call of `fit` trains with: the placed model, its optimiser and the progress so far."""

    cfg: TrainingConfig
    objective: Objective
    module: Any
    model: Any  # the module, or its DistributedDataParallel wrapper
    device: str
    dev: Any
    dist: distributed.Dist
    channels_last: bool
    opt: Any = None
    sched: Any = None
    scaler: Any = None
    params: list[Any] = field(default_factory=list)
    extra_params: list[Any] = field(default_factory=list)
    ckpt_path: Path | None = None
    fingerprint: str = ""
    progress: Progress = field(default_factory=Progress)
    best_weights: dict[str, Any] | None = None
    stopped_early: bool = False


def fit(
    module: Any,
    data: Dataset,
    cfg: TrainingConfig,
    batch_size: int,
    *,
    objective: Objective | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    fingerprint_extra: Any = None,
    label: str = "train",
) -> dict[str, Any]:
    """Train `module` in place on the train split; evaluate on validation after each epoch.

    Returns the metrics (final validation accuracy and loss, throughput, precision, history).
    The module ends on the CPU in eval mode.
    """
    require_labels(data, "training")
    run = _place(module, objective or Objective(), cfg)
    n = len(data.train)
    steps_per_epoch = len(_epoch_batches(n, batch_size, 0, cfg.seed, run.dist))
    _make_optimiser(run, steps_per_epoch)
    run.fingerprint = config_fingerprint(cfg, [fingerprint_extra, run.dist.world_size, batch_size, n])
    run.ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    if run.ckpt_path is not None and (resume or distributed.restarted()) and run.ckpt_path.is_file():
        _resume(run)
    train_set = _on_device(data.train, run.dev)
    with console.progress(label, total=cfg.epochs * steps_per_epoch) as bar:
        bar.advance(run.progress.step)
        while run.progress.epoch < cfg.epochs:
            _train_epoch(run, train_set, _epoch_batches(n, batch_size, run.progress.epoch, cfg.seed, run.dist), bar)
            _end_epoch(run, data, batch_size)
            _checkpoint(run)
    return _finish(run)


def _place(module: Any, objective: Objective, cfg: TrainingConfig) -> _Run:
    """Seed, pick the device, move the module and the objective's modules there, wrap for DDP."""
    import torch

    device = resolve_device(cfg.device)
    _check_precision(cfg.amp, device)
    dist = distributed.init(device)
    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    dev = torch.device(device, dist.local_rank) if device == "cuda" else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    # On CUDA, convolutional networks train faster in NHWC (channels-last) layout, which the tensor
    # cores use natively; most of all under fp16/bf16. The weights are saved contiguous either way.
    channels_last = device == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    module.to(dev, memory_format=torch.channels_last) if channels_last else module.to(dev)
    for extra in objective.modules:
        extra.to(dev)
    if objective.to_device:
        objective.to_device(dev)
    model = module
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(module, device_ids=[dist.local_rank] if device == "cuda" else None)
    return _Run(cfg, objective, module, model, device, dev, dist, channels_last)


def _make_optimiser(run: _Run, steps_per_epoch: int) -> None:
    import torch

    cfg = run.cfg
    run.params = [p for m in (run.module, *run.objective.modules) for p in m.parameters() if p.requires_grad]
    run.extra_params = [p for m in run.objective.modules for p in m.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        run.opt = torch.optim.AdamW(run.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        run.opt = torch.optim.SGD(run.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  nesterov=True)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, _lr_factor(cfg, steps_per_epoch))
    run.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
    # With fp16, GradScaler skips the optimiser step when gradients overflow; the scheduler still
    # steps, which is intended (the schedule follows steps taken), so its warning is noise.
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    # oneDNN hands back convolution gradients in its own (equivalent) strides; DDP copes, and says so.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def _resume(run: _Run) -> None:
    import torch

    ckpt = _load_checkpoint(run.ckpt_path)
    if ckpt.get("fingerprint") != run.fingerprint:
        raise InputError(
            f"the checkpoint in {run.ckpt_path.parent} was written with a different configuration; "
            "rerun with the original settings, or with --overwrite to start again"
        )
    run.module.load_state_dict(ckpt["model"])
    for extra, sd in zip(run.objective.modules, ckpt["extra_modules"]):
        extra.load_state_dict(sd)
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])
    if run.device == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    run.progress = Progress(**ckpt["progress"])
    run.best_weights = ckpt.get("best_weights")
    console.info(f"resuming from {run.ckpt_path} (epoch {run.progress.epoch + 1}, batch {run.progress.batch})")


def _checkpoint(run: _Run) -> None:
    import torch

    if run.ckpt_path is None or not run.dist.is_main:
        return
    run.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    _save_checkpoint(run.ckpt_path, {
        "fingerprint": run.fingerprint,
        "model": run.module.state_dict(),
        "extra_modules": [m.state_dict() for m in run.objective.modules],
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if run.device == "cuda" else None,
        "progress": asdict(run.progress),
        "best_weights": run.best_weights,
    })


def _train_epoch(run: _Run, train_set: Any, batches: list[list[int]], bar: Any) -> None:
    """Train the rest of the epoch from `progress.batch`, checkpointing every `checkpoint_every` steps."""
    import torch

    cfg, state = run.cfg, run.progress
    run.module.train()
    for extra in run.objective.modules:
        extra.train()
    started = time.perf_counter()
    # Running sums stay on the device: reading them forces a GPU sync, so that happens
    # only every few steps (progress display) and at checkpoints and epoch ends.
    sums = torch.zeros(2, dtype=torch.float64, device=run.dev)  # loss * samples, correct
    for indices in batches[state.batch :]:
        x, y = _collate(train_set, indices, run.dev)
        if run.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        _train_step(run, x, y, indices, sums)
        state.count += len(y)
        state.batch += 1
        state.step += 1
        if state.batch % _DISPLAY_EVERY == 0 or state.batch == len(batches):
            _flush(state, sums)
            elapsed = state.train_time + time.perf_counter() - started
            bar.advance(
                0, epoch=f"{state.epoch + 1}/{cfg.epochs}", loss=f"{state.loss_sum / state.count:.4f}",
                acc=f"{state.correct / state.count:.3f}",
                rate=f"{(state.seen + state.count) * run.dist.world_size / max(elapsed, 1e-9):.0f}/s",
            )
        bar.advance(1)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < len(batches):
            _flush(state, sums)
            state.train_time += time.perf_counter() - started
            started = time.perf_counter()
            _checkpoint(run)
    _flush(state, sums)
    if run.device == "cuda":
        torch.cuda.synchronize(run.dev)
    state.train_time += time.perf_counter() - started


def _train_step(run: _Run, x: Any, y: Any, indices: list[int], sums: Any) -> None:
    """One optimiser step; adds the batch's summed loss and correct count to `sums` (on the device)."""
    import torch
    import torch.nn.functional as F

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.cfg.amp)
    with torch.autocast(device_type=run.device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if run.objective.loss is not None:
            loss, logits = run.objective.loss(run.model, x, y, indices)
        else:
            logits = run.model(x)
            loss = F.cross_entropy(logits.float(), y)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.dist.enabled and run.extra_params:
        distributed.average_grads(run.extra_params)  # DDP averages only the wrapped module's
    if run.cfg.grad_clip is not None:
        run.scaler.unscale_(run.opt)
        torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    with torch.no_grad():
        sums[0] += loss.detach().double() * len(y)
        sums[1] += (logits.detach().argmax(1) == y).sum()


def _flush(state: Progress, sums: Any) -> None:
    """Move the device-side running sums into the progress (a GPU sync); a non-finite loss stops training."""
    loss_sum, correct = sums.tolist()
    if not math.isfinite(loss_sum):
        raise RunError(f"training diverged: the loss became {loss_sum} by step {state.step} (lower --lr?)")
    state.loss_sum += loss_sum
    state.correct += int(correct)
    sums.zero_()


def _end_epoch(run: _Run, data: Dataset, batch_size: int) -> None:
    """Validate, record the epoch in the history, keep the best weights and decide on early stopping."""
    cfg, state = run.cfg, run.progress
    loss_sum, correct, count = distributed.all_reduce_sum(
        [state.loss_sum, float(state.correct), float(state.count)], run.dev
    )
    with console.quieted():
        val = evaluate_torch(run.module, data, batch_size, run.dev)
    state.seen += state.count
    state.epoch += 1
    state.history.append({
        "epoch": state.epoch,
        "train_loss": loss_sum / count,
        "train_accuracy": correct / count,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "lr": run.opt.param_groups[0]["lr"],
    })
    if val["accuracy"] > state.best_acc:
        state.best_acc, state.best_epoch, state.stale = val["accuracy"], state.epoch, 0
        if cfg.early_stopping:
            run.best_weights = copy.deepcopy({k: v.detach().cpu() for k, v in run.module.state_dict().items()})
    else:
        state.stale += 1
    state.batch, state.loss_sum, state.correct, state.count = 0, 0.0, 0, 0
    if cfg.early_stopping and state.stale >= cfg.early_stopping and state.epoch < cfg.epochs:
        run.stopped_early = True
        state.epoch = cfg.epochs


def _finish(run: _Run) -> dict[str, Any]:
    """Restore the best weights (early stopping), move everything to the CPU and gather the metrics."""
    cfg, state = run.cfg, run.progress
    if cfg.early_stopping and run.best_weights is not None:
        run.module.load_state_dict(run.best_weights)
    replica_diff = distributed.replica_max_diff(run.module, *run.objective.modules) if run.dist.enabled else None
    run.module.to("cpu").eval()
    for extra in run.objective.modules:
        extra.to("cpu")
    best_epoch = state.best_epoch if cfg.early_stopping else state.history[-1]["epoch"]
    chosen = state.history[best_epoch - 1]
    throughput = state.seen * run.dist.world_size / state.train_time if state.train_time > 0 else None
    return {
        "accuracy": chosen["val_accuracy"],
        "loss": chosen["val_loss"],
        "train_loss": chosen["train_loss"],
        "epochs": len(state.history),
        "best_epoch": best_epoch,
        "stopped_early": run.stopped_early,
        "precision": cfg.amp if cfg.amp != "off" else "fp32",
        "device": run.device,
        "channels_last": run.channels_last,
        "processes": run.dist.world_size,
        "backend": distributed.backend(),
        "replica_max_abs_diff": replica_diff,
        "train_samples_per_s": throughput,
        "history": state.history,
    }


def history_table(history: list[dict[str, Any]], title: str = "training history") -> Table:
    """`fit`'s per-epoch figures (and any a caller added to them) as a report section."""
    columns = list(dict.fromkeys(k for h in history for k in h))
    return Table(title=title, columns=columns, rows=[[h.get(c) for c in columns] for h in history])


_DISPLAY_EVERY = 10  # steps between progress-bar refreshes (each one waits for the GPU)
_DEVICE_DATA_LIMIT = 4 * 1024**3  # in-memory data up to this size is copied to the GPU once


def _on_device(dataset: Any, dev: Any) -> Any:
    """In-memory tensor data small enough is moved to the GPU once, instead of batch by batch."""
    from torch.utils.data import TensorDataset

    if dev.type != "cuda" or not isinstance(dataset, TensorDataset):
        return dataset
    size = sum(t.numel() * t.element_size() for t in dataset.tensors)
    if size > _DEVICE_DATA_LIMIT:
        return dataset
    return TensorDataset(*(t.to(dev) for t in dataset.tensors))


def _collate(dataset: Any, indices: list[int], dev: Any) -> tuple[Any, Any]:
    import torch
    from torch.utils.data import TensorDataset

    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        idx = torch.as_tensor(indices, device=x.device)
        x, y = x[idx], y[idx]
    else:
        items = [dataset[i] for i in indices]
        x, y = torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items])
    return x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

