"""Knowledge distillation objectives for the training engine.

Logit distillation (Hinton et al.): KL divergence between temperature-softened teacher and student
distributions, mixed with the hard-label loss by `alpha`. Feature distillation: mean squared error
between named intermediate outputs, through a learned 1x1 convolution or linear projection when
the widths differ. The teacher runs in eval mode without gradients; with logit distillation only,
its outputs are computed once and cached (mlopt's data is not augmented, so they do not change).
"""

from __future__ import annotations

from typing import Any

from mlopt.compress.lib.engine import Objective
from mlopt.compress.lib.pruning import submodule
from mlopt.core.errors import InputError, first_line
from mlopt.runtime.data import loader
from mlopt.runtime.evaluation import predict_logits
from mlopt.runtime.hf import pooled_torch
from mlopt.runtime.models import flat_tensors


class _FeaturePair:
    """Captures one teacher and one student layer output and projects the student's to the teacher's width."""

    def __init__(self, teacher: Any, student: Any, t_name: str, s_name: str, sample: Any):
        import torch
        from torch import nn

        self.t_out: Any = None
        self.s_out: Any = None
        t_layer = submodule(teacher, t_name, f"the teacher has no layer named {t_name!r}")
        s_layer = submodule(student, s_name, f"the student has no layer named {s_name!r}")
        self.handles = [t_layer.register_forward_hook(lambda m, i, o: setattr(self, "t_out", o)),
                        s_layer.register_forward_hook(lambda m, i, o: setattr(self, "s_out", o))]
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

    def loss(self) -> Any:
        import torch.nn.functional as F

        s = self.proj(self.s_out.float())
        t = self.t_out.float().detach()
        if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return F.mse_loss(s, t)


def distillation_objective(teacher: Any, student: Any, data: Any, batch_size: int, temperature: float, alpha: float,
                           features: list[str] | tuple[str, ...] = (), feature_weight: float = 1.0) -> Objective:
    """The loss of a student learning from `teacher` (logits, plus TEACHER_LAYER:STUDENT_LAYER `features`)."""
    import torch
    import torch.nn.functional as F

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    sample = data.train[0][0].unsqueeze(0)
    pairs = [_FeaturePair(teacher, student, *pair.split(":"), sample) for pair in features]
    cache: dict[str, Any] = {}
    if not pairs:
        cache["logits"] = predict_logits(teacher, data.train, batch_size)

    def loss(model: Any, x: Any, y: Any, indices: Any) -> tuple[Any, Any]:
        logits = model(x)
        if "logits" in cache:
            t_logits = cache["logits"][torch.as_tensor(indices, device=cache["logits"].device)]
        else:
            with torch.no_grad():
                t_logits = teacher(x)
        T = temperature
        kd = F.kl_div(F.log_softmax(logits.float() / T, 1), F.log_softmax(t_logits.float() / T, 1),
                      reduction="batchmean", log_target=True) * T * T
        total = alpha * kd + (1 - alpha) * F.cross_entropy(logits.float(), y)
        for pair in pairs:
            total = total + feature_weight * pair.loss()
        return total, logits

    def to_device(dev: Any) -> None:
        teacher.to(dev)
        if "logits" in cache:
            cache["logits"] = cache["logits"].to(dev)

    return Objective(loss=loss, modules=[p.proj for p in pairs], to_device=to_device,
                     hooks=[h for p in pairs for h in p.handles])


