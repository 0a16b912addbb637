"""The one training engine behind every pass that trains (train, fine-tune, distill, QAT).

It owns what must work the same everywhere: mixed precision (bf16 autocast, fp16 with a gradient
scaler on CUDA), DistributedDataParallel under torchrun, atomic checkpoints with exact resume
(optimiser, scheduler, scaler, RNG states, position in the epoch), schedules and early stopping.
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

from pydantic import BaseModel, Field

from mlopt.core import console
from mlopt.core.contracts import cli
from mlopt.core.errors import InputError, RunError
from mlopt.core.sections import Config, Table
from mlopt.runtime import distributed, sharding
from mlopt.runtime.data import Dataset, count, first_inputs, require_labels
from mlopt.runtime.hf import TokenDataset
from mlopt.runtime.evaluation import evaluate_torch
from mlopt.runtime.models import cpu_state_dict
from mlopt.runtime.sharded_checkpoint import ShardedCheckpoints

CHECKPOINT_FILE = "checkpoint.pt"
_DISPLAY_EVERY = 10  # steps between progress-bar refreshes (each one waits for the GPU)
_DEVICE_DATA_LIMIT = 4 * 1024**3  # in-memory data up to this size is copied to the GPU once


class TrainingConfig(Config):
    """Optimiser, schedule, precision and checkpoint settings shared by every pass that trains."""

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
    early_stopping: int | None = Field(None, gt=0, description="stop after this many epochs without a better "
                                       "validation accuracy (on text: cosine to the teacher); keep the best weights")
    batch_size: int | None = Field(None, gt=0, description="per-process batch size; defaults to the data's batch_size")
    seed: int = 0
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision: bf16 (CPU, CUDA) or fp16 (CUDA)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int | None = Field(None, gt=0, description="also checkpoint every N optimiser steps")
    shard: bool = Field(False, description="shard parameters, gradients and optimizer state across the processes "
                        "(FSDP2) instead of replicating them; checkpoints are sharded too")


def cross_entropy(model: Any, x: Any, y: Any, indices: Any) -> tuple[Any, Any]:
    """The default objective's loss: cross-entropy on the labels."""
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.float(), y), logits


@dataclass
class Objective:
    """What the engine minimises: `loss(model, x, y, indices)` returns (loss, logits), `indices` being the
    batch's positions in the train split (for cached teacher outputs). `modules` are extra trainable modules
    (feature projections) optimised, checkpointed and moved to the device with the model.

    A label-free objective (`labels` False: x is a dict of token tensors, y None) brings its own `validate(module,
    device)`, which returns {"loss": ..., metric: ...}; the best epoch is the one with the highest `metric`."""

    loss: Callable[[Any, Any, Any, Any], tuple[Any, Any]] = cross_entropy
    modules: list[Any] = field(default_factory=list)
    to_device: Callable[[Any], None] | None = None
    labels: bool = True
    validate: Callable[[Any, Any], dict[str, float]] | None = None
    metric: str = "accuracy"
    hooks: list[Any] = field(default_factory=list)  # forward hooks on the models: removed by close()
    notes: list[str] = field(default_factory=list)  # what the objective decided, for the step's report
    thawed: list[Any] = field(default_factory=list)  # parameters frozen for training only: trainable again by close()

    def close(self) -> None:
        """Remove the objective's forward hooks and make trainable again what it froze for training: the trained
        student is handed on as it came, apart from its weights."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        for p in self.thawed:
            p.requires_grad_(True)
        self.thawed.clear()


def _device(cfg: TrainingConfig) -> str:
    """The device to train on; an InputError where it, or its mixed precision, is not available."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but CUDA is not available")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.amp == "fp16" and device != "cuda":
        raise InputError("fp16 mixed precision needs CUDA; on the CPU use --amp bf16")
    if cfg.amp == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU does not support bf16; use --amp fp16")
    return device


def _place(cfg: TrainingConfig) -> tuple[str, distributed.Dist, Any]:
    """The device type, this process's place among the processes (joining them under torchrun) and its device."""
    import torch

    device = _device(cfg)
    dist = distributed.init(device)
    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    return device, dist, torch.device(device, dist.local_rank) if device == "cuda" else torch.device("cpu")


