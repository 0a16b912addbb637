"""The `distill` step: knowledge distillation from a teacher into the current (or a new) student.

The same student is also trained without distillation for the same epochs (the baseline), so the
report shows the gain measured, not assumed.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, field_validator

from mlopt.compress.lib.distillation import (distillation_objective, output_distillation_objective,
                                             text_distillation_objective)
from mlopt.compress.lib.engine import TrainingConfig, fit, history_table, shard_frozen
from mlopt.core import console
from mlopt.core.contracts import Pass, StepResult, cli, names_file
from mlopt.core.errors import InputError
from mlopt.runtime import hf
from mlopt.runtime.artifacts import load_artifact, looks_like_artifact
from mlopt.runtime.data import check_labels, first_inputs, require_labels
from mlopt.runtime.evaluation import evaluate_torch
from mlopt.runtime.models import build_module, count_params, input_vocabulary, probe_output
from mlopt.runtime.sharding import local_bytes


class DistillConfig(TrainingConfig):
    """Train the student to match the teacher (plus the labels)."""

    type: Literal["distill"] = "distill"
    teacher: str | None = Field(None, json_schema_extra=names_file("model", **cli(required=True)), description="teacher model (mlopt DIR or spec); default: the model before compression")
    student: str | None = Field(None, json_schema_extra=names_file("model"), description="student spec built fresh; default: the current model")
    temperature: float = Field(4.0, gt=0, description="softmax temperature")
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the distillation loss; 1 - alpha on the labels")
    features: list[str] = Field(default_factory=list, description="teacher.layer:student.layer pairs for feature distillation",
                                json_schema_extra=cli(flag="--feature"))
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature losses")
    baseline: bool = Field(True, description="also train the student without distillation, for comparison")
    shard_teacher: bool = Field(False, description="shard the frozen teacher across the processes (FSDP2), so that "
                                "a teacher larger than one process's memory runs; only its forward pass runs")

    @field_validator("features")
    @classmethod
    def _pairs(cls, value: list[str]) -> list[str]:
        for pair in value:
            if pair.count(":") != 1 or not all(pair.split(":")):
                raise ValueError(f"feature pair {pair!r} must be TEACHER_LAYER:STUDENT_LAYER")
        return value


def resolve_teacher(config: DistillConfig, ctx: Any, current: Any) -> Any:
    """The teacher module: the one named in the config, else the model before compression."""
    if config.teacher:
        if looks_like_artifact(config.teacher):
            teacher = load_artifact(config.teacher)
            if teacher.format != "torch":
                raise InputError(f"the teacher {config.teacher} is ONNX; distillation needs a PyTorch teacher")
            return teacher.module, config.teacher
        if not hf.is_hf_spec(config.teacher):  # hf:DIR loads its saved weights
            console.warn(f"teacher {config.teacher} is built with random weights; pass a trained mlopt directory "
                         "instead")
        return build_module(config.teacher, ctx.data.num_classes), config.teacher
    if ctx.baseline is current and not config.student:
        raise InputError("distill needs a teacher: give --teacher, a --student different from the current model, "
                         "or put distill after a compressing step (the model before it is the teacher)")
    return ctx.baseline.require_torch("distill (teacher)"), ctx.baseline.origin or "the model before compression"


class DistillPass(Pass):
    name = "distill"
    config_class = DistillConfig
    needs_data = True
    compresses = True
    trains = True
    text_ok = True  # hf: models on text:FILE learn the teacher's outputs, without labels
    cli_model_option = ("--student",)
    cli_help = """Knowledge distillation: train the student to match the teacher's logits (and named features).

    The report compares the student with the same student trained without distillation. On text (an hf: model
    and text:FILE) no labels are needed: the student learns the teacher's token states (or logits), and the
    report gives their cosine to the teacher's before and after.
    """

    @classmethod
    def check_text(cls, config: DistillConfig) -> None:
        """On text there are no labels and no images: the options about them are refused, not ignored."""
        _refuse_given(config, "distill on text", (
            ("student", "the text is tokenized for the current model; prune it, then distil it", config.student),
            ("features", "feature pairs apply to image models", config.features),
            ("feature_weight", "feature pairs apply to image models", True),
            ("alpha", "alpha weighs the labels, and text:FILE has none", config.alpha < 1),
            ("baseline", "the baseline trains on labels, and text:FILE has none", config.baseline),
            ("shard_teacher", "the teacher is sharded for image models only", config.shard_teacher)))

    def run(self, artifact: Any, config: DistillConfig, ctx: Any) -> StepResult:
        import torch

        if getattr(ctx.data, "text", False):
            return self._run_text(artifact, config, ctx)
        if not ctx.data.labeled:
            return self._run_unlabelled(artifact, config, ctx)
        teacher, teacher_name = resolve_teacher(config, ctx, artifact)
        teacher = copy.deepcopy(teacher)
        teacher_note = shard_frozen(teacher, config, first_inputs(ctx.data, 1)) if config.shard_teacher else None
        if config.student:
            torch.manual_seed(config.seed)
            student = build_module(config.student, ctx.data.num_classes)
            builder = {"spec": config.student, "num_classes": ctx.data.num_classes}
            new = artifact.derive("distill", module=student, builder=builder)
        else:
            student = copy.deepcopy(artifact.require_torch("distill"))
            new = artifact.derive("distill", module=student)
        shape = tuple(ctx.data.sample_shape)
        t_vocab, s_vocab = _read_the_data(teacher, student, artifact.vocab, shape)
        t_classes, s_classes = probe_output(teacher, shape, vocab=t_vocab), probe_output(student, shape, config.student,
                                                                                         s_vocab)
        if t_classes != s_classes:
            raise InputError(f"the teacher has {t_classes} classes and the student {s_classes}")
        check_labels(ctx.data, s_classes)
        new.num_classes, new.sample_shape, new.vocab = s_classes, shape, s_vocab
        batch = config.batch_size or ctx.batch_size
        initial = copy.deepcopy(student)

        teacher_metrics = evaluate_torch(teacher, ctx.data, batch)
        objective = distillation_objective(teacher, student, ctx.data, batch, config.temperature, config.alpha,
                                           config.features, config.feature_weight)
        ckpt = ctx.checkpoint_dir
        result = fit(student, ctx.data, config, batch, objective=objective, label="distill",
                     checkpoint_dir=ckpt / "distill" if ckpt else None, resume=ctx.resume,
                     fingerprint_extra=["distill", teacher_name])
        history, notes = result.pop("history"), result.pop("notes")
        metrics: dict[str, Any] = {**result, "teacher_accuracy": teacher_metrics["accuracy"],
                                   "teacher_params": count_params(teacher), "params": count_params(student)}
        notes.append(f"teacher: {teacher_name} (top-1 {teacher_metrics['accuracy']:.4f})")
        if config.shard_teacher:
            metrics["teacher_param_bytes"] = local_bytes(teacher.parameters())
            notes.extend([teacher_note] if teacher_note else [])
        if config.baseline:
            plain = TrainingConfig(**config.model_dump(include=set(TrainingConfig.model_fields)))
            base = fit(initial, ctx.data, plain, batch, label="baseline (no distillation)",
                       checkpoint_dir=ckpt / "baseline" if ckpt else None, resume=ctx.resume,
                       fingerprint_extra=["baseline"])
            metrics["baseline_accuracy"] = base["accuracy"]
            metrics["distillation_gain"] = result["accuracy"] - base["accuracy"]
            notes.append(f"the same student trained without distillation for {config.epochs} epoch(s) reached "
                         f"{base['accuracy']:.4f}; with distillation {result['accuracy']:.4f}")
        console.info(notes[-1])
        metrics["size_mb"] = new.size_mb()
        return StepResult(artifact=new, metrics=metrics, notes=notes, sections=[history_table(history)])

    def _run_text(self, artifact: Any, config: DistillConfig, ctx: Any) -> StepResult:
        """Label-free distillation of an hf: model on tokenized text (text_distillation_objective)."""
        if not hf.is_text_artifact(artifact):
            raise InputError("distill on text:FILE needs an hf: model (the student)")
        teacher, teacher_name = resolve_teacher(config, ctx, artifact)
        teacher = copy.deepcopy(teacher)
        student = copy.deepcopy(artifact.require_torch("distill"))
        new = artifact.derive("distill", module=student)
        batch = config.batch_size or ctx.batch_size
        if "temperature" in config.model_fields_set and artifact.builder["hf"].get("output") != "logits":
            raise InputError("distill on text: temperature applies to a classifier's logits; an encoder learns its "
                             "teacher's token states")
        try:
            objective = text_distillation_objective(teacher, student, ctx.data, batch, config.temperature)
        except InputError as exc:
            raise InputError(f"{teacher_name}: {exc}") from None
        return self._fit_label_free(artifact, new, student, teacher, teacher_name, objective, config, ctx, batch,
                                    "its pooled outputs")

    def _run_unlabelled(self, artifact: Any, config: DistillConfig, ctx: Any) -> StepResult:
        """Label-free distillation on unlabelled inputs (random:SHAPE; a dense or multi-output model's inputs): the
        student learns the teacher's outputs (output_distillation_objective)."""
        none = ctx.data.unlabelled_why or f"{ctx.data.name!r} has none"
        _refuse_given(config, "distill without labels", (
            ("features", f"feature pairs are learned beside labels, and {none}", config.features),
            ("alpha", f"alpha weighs the labels, and {none}", config.alpha < 1),
            ("baseline", f"the baseline trains on labels, and {none}", config.baseline),
            ("shard_teacher", f"the sharded teacher serves labelled training, and {none}", config.shard_teacher)))
        teacher, teacher_name = resolve_teacher(config, ctx, artifact)
        teacher = copy.deepcopy(teacher)
        if config.student:
            student = build_module(config.student, artifact.num_classes)
            new = artifact.derive("distill", module=student,
                                  builder={"spec": config.student, "num_classes": artifact.num_classes})
        else:
            student = copy.deepcopy(artifact.require_torch("distill"))
            new = artifact.derive("distill", module=student)
        new.vocab = _read_the_data(teacher, student, artifact.vocab, tuple(ctx.data.sample_shape))[1]
        batch = config.batch_size or ctx.batch_size
        objective = output_distillation_objective(teacher, student, ctx.data, batch, config.temperature)
        if ctx.data.name.startswith("random:"):
            objective.notes.append("the inputs are random noise: the student learns the teacher's outputs on noise, "
                                   "which need not carry over to real inputs; distil on real inputs where you can")
            console.warn(objective.notes[-1])
        return self._fit_label_free(artifact, new, student, teacher, teacher_name, objective, config, ctx, batch,
                                    "its outputs")

    def _fit_label_free(self, artifact: Any, new: Any, student: Any, teacher: Any, teacher_name: str, objective: Any,
                        config: DistillConfig, ctx: Any, batch: int, what: str) -> StepResult:
        """Train `student` on a label-free objective (validated by cosine to the teacher); the better of the
        student as it came and as trained is handed on."""
        import torch

        before = objective.validate(student, torch.device("cpu"))["cosine"]
        initial = copy.deepcopy(student)
        ckpt = ctx.checkpoint_dir
        result = fit(student, ctx.data, config, batch, objective=objective, label="distill",
                     checkpoint_dir=ckpt / "distill" if ckpt else None, resume=ctx.resume,
                     fingerprint_extra=["distill", teacher_name])
        history, notes = result.pop("history"), result.pop("notes")
        metrics: dict[str, Any] = {**result, "cosine_before": before, "teacher_params": count_params(teacher),
                                   "params": count_params(student), "size_mb": new.size_mb()}
        notes.append(f"teacher: {teacher_name}; no labels: the student learned the teacher's outputs on "
                     f"{ctx.data.name}. "
                     f"Mean cosine of {what} to the teacher's on the validation split: {before:.4f} "
                     f"before, {result['cosine']:.4f} after")
        console.info(notes[-1])
        if result["cosine"] < before:  # hand on the better model: the student as it came
            new = artifact.derive("distill", module=initial, builder=new.builder)
            metrics.update(cosine=before, cosine_trained=result["cosine"], size_mb=new.size_mb())
            notes.append(f"distillation left the student further from the teacher than it started ({before:.4f} -> "
                         f"{result['cosine']:.4f}), so the student is handed on as it came: try a lower --lr or "
                         "more epochs")
            console.warn(notes[-1])
        return StepResult(artifact=new, metrics=metrics, notes=notes, sections=[history_table(history)])


def _refuse_given(config: DistillConfig, case: str, rules: tuple[tuple[str, str, Any], ...]) -> None:
    """Refuse, in one line, the first option the user gave that does not apply in `case`: rules are (field, why,
    whether it applies at the value given). Options that do not apply are refused, never ignored."""
    for field, why, applies in rules:
        if field in config.model_fields_set and applies:
            raise InputError(f"{case}: {field.replace('_', '-')} is not supported ({why})")


def _read_the_data(teacher: Any, student: Any, data: int | None, shape: tuple[int, ...]) -> tuple[int | None, int | None]:
    """The teacher's and the student's input vocabularies (`input_vocabulary`; None: float inputs); refuse either
    when it cannot read the data (made for the current model, token ids below `data`): floats against ids, or
    fewer ids than the data holds."""
    vocabs = input_vocabulary(teacher, shape), input_vocabulary(student, shape)
    for who, vocab in zip(("teacher", "student"), vocabs):
        if (vocab is None) != (data is None) or vocab is not None and vocab < data:
            def what(v: int | None) -> str:
                return "float inputs" if v is None else f"token ids below {v}"

            raise InputError(f"the {who} reads {what(vocab)}, but the data holds {what(data)}: teacher and student "
                             "must read the same inputs")
    return vocabs