def output_distillation_objective(teacher: Any, student: Any, data: Any, batch_size: int,
                                  temperature: float) -> Objective:
    """Label-free distillation on unlabelled inputs (random:SHAPE, or the inputs of a model whose output labels
    cannot score: a segmentation map, several outputs): the student learns the teacher's outputs on the same
    inputs. Logits alone (N x C): KL divergence at `temperature`. Anything else, output by output: the mean
    squared error relative to the teacher's mean square (scale-free), plus 1 - each sample's cosine. Validation
    scores each sample's least faithful output's cosine to the teacher's, averaged (as ptq's fidelity does)."""
    import torch
    import torch.nn.functional as F

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    first = data.train[0][0].unsqueeze(0)
    with torch.no_grad():
        probe, mine = flat_tensors(teacher(first)), flat_tensors(student(first))
    if [t.shape for t in probe] != [t.shape for t in mine]:
        raise InputError(f"the teacher's outputs {[tuple(t.shape) for t in probe]} and the student's "
                         f"{[tuple(t.shape) for t in mine]} differ: distillation without labels learns the "
                         "teacher's outputs as they are")
    logits = len(probe) == 1 and probe[0].dim() == 2

    def compare(outs: list[Any], targets: list[Any]) -> Any:
        if logits:
            T = temperature
            return F.kl_div(F.log_softmax(outs[0].float() / T, -1), F.log_softmax(targets[0].float() / T, -1),
                            reduction="batchmean", log_target=True) * T * T
        total = 0
        for out, target in zip(outs, targets):
            out, target = out.float().flatten(1), target.float().flatten(1)
            mse = ((out - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-12)
            total = total + mse + (1 - F.cosine_similarity(out, target, dim=1)).mean()
        return total / len(outs)

    def loss(model: Any, x: Any, y: Any, indices: Any) -> tuple[Any, Any]:
        with torch.no_grad():
            targets = flat_tensors(teacher(x))
        outs = flat_tensors(model(x))
        return compare(outs, targets), outs[0]

    def validate(module: Any, dev: Any) -> dict[str, float]:
        module.eval()
        losses, cosines, n = [], [], 0
        with torch.no_grad():
            for batch in loader(data.val, batch_size):
                x = batch[0].to(dev)
                outs, targets = flat_tensors(module(x)), flat_tensors(teacher(x))
                losses.append(float(compare(outs, targets)) * len(x))
                per_output = [F.cosine_similarity(o.float().flatten(1), t.float().flatten(1), dim=1)
                              for o, t in zip(outs, targets)]
                cosines.append(torch.stack(per_output).min(0).values.cpu())
                n += len(x)
        return {"loss": sum(losses) / n, "cosine": float(torch.cat(cosines).mean())}

    return Objective(loss=loss, to_device=teacher.to, labels=False, validate=validate, metric="cosine")


_CACHE_BYTES = 1 << 30  # the teacher's outputs on the train split are kept when they fit in this much memory


def text_distillation_objective(teacher: Any, student: Any, data: Any, batch_size: int,
                                temperature: float) -> Objective:
    """Label-free distillation on tokenized text: the student learns the teacher's outputs on the same tokens.

    Token states (an encoder's last_hidden_state, N x L x H): the mean squared error over real tokens, divided by
    the teacher's mean square (scale-free), plus 1 - cosine of the mean-pooled sentence embeddings (what a sentence
    encoder is used for). Where pruning kept the layers and their width (heads and feed-forward width pruned), the
    student also learns every layer's output from the teacher's same layer (layer-wise distillation, as in
    TinyBERT and CoFi: a pruned layer is taught what it must hand on, not only the last one). Logits (N x C, a
    classifier): KL divergence at `temperature`, as for images. Validation scores the mean cosine of the student's
    pooled outputs to the teacher's on the validation split (1 = the same).
    """
    import torch
    import torch.nn.functional as F

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    first = {k: v[None] for k, v in data.train[0].items()}
    try:
        with torch.no_grad():
            probe, mine = teacher(**first), student(**first)
    except (TypeError, RuntimeError, IndexError) as exc:  # a teacher of another vocabulary or inputs
        raise InputError(f"the teacher does not run on the student's tokens ({type(exc).__name__}: "
                         f"{first_line(exc)[:160]})") from None
    if not isinstance(probe, torch.Tensor) or not isinstance(mine, torch.Tensor) or probe.shape != mine.shape:
        shapes = [tuple(getattr(t, "shape", ())) for t in (probe, mine)]
        raise InputError(f"the teacher's output {shapes[0]} and the student's {shapes[1]} differ in shape: "
                         "distillation on text learns the teacher's outputs as they are")
    tokens = probe.dim() == 3
    layers = _LayerOutputs.pair(teacher, student, first)
    state: dict[str, Any] = {"dev": torch.device("cpu")}
    if layers is None and probe[0].numel() * 4 * len(data.train) <= _CACHE_BYTES:
        state["train"] = _outputs(teacher, data.train, batch_size)
    val_teacher = _outputs(teacher, data.val, batch_size)

    def teacher_out(x: Any, indices: Any) -> Any:
        if "train" in state:  # the batch may be shorter than the cached lines (trailing padding dropped)
            cached = state["train"][torch.as_tensor(indices)]
            return (cached[:, :x["input_ids"].shape[1]] if cached.dim() == 3 else cached).to(state["dev"])
        with torch.no_grad():
            return teacher(**x).float()

    def token_mse(out: Any, target: Any, m: Any) -> Any:
        """Mean squared error over real tokens, relative to the target's mean square."""
        mse = ((out - target) ** 2 * m).sum() / (m.sum() * out.shape[-1])
        scale = ((target ** 2) * m).sum() / (m.sum() * out.shape[-1])
        return mse / scale.clamp_min(1e-12)

    def compare(out: Any, target: Any, mask: Any) -> Any:
        out = out.float()
        if not tokens:
            T = temperature
            return F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(target / T, -1), reduction="batchmean",
                            log_target=True) * T * T
        cos = F.cosine_similarity(pooled_torch(out, mask), pooled_torch(target, mask), dim=-1)
        return token_mse(out, target, mask.to(out.dtype).unsqueeze(-1)) + (1 - cos).mean()

    def loss(model: Any, x: Any, y: Any, indices: Any) -> tuple[Any, Any]:
        target = teacher_out(x, indices)  # with layers: the teacher's forward fills its layer outputs
        out = model(**x)
        total = compare(out, target, x["attention_mask"])
        if layers is not None:
            m = x["attention_mask"].float().unsqueeze(-1)
            total = total + sum(token_mse(s.float(), t.float(), m) for s, t in layers.outputs()) / layers.count
        return total, out

    def validate(module: Any, dev: Any) -> dict[str, float]:
        module.eval()
        losses, cosines, start = [], [], 0
        with torch.no_grad():
            for batch in loader(data.val, batch_size):
                x = {k: v.to(dev) for k, v in batch.items()}
                out = module(**x).float().cpu()
                target = val_teacher[start:start + len(out)]
                start += len(out)
                mask = batch["attention_mask"]
                losses.append(float(compare(out, target, mask)) * len(out))
                cosines.append(F.cosine_similarity(pooled_torch(out, mask), pooled_torch(target, mask), dim=-1))
        return {"loss": sum(losses) / start, "cosine": float(torch.cat(cosines).mean())}

    def to_device(dev: Any) -> None:
        teacher.to(dev)
        state["dev"] = dev

    objective = Objective(loss=loss, to_device=to_device, labels=False, validate=validate, metric="cosine",
                          hooks=layers.handles if layers else [])
    frozen = _freeze_unreached(student, lambda: loss(student, first, None, [0])[0])  # train[0] is `first`
    objective.thawed += frozen
    if frozen:
        objective.notes.append(f"{sum(p.numel() for p in frozen)} parameters of the student that its outputs do not "
                               "depend on (such as a pooler beside the token states) are not trained")
    return objective