def shard_frozen(module: Any, cfg: TrainingConfig, sample: Any) -> str | None:
    """Shard a module that only runs forward (a distillation teacher) across the processes, in place
    (`sample`: a real input, see `sharding.shard`). Returns why nothing was done, with one process."""
    device, dist, _ = _place(cfg)
    if dist.world_size == 1:
        return "--shard-teacher with one process does nothing: the teacher is whole"
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    sharding.shard(module, device, sample=sample)
    return None


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


def _epoch_batches(n: int, batch_size: int, epoch: int, seed: int, dist: distributed.Dist,
                   lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch (torch's DistributedSampler order).

    With `lengths` (tokens per line of text), lines of similar length share a batch, as Hugging Face's
    group_by_length does: the shuffled order is cut into runs of GROUP_BATCHES batches, each run sorted by length,
    and the batches shuffled again. A batch then carries little padding (the batch drops the columns no line uses),
    and the epoch still sees every line once, in a different grouping every epoch."""
    import random

    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    if lengths is not None:
        run = batch_size * GROUP_BATCHES
        idx = [i for s in range(0, len(idx), run) for i in sorted(idx[s:s + run], key=lambda i: -lengths[i])]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if lengths is not None:
        random.Random(seed * 100_003 + epoch).shuffle(batches)
    return batches


GROUP_BATCHES = 50  # batches per run of lines sorted by length


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


def fit(module: Any, data: Dataset, cfg: TrainingConfig, batch_size: int, *, objective: Objective | None = None,
        checkpoint_dir: Path | None = None, resume: bool = False, fingerprint_extra: Any = None,
        label: str = "train") -> dict[str, Any]:
    """Train `module` in place, validating after each epoch; returns the metrics (validation accuracy and
    loss, throughput, precision, memory, history) and notes. The module ends on the CPU in eval mode.

    Sharded (`cfg.shard` on several processes), a copy is trained and the module holds meta tensors until
    the trained weights are gathered back into it at the end: if training fails, the module is unusable."""
    objective = objective or Objective()
    if objective.labels:
        require_labels(data, "training")
    n = len(data.train)
    lengths = None
    if isinstance(data.train, TokenDataset) and "attention_mask" in data.train.tensors:
        lengths = data.train.tensors["attention_mask"].sum(1).tolist()
    run = _Training(module, objective, cfg, n, batch_size, checkpoint_dir, fingerprint_extra,
                    first_inputs(data, 1) if cfg.shard else None)
    if resume or distributed.restarted():
        run.resume()
    train_set = _on_device(data.train, run.dev)
    try:
        with console.progress(label, total=cfg.epochs * run.steps_per_epoch) as bar:
            bar.advance(run.progress.step)
            while run.progress.epoch < cfg.epochs:
                batches = _epoch_batches(n, batch_size, run.progress.epoch, cfg.seed, run.dist, lengths)
                run.train_epoch(train_set, batches, bar)
                run.end_epoch(data, batch_size)
                run.checkpoint()
        result = run.finish()
    finally:
        objective.close()  # the module is handed on without the objective's hooks
    result["notes"] = [*objective.notes, *result["notes"]]
    return result


class _Training:
    """One call of `fit`: the module placed on its device (wrapped for DDP), its optimiser and the progress."""

    def __init__(self, module: Any, objective: Objective, cfg: TrainingConfig, n: int, batch_size: int,
                 checkpoint_dir: Path | None, fingerprint_extra: Any, sample: Any = None) -> None:
        import torch

        self.cfg, self.objective, self.host = cfg, objective, module
        self.device, self.dist, self.dev = _place(cfg)
        device, dist = self.device, self.dist
        torch.manual_seed(cfg.seed)
        self.notes: list[str] = []
        # --shard: FSDP2 across the processes; with one process there is nothing to shard across, but the
        # checkpoints are still sharded ones, so that more processes can resume them.
        if cfg.shard and not any(p.requires_grad for p in module.parameters()):
            raise InputError("--shard: the model has no trainable parameters to shard")
        self.sharded = cfg.shard and dist.world_size > 1
        if cfg.shard and not self.sharded:
            self.notes.append("--shard with one process does nothing: trained unsharded")
            console.warn(self.notes[-1])
        # On CUDA, convolutional networks train faster in NHWC (channels-last) layout, which the tensor
        # cores use natively; most of all under fp16/bf16. The weights are saved contiguous either way.
        self.channels_last = (device == "cuda" and not self.sharded
                              and any(isinstance(m, torch.nn.Conv2d) for m in module.modules()))
        self.shard_units = 0
        if self.sharded:
            module = sharding.training_copy(module)  # the caller's module gets the gathered weights at the end
            self.shard_units = sharding.shard(module, device, cfg.amp, sample)
            for extra in objective.modules:
                if any(True for _ in extra.parameters()):
                    sharding.shard(extra, device, cfg.amp)
        else:
            module.to(self.dev, memory_format=torch.channels_last) if self.channels_last else module.to(self.dev)
            for extra in objective.modules:
                extra.to(self.dev)
        if objective.to_device:
            objective.to_device(self.dev)
        self.module = self.model = module
        if dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(module, device_ids=[dist.local_rank] if device == "cuda" else None)

        self.params = [p for m in (module, *objective.modules) for p in m.parameters() if p.requires_grad]
        self.extra_params = [p for m in objective.modules for p in m.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                       nesterov=True)
        self.steps_per_epoch = len(_epoch_batches(n, batch_size, 0, cfg.seed, dist))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_factor(cfg, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
        # With fp16, GradScaler skips the optimiser step when gradients overflow; the scheduler still
        # steps, which is intended (the schedule follows steps taken), so its warning is noise.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        # oneDNN hands back convolution gradients in its own (equivalent) strides; DDP copes, and says so.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

        # Sharded checkpoints reshard on load, so the number of processes is not part of their fingerprint.
        self.fingerprint = config_fingerprint(cfg, [fingerprint_extra, batch_size, n] if cfg.shard
                                              else [fingerprint_extra, dist.world_size, batch_size, n])
        self.signature = _signature(module, objective.modules, self.opt)
        self.ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir and not cfg.shard else None
        self.sharded_ckpts = ShardedCheckpoints(Path(checkpoint_dir)) if checkpoint_dir and cfg.shard else None
        self.batch_size, self.n = batch_size, n
        self.progress = Progress()
        self.best_weights: dict[str, Any] | None = None

    def resume(self) -> None:
        """Continue from the checkpoint, where there is one."""
        if self.sharded_ckpts is not None:
            self._resume_sharded()
        elif self.ckpt_path is not None and self.ckpt_path.is_file():
            self._resume_file()

    def _resume_file(self) -> None:
        import torch

        try:
            ckpt = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"checkpoint {self.ckpt_path} is unreadable ({type(exc).__name__}); "
                             "start again with --overwrite") from exc
        if ckpt.get("fingerprint") != self.fingerprint:
            raise InputError(f"the checkpoint in {self.ckpt_path.parent} was written with a different configuration; "
                             "rerun with the original settings, or with --overwrite to start again")
        self.module.load_state_dict(ckpt["model"])
        for extra, sd in zip(self.objective.modules, ckpt["extra_modules"]):
            extra.load_state_dict(sd)
        self.opt.load_state_dict(ckpt["optimizer"])
        self._restore(ckpt)
        self.best_weights = ckpt.get("best_weights")
        console.info(f"resuming from {self.ckpt_path} (epoch {self.progress.epoch + 1}, batch {self.progress.batch})")

    def _restore(self, state: dict[str, Any]) -> None:
        """The state every rank keeps for itself: scheduler, scaler, random numbers, progress."""
        import torch

        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if self.device == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        self.progress = Progress(**state["progress"])

    def _dcp_state(self, with_best: bool) -> dict[str, Any]:
        """What the sharded checkpoints hold: model, feature projections and optimiser, as DCP state dicts."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self._trainable(), self.opt)
        state = {"model": model_sd, "optimizer": optim_sd}
        if with_best:
            state["best"] = self._snapshot()
        return state

    def _snapshot(self) -> dict[str, Any]:
        """A copy of the model's weights (early stopping's best): CPU tensors, or this rank's shards."""
        if self.sharded:
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        return copy.deepcopy(cpu_state_dict(self.module))  # keeps per-module versions

    def _trainable(self) -> Any:
        from torch import nn

        return nn.ModuleDict({"model": self.module, **{f"extra{i}": m for i, m in enumerate(self.objective.modules)}})

    def _resume_sharded(self) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path, skipped = self.sharded_ckpts.latest()
        if skipped:
            self.notes.append(f"half-written sharded checkpoint(s) ignored: {', '.join(skipped)}"
                              + (f"; resumed from {path.name}" if path else "; started from the beginning"))
            console.warn(self.notes[-1])
        if path is None:
            return
        meta = ShardedCheckpoints.marker(path)
        if meta.get("signature") != self.signature:
            raise InputError(f"the sharded checkpoint in {path.parent.parent} was written for another model or "
                             "optimizer; rerun with the original model and settings, or with --overwrite to start again")
        if meta.get("fingerprint") != self.fingerprint:
            raise InputError(f"the sharded checkpoint in {path.parent.parent} was written with a different "
                             "configuration; rerun with the original settings, or with --overwrite to start again")
        state = self._dcp_state(meta.get("best", False))
        own = ShardedCheckpoints.load(path, state)
        set_state_dict(self._trainable(), self.opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if meta.get("best"):
            self.best_weights = state["best"]
        self._restore(own)
        if meta["world_size"] != self.dist.world_size:
            self._reposition(meta["world_size"])
        console.info(f"resuming from {path} (epoch {self.progress.epoch + 1}, batch {self.progress.batch}, "
                     f"written by {meta['world_size']} process(es))")

    def _reposition(self, saved_world: int) -> None:
        """A checkpoint of another number of processes: go on with the epoch from the last of this run's steps
        that ends at or before the samples already seen (a few may be trained twice; at least one step is left)."""
        state = self.progress
        seen = min(state.batch * self.batch_size * saved_world, self.n)
        state.batch = min(seen // (self.batch_size * self.dist.world_size), self.steps_per_epoch - 1)
        state.step = state.epoch * self.steps_per_epoch + state.batch
        state.loss_sum, state.correct, state.count = 0.0, 0, 0
        self.sched.last_epoch = state.step
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base * self.sched.lr_lambdas[0](state.step)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        self.notes.append(f"resumed on {self.dist.world_size} process(es) from a checkpoint of {saved_world}")

    def checkpoint(self) -> None:
        if self.sharded_ckpts is not None:
            self._checkpoint_sharded()
            return
        if self.ckpt_path is None or not self.dist.is_main:
            return
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(self.ckpt_path, {
            "fingerprint": self.fingerprint, "model": self.module.state_dict(),
            "extra_modules": [m.state_dict() for m in self.objective.modules],
            "optimizer": self.opt.state_dict(), **self._own_state(), "best_weights": self.best_weights,
        })

    def _own_state(self) -> dict[str, Any]:
        import torch

        return {"scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.device == "cuda" else None,
                "progress": asdict(self.progress)}

    def _checkpoint_sharded(self) -> None:
        if self.sharded:
            sharding.sync_buffers(self.module)  # DCP saves one rank's copy of what is not sharded: make it rank 0's
        state = self._dcp_state(False)
        if self.best_weights is not None:
            state["best"] = self.best_weights
        self.sharded_ckpts.save(self.progress.step, state, self._own_state(),
                                {"fingerprint": self.fingerprint, "signature": self.signature,
                                 "best": self.best_weights is not None, "epoch": self.progress.epoch})

    def train_epoch(self, train_set: Any, batches: list[list[int]], bar: Any) -> None:
        """Train the rest of the epoch from `progress.batch`, checkpointing every `checkpoint_every` steps."""
        import torch

        cfg, state = self.cfg, self.progress
        self.module.train()
        for extra in self.objective.modules:
            extra.train()
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        started = time.perf_counter()
        # Running sums stay on the device: reading them forces a GPU sync, so that happens
        # only every few steps (progress display) and at checkpoints and epoch ends.
        sums = torch.zeros(2, dtype=torch.float64, device=self.dev)  # loss * samples, correct
        for indices in batches[state.batch :]:
            x, y = _collate(train_set, indices, self.dev)
            size = count(x)
            if self.channels_last and not isinstance(x, dict) and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=self.device, dtype=amp or torch.float32, enabled=amp is not None):
                loss, logits = self.objective.loss(self.model, x, y, indices)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.dist.enabled and self.extra_params and not self.sharded:
                distributed.average_grads(self.extra_params)  # DDP averages only the wrapped module's
            if cfg.grad_clip is not None:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            with torch.no_grad():
                sums[0] += loss.detach().double() * size
                if y is not None:
                    sums[1] += (logits.detach().argmax(1) == y).sum()
            state.count += size
            state.batch += 1
            state.step += 1
            if state.batch % _DISPLAY_EVERY == 0 or state.batch == len(batches):
                _flush(state, sums)
                elapsed = state.train_time + time.perf_counter() - started
                bar.advance(0, epoch=f"{state.epoch + 1}/{cfg.epochs}", loss=f"{state.loss_sum / state.count:.4f}",
                            acc=f"{state.correct / state.count:.3f}" if self.objective.labels else "-",
                            rate=f"{(state.seen + state.count) * self.dist.world_size / max(elapsed, 1e-9):.0f}/s")
            bar.advance(1)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < len(batches):
                _flush(state, sums)
                state.train_time += time.perf_counter() - started
                started = time.perf_counter()
                self.checkpoint()
        _flush(state, sums)
        if self.device == "cuda":
            torch.cuda.synchronize(self.dev)
        state.train_time += time.perf_counter() - started

    def end_epoch(self, data: Dataset, batch_size: int) -> None:
        """Validate, record the epoch in the history, keep the best weights and decide on early stopping."""
        cfg, state = self.cfg, self.progress
        loss_sum, correct, count = distributed.all_reduce_sum([state.loss_sum, float(state.correct),
                                                               float(state.count)], self.dev)
        if self.sharded:
            sharding.sync_buffers(self.module)  # every rank validates (and keeps as best) rank 0's statistics
        metric, validate = self.objective.metric, self.objective.validate
        with console.quieted():
            val = validate(self.module, self.dev) if validate else evaluate_torch(self.module, data, batch_size, self.dev)
        state.seen += state.count
        state.epoch += 1
        train = {"train_loss": loss_sum / count}
        if self.objective.labels:
            train["train_accuracy"] = correct / count
        state.history.append({"epoch": state.epoch, **train, "val_loss": val["loss"], f"val_{metric}": val[metric],
                              "lr": self.opt.param_groups[0]["lr"]})
        if val[metric] > state.best_acc:
            state.best_acc, state.best_epoch, state.stale = val[metric], state.epoch, 0
            if cfg.early_stopping:
                self.best_weights = self._snapshot()
        else:
            state.stale += 1
        state.batch, state.loss_sum, state.correct, state.count = 0, 0.0, 0, 0
        if cfg.early_stopping and state.stale >= cfg.early_stopping:
            state.epoch = cfg.epochs  # stop early: the history ends short of cfg.epochs

    def finish(self) -> dict[str, Any]:
        """Restore the best weights (early stopping), gather sharded weights into the caller's module, move
        everything to the CPU and gather the metrics."""
        cfg, state, dist = self.cfg, self.progress, self.dist
        if cfg.early_stopping and self.best_weights is not None:
            self.module.load_state_dict(self.best_weights)
        memory = self._memory()
        if self.sharded:
            sharding.gather_into(self.module, self.host)  # every rank holds the whole trained model again
            replica_diff = distributed.replica_max_diff(self.host)
        else:
            replica_diff = distributed.replica_max_diff(self.host, *self.objective.modules) if dist.enabled else None
            for extra in self.objective.modules:
                extra.to("cpu")
        self.host.to("cpu").eval()
        best_epoch = state.best_epoch if cfg.early_stopping else state.history[-1]["epoch"]
        chosen = state.history[best_epoch - 1]
        return {
            self.objective.metric: chosen[f"val_{self.objective.metric}"], "loss": chosen["val_loss"], "train_loss": chosen["train_loss"],
            "epochs": len(state.history), "best_epoch": best_epoch, "stopped_early": len(state.history) < cfg.epochs,
            "precision": cfg.amp if cfg.amp != "off" else "fp32", "device": self.device,
            "channels_last": self.channels_last, "processes": dist.world_size, "backend": distributed.backend(),
            "sharded": self.sharded, "shard_units": self.shard_units, **memory,
            "replica_max_abs_diff": replica_diff,
            "train_samples_per_s": state.seen * dist.world_size / state.train_time if state.train_time > 0 else None,
            "history": state.history, "notes": self.notes,
        }

    def _memory(self) -> dict[str, Any]:
        """What this process holds for training (its shards when sharded), and its peak memory."""
        import resource

        import torch

        held = sharding.training_bytes(self.params, self.opt)
        held["model_optimizer_bytes"] = held["param_bytes"] + held["optimizer_bytes"]
        held["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if self.device == "cuda":
            held["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(self.dev) / 2**20, 1)
        return held


def _signature(module: Any, extras: list[Any], optimizer: Any) -> str:
    """A hash of the parameters' names and (whole) shapes and the optimiser's kind: what a checkpoint fits."""
    parts = [[name, list(p.shape)] for m in (module, *extras) for name, p in m.named_parameters()]
    return hashlib.sha256(json.dumps([parts, type(optimizer).__name__]).encode()).hexdigest()[:16]


def _flush(state: Progress, sums: Any) -> None:
    """Move the device-side running sums into the progress (a GPU sync); a non-finite loss stops training."""
    loss_sum, correct = sums.tolist()
    if not math.isfinite(loss_sum):
        raise RunError(f"training diverged: the loss became {loss_sum} by step {state.step} (lower --lr?)")
    state.loss_sum += loss_sum
    state.correct += int(correct)
    sums.zero_()


def history_table(history: list[dict[str, Any]], title: str = "training history") -> Table:
    """`fit`'s per-epoch figures (and any a caller added to them) as a report section."""
    columns = list(dict.fromkeys(k for h in history for k in h))
    return Table(title=title, columns=columns, rows=[[h.get(c) for c in columns] for h in history])


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
    """The batch at `indices` on the device: (inputs, labels), (inputs, None) for unlabelled inputs, or for
    tokenized text ({name: tensor}, None)."""
    import torch
    from torch.utils.data import TensorDataset

    if isinstance(dataset, TokenDataset):
        idx = torch.as_tensor(indices)
        batch = {k: v[idx] for k, v in dataset.tensors.items()}
        if "attention_mask" in batch:  # every line is padded to the file's longest: drop the columns no line uses
            used = batch["attention_mask"].any(0).nonzero()
            end = int(used[-1]) + 1 if len(used) else 1
            batch = {k: v[:, :end] for k, v in batch.items()}  # trailing columns only: positions stay as they were
        return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}, None
    if isinstance(dataset, TensorDataset):  # (inputs, labels), or inputs alone (random:SHAPE)
        idx = torch.as_tensor(indices, device=dataset.tensors[0].device)
        x = dataset.tensors[0][idx]
        y = dataset.tensors[1][idx] if len(dataset.tensors) > 1 else None
    else:
        items = [dataset[i] for i in indices]
        x = torch.stack([it[0] for it in items])
        y = torch.stack([torch.as_tensor(it[1]) for it in items]) if len(items[0]) > 1 else None
    return x.to(dev, non_blocking=True), None if y is None else y.to(dev, non_blocking=True)

