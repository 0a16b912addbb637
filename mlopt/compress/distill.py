"""The `distill` pass: knowledge distillation from a teacher into the current (or a new) student.

Logit distillation (Hinton et al.): KL divergence between temperature-softened teacher and student
distributions, mixed with the hard-label loss by `alpha`. Feature distillation: mean squared error
between named intermediate outputs, through a learned 1x1 convolution or linear projection when
the widths differ. The teacher runs in eval mode without gradients; with logit distillation only,
its outputs are computed once and cached (mlopt's data is not augmented, so they do not change).

The same student is also trained without distillation for the same epochs (the baseline), so the
report shows the gain measured, not assumed.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Literal

from pydantic import Field, field_validator

from mlopt.core import console
from mlopt.compress.lib.engine import Objective, TrainingConfig, fit
from mlopt.core.errors import InputError
from mlopt.run.runner import Pass, StepResult


class DistillConfig(TrainingConfig):
    """Train the student to match the teacher (plus the labels)."""

    type: Literal["distill"] = "distill"
    teacher: str | None = Field(None, description="teacher model (mlopt DIR or spec); default: the model before compression")
    student: str | None = Field(None, description="student spec built fresh; default: the current model")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation loss; 1 - alpha on the labels")
    features: list[str] = Field(default_factory=list, description="teacher.layer:student.layer pairs for feature distillation")
    feature_weight: float = Field(1.0, ge=0)
    baseline: bool = Field(True, description="also train the student without distillation, for comparison")

    @field_validator("features")
    @classmethod
    def _pairs(cls, value: list[str]) -> list[str]:
        for pair in value:
            if pair.count(":") != 1 or not all(pair.split(":")):
                raise ValueError(f"feature pair {pair!r} must be TEACHER_LAYER:STUDENT_LAYER")
        return value


def _named(module: Any, name: str, role: str) -> Any:
    modules = dict(module.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"the {role} has no layer named {name!r}{hint}")
    return modules[name]


class _FeaturePair:
    """Captures one teacher and one student layer output and projects the student's to the teacher's width."""

    def __init__(self, teacher: Any, student: Any, t_name: str, s_name: str, sample: Any):
        import torch
        from torch import nn

        self.t_out: Any = None
        self.s_out: Any = None
        _named(teacher, t_name, "teacher").register_forward_hook(lambda m, i, o: setattr(self, "t_out", o))
        _named(student, s_name, "student").register_forward_hook(lambda m, i, o: setattr(self, "s_out", o))
        with torch.no_grad():
            was_t, was_s = teacher.training, student.training
            teacher.eval(), student.eval()
            teacher(sample), student(sample)
            teacher.train(was_t), student.train(was_s)
        t, s = self.t_out, self.s_out
        if not isinstance(t, torch.Tensor) or not isinstance(s, torch.Tensor) or t.dim() != s.dim():
            raise InputError(f"feature pair {t_name}:{s_name}: outputs are not tensors of the same rank")
        if t.dim() == 4:
            self.proj = nn.Identity() if t.shape[1] == s.shape[1] else nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
        elif t.dim() == 2:
            self.proj = nn.Identity() if t.shape[1] == s.shape[1] else nn.Linear(s.shape[1], t.shape[1], bias=False)
        else:
            raise InputError(f"feature pair {t_name}:{s_name}: only (N, C, H, W) and (N, D) outputs are supported")
        self.name = f"{t_name}:{s_name}"

    def loss(self) -> Any:
        import torch.nn.functional as F

        s = self.proj(self.s_out.float())
        t = self.t_out.float().detach()
        if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return F.mse_loss(s, t)


def distillation_objective(teacher: Any, student: Any, data: Any, cfg: DistillConfig, batch_size: int) -> Objective:
    import torch
    import torch.nn.functional as F

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    sample = data.train[0][0].unsqueeze(0)
    pairs = [_FeaturePair(teacher, student, *pair.split(":"), sample) for pair in cfg.features]
    cache: dict[str, Any] = {}
    if not pairs:
        from mlopt.runtime.evaluation import predict_logits

        cache["logits"] = predict_logits(teacher, data.train, batch_size)

    def loss(model: Any, x: Any, y: Any, indices: Any) -> tuple[Any, Any]:
        logits = model(x)
        if "logits" in cache:
            t_logits = cache["logits"][torch.as_tensor(indices, device=cache["logits"].device)]
        else:
            with torch.no_grad():
                t_logits = teacher(x)
        T = cfg.temperature
        kd = F.kl_div(F.log_softmax(logits.float() / T, 1), F.log_softmax(t_logits.float() / T, 1),
                      reduction="batchmean", log_target=True) * T * T
        total = cfg.alpha * kd + (1 - cfg.alpha) * F.cross_entropy(logits.float(), y)
        for pair in pairs:
            total = total + cfg.feature_weight * pair.loss()
        return total, logits

    def to_device(dev: Any) -> None:
        teacher.to(dev)
        if "logits" in cache:
            cache["logits"] = cache["logits"].to(dev)

    return Objective(loss=loss, modules=[p.proj for p in pairs], to_device=to_device)


def resolve_teacher(config: DistillConfig, ctx: Any, current: Any) -> Any:
    """The teacher module: the one named in the config, else the model before compression."""
    if config.teacher:
        from mlopt.runtime.artifacts import load_artifact, looks_like_artifact
        from mlopt.runtime.models import build_module

        if looks_like_artifact(config.teacher):
            teacher = load_artifact(config.teacher)
            if teacher.format != "torch":
                raise InputError(f"the teacher {config.teacher} is ONNX; distillation needs a PyTorch teacher")
            return teacher.module, config.teacher
        console.warn(f"teacher {config.teacher} is built with random weights; pass a trained mlopt directory instead")
        return build_module(config.teacher, ctx.data.num_classes), config.teacher
    if ctx.baseline is current and not config.student:
        raise InputError(
            "distill needs a teacher: give --teacher, a --student different from the current model, "
            "or put distill after a compressing step (the model before it is the teacher)"
        )
    return ctx.baseline.require_torch("distill (teacher)"), ctx.baseline.origin or "the model before compression"


class DistillPass(Pass):
    name = "distill"
    config_class = DistillConfig
    needs_data = True
    compresses = True

    def run(self, artifact: Any, config: DistillConfig, ctx: Any) -> StepResult:
        import torch

        from mlopt.runtime.data import check_labels
        from mlopt.runtime.models import build_module, count_params, probe_output

        teacher, teacher_name = resolve_teacher(config, ctx, artifact)
        teacher = copy.deepcopy(teacher)
        if config.student:
            torch.manual_seed(config.seed)
            student = build_module(config.student, ctx.data.num_classes)
            builder = {"spec": config.student, "num_classes": ctx.data.num_classes}
            new = artifact.derive("distill", module=student, builder=builder)
        else:
            student = copy.deepcopy(artifact.require_torch("distill"))
            new = artifact.derive("distill", module=student)
        shape = tuple(ctx.data.sample_shape)
        t_classes, s_classes = probe_output(teacher, shape), probe_output(student, shape, config.student)
        if t_classes != s_classes:
            raise InputError(f"the teacher has {t_classes} classes and the student {s_classes}")
        check_labels(ctx.data, s_classes)
        new.num_classes = s_classes
        new.sample_shape = shape
        batch = config.batch_size or ctx.recipe.data.batch_size
        initial = copy.deepcopy(student)

        from mlopt.runtime.evaluation import evaluate_torch

        teacher_metrics = evaluate_torch(teacher, ctx.data, batch)
        objective = distillation_objective(teacher, student, ctx.data, config, batch)
        ckpt = ctx.checkpoint_dir
        result = fit(student, ctx.data, config, batch, objective=objective, label="distill",
                     checkpoint_dir=ckpt / "distill" if ckpt else None, resume=ctx.resume,
                     fingerprint_extra=["distill", teacher_name])
        history = result.pop("history")
        metrics: dict[str, Any] = {
            **result,
            "teacher_accuracy": teacher_metrics["accuracy"],
            "teacher_params": count_params(teacher),
            "params": count_params(student),
        }
        notes = [f"teacher: {teacher_name} (top-1 {teacher_metrics['accuracy']:.4f})"]
        if config.baseline:
            plain = TrainingConfig(**config.model_dump(include=set(TrainingConfig.model_fields)))
            base = fit(initial, ctx.data, plain, batch, label="baseline (no distillation)",
                       checkpoint_dir=ckpt / "baseline" if ckpt else None, resume=ctx.resume,
                       fingerprint_extra=["baseline"])
            metrics["baseline_accuracy"] = base["accuracy"]
            metrics["distillation_gain"] = result["accuracy"] - base["accuracy"]
            notes.append(
                f"the same student trained without distillation for {config.epochs} epoch(s) reached "
                f"{base['accuracy']:.4f}; with distillation {result['accuracy']:.4f}"
            )
        console.info(notes[-1])
        metrics["size_mb"] = new.size_mb()
        return StepResult(artifact=new, metrics=metrics, notes=notes, extra={"history": history})