def _freeze_unreached(student: Any, loss: Any) -> list[Any]:
    """Stop training the student's parameters the loss does not reach (a BERT pooler beside last_hidden_state):
    data-parallel training expects every trainable parameter to get a gradient. Returns those frozen (the objective
    makes them trainable again when training ends)."""
    was = student.training
    student.train()
    loss().backward()
    frozen = [p for p in student.parameters() if p.requires_grad and p.grad is None]
    for p in frozen:
        p.requires_grad_(False)
    student.zero_grad(set_to_none=True)
    student.train(was)
    return frozen


class _LayerOutputs:
    """Forward hooks on the teacher's and the student's stack of layers (the longest ModuleList: BERT's
    encoder.layer, ...), which hold each layer's last output (its hidden states) after a forward pass."""

    def __init__(self, teacher_layers: Any, student_layers: Any):
        self.count = len(teacher_layers)
        self.teacher: list[Any] = [None] * self.count
        self.student: list[Any] = [None] * self.count
        self.handles = []
        for i, (t, s) in enumerate(zip(teacher_layers, student_layers)):
            self.handles += [
                t.register_forward_hook(lambda m, a, o, i=i: self.teacher.__setitem__(i, _first_tensor(o))),
                s.register_forward_hook(lambda m, a, o, i=i: self.student.__setitem__(i, _first_tensor(o)))]

    def outputs(self) -> list[tuple[Any, Any]]:
        return list(zip(self.student, self.teacher))

    @classmethod
    def pair(cls, teacher: Any, student: Any, sample: dict[str, Any]) -> "_LayerOutputs | None":
        """Hooks on both models' layers, when they have the same number of layers and every layer's output has
        the same shape in both (pruning kept the width); else None (the last output is learned alone)."""
        import torch

        t_name, t_layers = _layer_stack(teacher)
        s_layers = dict(student.named_modules()).get(t_name) if t_name else None
        if t_layers is None or not isinstance(s_layers, torch.nn.ModuleList) or len(s_layers) != len(t_layers):
            return None
        pairs = cls(t_layers, s_layers)
        was = student.training
        student.eval()
        with torch.no_grad():
            teacher(**sample), student(**sample)
        student.train(was)
        if all(isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.dim() == 3 and s.shape == t.shape
               for s, t in pairs.outputs()):
            return pairs
        for handle in pairs.handles:
            handle.remove()
        return None


def _layer_stack(module: Any) -> tuple[str | None, Any]:
    import torch

    stacks = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    return max(stacks, key=lambda nm: len(nm[1]), default=(None, None))


def _first_tensor(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def _outputs(module: Any, dataset: Any, batch_size: int) -> Any:
    """The module's outputs on a split of tokenized text, in order (CPU, float32)."""
    import torch

    with torch.no_grad():
        return torch.cat([module(**batch).float() for batch in loader(dataset, batch_size)])
