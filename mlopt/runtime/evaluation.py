"""Top-1 accuracy and loss on the validation split, for a torch module or an ONNX file."""

from __future__ import annotations

from typing import Any

from mlopt.core import console
from mlopt.core.errors import InputError
from mlopt.runtime.data import Dataset, loader, require_labels
from mlopt.runtime.session import make_session, run_session


def _score(batches: Any, predict: Any, total: int, label: str) -> dict[str, Any]:
    import torch.nn.functional as F

    correct, loss_sum, seen = 0, 0.0, 0
    with console.progress(label, total=total) as bar:
        for x, y in batches:
            logits = predict(x)
            if logits.dim() != 2:
                raise InputError(f"the model returned shape {tuple(logits.shape)}; expected logits (batch, classes)")
            if int(y.max()) >= logits.shape[1]:
                raise InputError(f"label {int(y.max())} is outside the model's {logits.shape[1]} classes")
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
            bar.advance(len(y), acc=f"{correct / seen:.4f}")
    if seen == 0:
        raise InputError("the validation split is empty")
    return {"accuracy": correct / seen, "loss": loss_sum / seen, "samples": seen}


def evaluate_torch(module: Any, data: Dataset, batch_size: int, device: Any = None) -> dict[str, Any]:
    import torch

    require_labels(data, "accuracy")
    module.eval()

    def predict(x: Any) -> Any:
        with torch.no_grad():
            return module(x.to(device) if device is not None else x).float().cpu()

    return _score(loader(data.val, batch_size), predict, len(data.val), "evaluate")


def predict_logits(module: Any, dataset: Any, batch_size: int) -> Any:
    """The module's outputs (eval mode, no gradients) for a whole split, in order, as one tensor."""
    import torch

    module.eval()
    with torch.no_grad():
        return torch.cat([module(batch[0]).float() for batch in loader(dataset, batch_size)])


def evaluate_onnx(path: Any, data: Dataset, batch_size: int) -> dict[str, Any]:
    import torch

    require_labels(data, "accuracy")
    session = make_session(path, "cpu")
    return _score(loader(data.val, batch_size), lambda x: torch.from_numpy(run_session(session, x.numpy())),
                  len(data.val), "evaluate (onnxruntime)")


def evaluate_artifact(artifact: Any, data: Dataset, batch_size: int) -> dict[str, Any]:
    if artifact.format == "onnx":
        return evaluate_onnx(artifact.onnx_path, data, batch_size)
    return evaluate_torch(artifact.module, data, batch_size)
