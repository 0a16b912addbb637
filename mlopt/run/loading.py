"""The recipe's model and data, loaded and checked against each other: the run's first artifact."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mlopt.core import console
from mlopt.core.errors import InputError, format_shape
from mlopt.runtime import decoder, gguf, hf
from mlopt.runtime.artifacts import Artifact, load_artifact, looks_like_artifact
from mlopt.runtime.data import check_labels, load_data
from mlopt.runtime.models import (apply_state_dict, build_module, input_vocabulary, load_state_dict_file, parse_shape,
                                  probe_output, probe_output_shapes, torchvision_default_shape)

if TYPE_CHECKING:
    from mlopt.run.recipe import Recipe
    from mlopt.runtime.data import Dataset


def prepare(recipe: "Recipe", model: "Artifact | None" = None) -> tuple["Artifact", "Dataset | None"]:
    """Load the recipe's model (or take `model`, ready in memory: the Python API) and data, and check that they fit.

    A saved model remembers its input shape; when the data section leaves image_size and
    channels unset, they are taken from the model, so `mlopt eval --model DIR --data digits`
    feeds a model trained on resized digits the same resized digits.
    """
    loaded, data_cfg = model, recipe.data
    if loaded is None and looks_like_artifact(recipe.model.spec):
        if recipe.model.weights:
            raise InputError("--weights applies to a model spec, not to an mlopt directory or ONNX file")
        loaded = load_artifact(recipe.model.spec)
    shape = loaded.sample_shape if loaded is not None else None
    if data_cfg is not None and shape is not None and len(shape) == 3 and not data_cfg.source.startswith("text:"):
        fill = {}
        if data_cfg.channels is None and shape[0] in (1, 3):  # what images convert to; else the shapes disagree below
            fill["channels"] = shape[0]
        if data_cfg.image_size is None and shape[1] == shape[2]:
            fill["image_size"] = shape[1]
        data_cfg = data_cfg.model_copy(update=fill)
    data = load_data(data_cfg) if data_cfg is not None else None
    if loaded is not None and loaded.is_decoder or loaded is None and is_decoder_spec(recipe.model.spec):
        return decoder_artifact(recipe, data, loaded), data
    text_spec = recipe.model.spec if hf.is_hf_spec(recipe.model.spec) else None
    if loaded is not None and hf.is_text_artifact(loaded):
        text_spec = loaded.builder["spec"]
    if data is not None and data.text != (text_spec is not None):
        if data.text:
            raise InputError(f"text data ({data.name}) needs an hf: model, whose tokenizer reads it; {recipe.model.spec} is not one")
        raise InputError(f"{recipe.model.spec} is a text model: give --data text:FILE (one example a line), not {data.name}")
    if data is not None and data.text:
        data = hf.tokenize(data, text_spec, data_cfg.max_length)
    artifact = initial_artifact(recipe, data, loaded)
    ids = artifact.vocab is not None or artifact.integer_input and not hf.is_text_artifact(artifact)
    if data is not None and not data.text and ids:  # hf: text models' ids come from their tokenizer
        data = data.as_token_ids(artifact.vocab, data_cfg.seed)
    dense = dense_output(artifact) if data is not None and data.labeled else None
    if dense is not None:  # labels cannot score such an output; the inputs still serve (calibration, fidelity)
        what = f"the model returns {dense}, not one logits tensor (batch, classes)"
        data = data.inputs_only(f"{what}: the labels of {data.name!r} cannot score that")
        console.warn(f"{what}: the labels of {data.name!r} are not used; its inputs are, and models are compared by "
                     "the cosine of their outputs")
    return artifact, data


def dense_output(artifact: "Artifact") -> str | None:
    """The output's shapes (as text) where they are not logits (batch, classes): a segmentation map, a feature map,
    several outputs."""
    if artifact.format == "torch" and artifact.num_classes is None and not hf.is_text_artifact(artifact):
        shapes = probe_output_shapes(artifact.module, tuple(artifact.sample_shape), vocab=artifact.vocab)
        return " and ".join(map(format_shape, shapes))
    if artifact.format == "onnx" and artifact.onnx_path is not None:
        import onnx

        outputs = onnx.load(str(artifact.onnx_path), load_external_data=False).graph.output
        shapes = [tuple(d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim)
                  for o in outputs]
        if len(shapes) > 1 or shapes[0] and len(shapes[0]) != 2:
            return " and ".join(map(format_shape, shapes))
    return None


def is_decoder_spec(spec: str) -> bool:
    """gguf:FILE, an onnxruntime-genai folder (mlopt's output or anyone's), or hf:DIR whose config names a causal
    LM (a folder that is not there is not one: its error comes where the model loads)."""
    if gguf.is_gguf_spec(spec) or decoder.is_genai_folder(spec):
        return True
    if not hf.is_hf_spec(spec) or not (Path(spec[len(hf.PREFIX):]).expanduser() / "config.json").is_file():
        return False
    return decoder.is_causal_lm(hf.read_config(spec))


def decoder_artifact(recipe: "Recipe", data: "Dataset | None", loaded: "Artifact | None") -> "Artifact":
    """A decoder language model: its HF folder (to export) or a genai folder. Its text stays raw lines:
    perplexity windows and prompts are cut from the text itself, not from padded lines."""
    cfg = recipe.model
    if data is not None and not data.text:
        raise InputError(f"{cfg.spec} is a decoder language model: give --data text:FILE, not {data.name}")
    if recipe.data is not None and "max_length" in recipe.data.model_fields_set:
        raise InputError("--max-length does not apply to a decoder language model: its text is cut into perplexity "
                         "windows (ptq and eval take --window)")
    for name in ("input_shape", "weights", "num_classes"):
        if getattr(cfg, name) is not None:
            raise InputError(f"--{name.replace('_', '-')} does not apply to a decoder language model ({cfg.spec})")
    if loaded is not None:
        return loaded
    if gguf.is_gguf_spec(cfg.spec):  # dequantized once into an HF folder, kept in mlopt's cache
        spec = f"{hf.PREFIX}{gguf.to_hf_folder(gguf.gguf_file(cfg.spec))}"
    else:
        spec = _absolute_spec(cfg.spec)
    config = hf.read_config(spec)
    info = {"architecture": str((config.get("architectures") or [""])[0]), "model_type": config.get("model_type")}
    return Artifact(format="causal-lm", sample_shape=None, num_classes=None, origin=cfg.spec,
                    builder={"spec": spec, "decoder": info})


def initial_artifact(recipe: "Recipe", data: "Dataset | None", loaded: "Artifact | None" = None) -> "Artifact":
    """Turn the recipe's model section into the first artifact, checking it against the data."""
    cfg = recipe.model
    shape = None
    if cfg.input_shape is not None:
        full = parse_shape(cfg.input_shape)
        if len(full) < 2:
            raise InputError(f"--input-shape {cfg.input_shape} must include the batch dimension, e.g. 1x3x224x224")
        shape = full[1:]
    if data is not None:
        if shape is not None and tuple(shape) != tuple(data.sample_shape):
            raise InputError(f"--input-shape {cfg.input_shape} disagrees with the data's samples "
                             f"({format_shape(data.sample_shape)})")
        shape = tuple(data.sample_shape)
    if loaded is not None:
        if shape is not None:
            # A text model's sequence axis is dynamic: it takes the data's length.
            fixed = loaded.sample_shape is not None and not hf.is_text_artifact(loaded)
            if fixed and tuple(loaded.sample_shape) != tuple(shape):
                raise InputError(f"{cfg.spec} takes inputs of shape {format_shape(loaded.sample_shape)} per "
                                 f"sample, but the data gives {format_shape(shape)}")
            loaded.sample_shape = tuple(shape)
        if loaded.num_classes is not None and data is not None:
            check_labels(data, loaded.num_classes)
        return loaded

    import torch

    num_classes = cfg.num_classes if cfg.num_classes is not None else (data.num_classes if data else None)
    torch.manual_seed(cfg.seed)  # a reproducible random initialisation
    module = build_module(cfg.spec, num_classes)
    if cfg.weights:
        apply_state_dict(module, load_state_dict_file(Path(cfg.weights)), cfg.weights)
    if hf.is_hf_spec(cfg.spec):
        if shape is not None and len(shape) != 1:
            raise InputError(f"--input-shape {cfg.input_shape} for a text model must be BATCHxSEQUENCE, e.g. 1x128")
        info = hf.model_info(cfg.spec)
        classes = (module.model.config.num_labels or None) if info["output"] == "logits" else None
        return Artifact(format="torch", sample_shape=tuple(shape or (128,)), num_classes=classes,
                        builder={"spec": _absolute_spec(cfg.spec), "num_classes": classes, "hf": info},
                        module=module, origin=cfg.spec)
    if shape is None and not cfg.spec.startswith("torchvision:"):
        raise InputError(f"give --input-shape for {cfg.spec} (for example 1x3x224x224): the model does not imply one")
    shape = shape or torchvision_default_shape(cfg.spec.partition(":")[2])
    vocab = input_vocabulary(module, tuple(shape))
    classes = probe_output(module, tuple(shape), cfg.spec, vocab)
    if data is not None:
        check_labels(data, classes)
    return Artifact(format="torch", sample_shape=tuple(shape), num_classes=classes, module=module, origin=cfg.spec,
                    builder={"spec": _absolute_spec(cfg.spec), "num_classes": classes}, vocab=vocab)


def _absolute_spec(spec: str) -> str:
    """File specs are stored with an absolute path so the artifact reloads from anywhere."""
    if hf.is_hf_spec(spec):
        return f"{hf.PREFIX}{Path(spec[len(hf.PREFIX):]).expanduser().resolve()}"
    prefix, _, name = spec.rpartition(":")
    if prefix.endswith(".py"):
        return f"{Path(prefix).resolve()}:{name}"
    return spec
