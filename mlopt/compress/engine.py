"""The training loop every training pass runs through (plain fp32, one process, for now)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlopt import console
from mlopt.data import Dataset, loader, require_labels


class TrainingConfig(BaseModel):
    """Optimiser and schedule settings shared by every pass that trains."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(5, gt=0)
    lr: float = Field(2e-3, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int | None = Field(None, gt=0, description="defaults to the data's batch_size")
    seed: int = 0


def fit(module: Any, data: Dataset, cfg: TrainingConfig, batch_size: int) -> dict[str, Any]:
    """Train `module` in place on the train split; evaluate on validation after each epoch."""
    import torch
    import torch.nn.functional as F

    from mlopt.evaluate import evaluate_torch

    require_labels(data, "training")
    torch.manual_seed(cfg.seed)
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = max(1, -(-len(data.train) // batch_size))
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    history = []
    seen, train_time = 0, 0.0
    with console.progress("train", total=total_steps) as bar:
        for epoch in range(cfg.epochs):
            module.train()
            loss_sum, correct, count = 0.0, 0, 0
            started = time.perf_counter()
            for x, y in loader(data.train, batch_size, shuffle=True, seed=cfg.seed + epoch):
                logits = module(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                count += len(y)
                bar.advance(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_sum / count:.4f}",
                            acc=f"{correct / count:.3f}")
            train_time += time.perf_counter() - started
            seen += count
            val = _quiet_eval(evaluate_torch, module, data, batch_size)
            history.append({
                "epoch": epoch + 1,
                "train_loss": loss_sum / count,
                "train_accuracy": correct / count,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
            })
    module.eval()
    last = history[-1]
    return {
        "accuracy": last["val_accuracy"],
        "loss": last["val_loss"],
        "train_loss": last["train_loss"],
        "epochs": cfg.epochs,
        "train_samples_per_s": seen / train_time if train_time > 0 else None,
        "history": history,
    }


def _quiet_eval(fn: Any, *args: Any) -> dict[str, Any]:
    was = console.is_quiet()
    console.set_quiet(True)
    try:
        return fn(*args)
    finally:
        console.set_quiet(was)
