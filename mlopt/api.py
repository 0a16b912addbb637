"""The Python API: `mlopt.run(recipe)` and one function per step type, over the runner the commands use.

    import mlopt
    result = mlopt.prune(model, torch.zeros(1, 3, 32, 32), ratio=0.5)   # model: a torch.nn.Module
    result.model, result.report["step"]["metrics"]

`mlopt.<type>(...)` (see `step`) exists for every registered step type, plugins included. A module
handed in is copied, never changed. Its artifact is saved as a plain state dict and a model.json that
records no way to rebuild it (mlopt pickles no class): loading such a folder is refused with a message;
the result keeps the live module. Errors raise mlopt.core.errors exceptions.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from mlopt.core.contracts import PASSES
from mlopt.core.errors import InputError
from mlopt.run.recipe import Recipe, load_recipe, recipe_from_dict
from mlopt.run.runner import RunResult, run_recipe
from mlopt.runtime.artifacts import Artifact
from mlopt.runtime.models import as_float32, input_vocabulary, probe_output, refuse_scripted

__all__ = ["Recipe", "RunResult", "run", "step"]


def run(recipe: "Recipe | dict[str, Any] | str | Path", out: str | Path | None = None, overwrite: bool = False,
        resume: bool = False) -> RunResult:
    """Run a recipe (a Recipe, a mapping laid out like a YAML recipe, or a YAML file's path) as `mlopt run` does.

    `out`: the run folder (one NN-<type>/ folder per step and the reports); None keeps nothing on disk but
    a final ONNX model (see `_run`). The result holds the run report (`report`), the final model (`model`) and the gate rows (`gates`,
    `passed`); a failed gate is not an exception here.
    """
    recipe_file = None
    if isinstance(recipe, (str, Path)):
        recipe_file, recipe = str(recipe), load_recipe(Path(recipe))
    elif isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe, "recipe")
    elif not isinstance(recipe, Recipe):
        raise InputError(f"mlopt.run takes a Recipe, a mapping or a YAML file's path, not {type(recipe).__name__}")
    if resume and out is None:
        raise InputError("resume needs the out folder of the run to continue")
    return _run(recipe, out, overwrite=overwrite, flat=False, recipe_file=recipe_file, resume=resume)


def step(step_type: str, model: Any, example_input: Any = None, *, data: "str | dict[str, Any] | None" = None,
         out: str | Path | None = None, overwrite: bool = False, **config: Any) -> RunResult:
    """Run one step of type `step_type` on `model`, as its command does; `mlopt.<step type>(...)` calls this.

    model: a torch module, or anything a recipe's model.spec names (FILE.onnx, an mlopt folder, torchvision:NAME).
    config: the fields of the step's config, validated like a recipe's (an unknown key is an error).
    example_input: a tensor (or a shape) whose first axis is the batch; it gives the input shape.
    data: a data source ("digits", "npz:FILE", ...) or a mapping of the data settings (source, batch_size, ...).
    out: the folder for the new model and report.json / report.md. None: nothing is kept on disk, except
    an ONNX model a step makes, which is left in a new temporary folder (`result.out`) for the caller.
    """
    if step_type not in PASSES:
        raise InputError(f"unknown step type {step_type!r}; expected one of {', '.join(sorted(PASSES))}")
    shape = None if example_input is None else tuple(int(d) for d in getattr(example_input, "shape", example_input))
    module = _is_module(model)
    if module and shape is None:
        raise InputError(f"mlopt.{step_type}: give example_input (a tensor with a batch axis) for a torch module")
    raw: dict[str, Any] = {"version": 1, "model": {"spec": _spec(model, module)},
                           "steps": [{"type": step_type, **config}]}
    if shape is not None and not module:
        raw["model"]["input_shape"] = "x".join(map(str, shape))
    if data is not None:
        raw["data"] = {"source": data} if isinstance(data, str) else data
    recipe = recipe_from_dict(raw, f"mlopt.{step_type}()")
    ready = _module_artifact(model, shape) if module else None
    return _run(recipe, out, overwrite=overwrite, flat=True, model=ready)


def _run(recipe: Recipe, out: str | Path | None, **options: Any) -> RunResult:
    """run_recipe; out=None: in a scratch folder, kept (as `result.out`) only where it holds the ONNX model made."""
    if out is not None:
        return run_recipe(recipe, Path(out), **options)
    scratch = Path(tempfile.mkdtemp(prefix="mlopt-"))
    try:
        result = run_recipe(recipe, scratch / "out", **options)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    onnx_path = result.artifact.onnx_path
    if result.artifact.format in ("torch", "causal-lm") or scratch not in Path(onnx_path).parents:
        shutil.rmtree(scratch, ignore_errors=True)  # a module is in the result; an ONNX file given stays where it is
        result.out = None
    return result


def _is_module(model: Any) -> bool:
    if isinstance(model, (str, Path)):
        return False
    import torch

    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, an ONNX file or a model spec, not {type(model).__name__}")
    return True


def _spec(model: Any, module: bool) -> str:
    """The recipe's model.spec: what the user named, or a module's class (shown in the report; names no file)."""
    return f"<module {type(model).__module__}.{type(model).__qualname__}>" if module else str(model)


def _module_artifact(model: Any, shape: tuple[int, ...]) -> Any:
    """A copy of the module as the run's first model; model.json will record that it cannot be rebuilt."""
    import copy

    if len(shape) < 2:
        raise InputError(f"example_input of shape {tuple(shape)} has no batch axis; give e.g. torch.zeros(1, 3, 32, 32)")
    spec = _spec(model, True)
    refuse_scripted(model, spec)
    module = as_float32(copy.deepcopy(model).cpu(), spec)
    vocab = input_vocabulary(module, shape[1:])
    classes = probe_output(module, shape[1:], spec, vocab)
    return Artifact(format="torch", sample_shape=shape[1:], num_classes=classes, module=module, origin=spec,
                    builder={"spec": None, "num_classes": classes, "module": spec[len("<module "):-1]}, vocab=vocab)


def _step_function(step_type: str) -> Callable[..., RunResult]:
    def function(model: Any, example_input: Any = None, **kwargs: Any) -> RunResult:
        return step(step_type, model, example_input, **kwargs)

    config = PASSES[step_type].config_class
    function.__name__ = function.__qualname__ = step_type
    fields = ", ".join(f for f in config.model_fields if f != "type")
    function.__doc__ = (f"{PASSES[step_type].cli_help or config.__doc__ or step_type}\n\nmlopt.{step_type}(model, "
                        f"example_input, data=None, out=None, overwrite=False, **config): the config keys are the "
                        f"fields of {config.__name__} ({fields}); see mlopt.api.step.")
    return function


def __getattr__(name: str) -> Any:
    """`mlopt.api.prune` and the like: one function per registered step type."""
    if name in PASSES:
        return _step_function(name)
    raise AttributeError(f"module 'mlopt.api' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *PASSES})
