"""Model specs: how a user names a model, and how mlopt builds the torch module from that name.

Supported specs:
- ``torchvision:NAME``: any torchvision classification model, built without pretrained weights
  (nothing is downloaded); pass ``--weights FILE`` for a state dict.
- ``path/to/file.py:factory``: imports the user's file and calls ``factory()``. This runs the
  user's own code, as importing any Python module does.
- ``package.module:factory``: imports an installed module and calls ``factory()``.
- ``hf:DIR``: a Hugging Face transformers model saved in a local directory (see mlopt.runtime.hf).

A factory that accepts a ``num_classes`` argument receives it. Weights are always read with
``torch.load(weights_only=True)``: mlopt never unpickles arbitrary objects.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

from mlopt.core.errors import InputError, first_line, format_shape, pickled_objects_error, refused_pickle
from mlopt.runtime import hf

_MODULE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def parse_shape(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224); every dimension must be a positive integer."""
    if isinstance(text, (list, tuple)):
        dims = list(text)
    else:
        parts = str(text).lower().replace(",", "x").split("x")
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"invalid shape {text!r}: expected integers joined by 'x', e.g. 1x3x224x224") from None
    if not dims or any(not isinstance(d, int) or d <= 0 for d in dims):
        raise InputError(f"invalid shape {text!r}: every dimension must be a positive integer")
    check_shape_size(dims, f"shape {text!r}")
    return tuple(dims)


#: The most values one shape (a sample, or a batch given with --input-shape) may hold: 1 GiB of float32.
MAX_SHAPE_VALUES = 1 << 28


def check_shape_size(dims: Any, what: str) -> None:
    """Refuse absurd dimensions before anything is allocated for them."""
    import math

    total = math.prod(int(d) for d in dims)
    if total > MAX_SHAPE_VALUES:
        raise InputError(f"{what} holds {total:,} values ({format_shape(list(dims))}); mlopt takes at most "
                         f"{MAX_SHAPE_VALUES:,} (1 GiB of float32) per shape")


def split_spec(spec: str) -> tuple[str, str]:
    """'torchvision:resnet18' -> ('torchvision', 'resnet18'); 'a/b.py:make' -> ('a/b.py', 'make')."""
    if ":" not in spec:
        raise InputError(f"unrecognised model {spec!r}: expected torchvision:NAME, FILE.py:FACTORY, "
                         "package.module:FACTORY, hf:DIR, an mlopt output directory or FILE.onnx")
    prefix, _, name = spec.rpartition(":")
    if not prefix or not name:
        raise InputError(f"unrecognised model {spec!r}: both sides of ':' must be given")
    return prefix, name


def spec_problem(spec: str) -> str | None:
    """What makes a PREFIX:NAME model spec unusable whatever files exist (`mlopt recipe validate`): an unknown
    prefix, a torchvision name torchvision does not have. None where the spec's form is fine; files are read
    when the model is built, and a spec without ':' is a path (an mlopt directory, a folder, FILE.onnx)."""
    from mlopt.runtime.decoder import GGUF_PREFIX

    if hf.is_hf_spec(spec) or spec.startswith(GGUF_PREFIX) or ":" not in spec or spec.endswith(".onnx"):
        return None
    try:
        prefix, name = split_spec(spec)
        if prefix == "torchvision":
            _build_torchvision_name(name)
        elif not prefix.endswith(".py") and not _MODULE_PATH.match(prefix):
            raise InputError(f"unrecognised model {spec!r}: unknown prefix {prefix!r}")
    except InputError as exc:
        return str(exc)
    return None


def build_module(spec: str, num_classes: int | None) -> Any:
    """Build an untrained torch module from a spec string (hf: models come with their weights)."""
    if hf.is_hf_spec(spec):
        return hf.build(spec)
    prefix, name = split_spec(spec)
    if prefix == "torchvision":
        return _build_torchvision(name, num_classes)
    if prefix.endswith(".py"):
        return _call_factory(_import_file(Path(prefix)), name, num_classes, spec)
    if _MODULE_PATH.match(prefix):
        try:
            module = importlib.import_module(prefix)
        except ModuleNotFoundError as exc:
            raise InputError(f"cannot import module {prefix!r} for model {spec!r}: {exc}") from exc
        return _call_factory(module, name, num_classes, spec)
    raise InputError(f"unrecognised model {spec!r}: unknown prefix {prefix!r}")


@functools.lru_cache(maxsize=None)
def _torchvision_task(name: str) -> str | None:
    """Which of torchvision's model families has `name`: classification (logits), video (logits of a clip) or
    segmentation (a dense map); None for none of them (detection and optical flow return lists and dicts).
    Cached: a build asks up to three times, and each ask lists all of torchvision's models."""
    import torchvision

    for task, module in (("classification", torchvision.models), ("video", torchvision.models.video),
                         ("segmentation", torchvision.models.segmentation)):
        if name in torchvision.models.list_models(module=module):
            return task
    return None


def _build_torchvision_name(name: str) -> None:
    """Refuse a name torchvision has no classification, video or segmentation model for, with the closest names."""
    import torchvision

    if _torchvision_task(name) is None:
        names = sorted({*torchvision.models.list_models(module=torchvision.models),
                        *torchvision.models.list_models(module=torchvision.models.video),
                        *torchvision.models.list_models(module=torchvision.models.segmentation)})
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise InputError(f"unknown torchvision classification, video or segmentation model {name!r}{hint}")


def torchvision_default_shape(name: str) -> tuple[int, ...]:
    """One sample's shape when none is given: 3x224x224 images; for a video model 16 frames at its weights'
    crop size (3x16x112x112 for r3d_18)."""
    if _torchvision_task(name) != "video":
        return (3, 224, 224)
    import torchvision

    crop = getattr(torchvision.models.get_model_weights(name).DEFAULT.transforms, "keywords", {}).get("crop_size")
    side = crop[0] if isinstance(crop, tuple) else 112
    return (3, 16, side, side)


def _build_torchvision(name: str, num_classes: int | None) -> Any:
    import torchvision

    _build_torchvision_name(name)
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if name.startswith(("inception", "googlenet")):
        kwargs.update(aux_logits=False, init_weights=False)
    if _torchvision_task(name) == "segmentation":  # no backbone download, no auxiliary head: the map alone
        return _segmentation_output()(torchvision.models.get_model(name, weights_backbone=None, aux_loss=False,
                                                                   **kwargs))
    return torchvision.models.get_model(name, **kwargs)


def _segmentation_output() -> Any:
    """A module that hands on a torchvision segmentation model's map (its output dict's "out")."""
    import torch

    class SegmentationOutput(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model(x)["out"]

    return SegmentationOutput


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    module_name = f"mlopt_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import model file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _call_factory(module: Any, name: str, num_classes: int | None, spec: str) -> Any:
    import torch

    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        candidates = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(name, candidates, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"{spec!r}: no callable named {name!r}{hint}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {"num_classes": num_classes} if num_classes is not None and "num_classes" in params else {}
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise InputError(f"{spec!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{spec!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    refuse_scripted(model, spec)
    return as_float32(model, spec)


def refuse_scripted(module: Any, origin: str) -> None:
    """TorchScript modules (torch.jit.script, torch.jit.trace, torch.jit.load) inside a model: Torch-Pruning cannot
    hook or change their layers and neither ONNX exporter can trace through them (measured: prune raised
    "register_forward_hook is not supported on ScriptModules", export "Sequential.forward() takes 2 positional
    arguments but 3 were given"), so the model is refused at once, in one line."""
    import torch

    scripted: list[str] = []
    for name, m in module.named_modules():  # outermost first: a scripted module's own children are not named
        if isinstance(m, torch.jit.ScriptModule) and not any(s == "" or name.startswith(f"{s}.") for s in scripted):
            scripted.append(name)
    scripted = [name or "the model itself" for name in scripted]
    if scripted:
        raise InputError(f"{origin}: {', '.join(scripted[:3])}{' and more' if len(scripted) > 3 else ''} "
                         f"{'is a TorchScript module' if len(scripted) == 1 else 'are TorchScript modules'} "
                         "(torch.jit.script, trace or load), which mlopt can neither prune nor export: build the "
                         "model from its plain torch.nn.Module code")


def as_float32(module: Any, origin: str) -> Any:
    """A model whose weights are float16 or bfloat16 is turned to float32 (lossless), with a warning: mlopt prunes,
    trains on the CPU and exports in float32 (onnxruntime's CPU kernels), then quantizes; fed float32 inputs, the
    model as it came failed on its first layer ("Input type (float) and bias type (c10::Half) should be the
    same")."""
    import torch

    low = sorted({str(t.dtype).removeprefix("torch.") for t in (*module.parameters(), *module.buffers())
                  if t.dtype in (torch.float16, torch.bfloat16)})
    if low:
        from mlopt.core import console

        console.warn(f"{origin}: its weights are {' and '.join(low)}; mlopt works on the model in float32 (every "
                     "value kept exactly), as onnxruntime's CPU kernels run it")
        module.float()
    return module


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """Read a state dict without unpickling arbitrary objects."""
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} is a directory" if path.is_dir() else f"weights file {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols on its way to refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if refused_pickle(exc):
            raise pickled_objects_error(f"weights {path}", exc) from None
        operand = re.search(r"Unsupported operand \d+", str(exc))  # garbage, or a pickle of plain Python data
        if operand:
            detail = f" ({operand.group(0)})"
        elif isinstance(exc, KeyError):  # torch's legacy reader met an unknown magic number: says nothing more
            detail = ""
        else:
            detail = f" ({first_line(exc).split('. ')[0]})"
        raise InputError(f"cannot read weights {path}: not a valid PyTorch state dict{detail}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise InputError(f"weights {path} do not hold a state dict (a mapping of names to tensors)")
    return state


def cpu_state_dict(module: Any) -> dict[str, Any]:
    """The module's state dict as CPU tensors, with torch's per-module versions (``_metadata``), which
    modules such as torchvision's MNASNet require when they load it."""
    state = module.state_dict()
    for k, v in state.items():
        state[k] = v.detach().cpu().contiguous()
    return state


def apply_state_dict(module: Any, state: dict[str, Any], source: str) -> None:
    """Load weights strictly, turning key and shape mismatches into one readable line. A state dict
    saved without per-module versions (a plain dict) is read as written by this module's own versions."""
    from collections import OrderedDict

    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {k}: model {tuple(own[k].shape)} vs file "
                         f"{tuple(state[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise InputError(f"weights {source} do not fit the model: " + "; ".join(parts))
    if not hasattr(state, "_metadata"):
        state = OrderedDict(state)
        state._metadata = own._metadata  # type: ignore[attr-defined]
    module.load_state_dict(state, strict=True)


def count_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def documented_image_size(spec: str | None) -> int | None:
    """The image size a torchvision model was built for: the crop size of its default weights' transforms."""
    if not spec or not spec.startswith("torchvision:"):
        return None
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(spec.partition(":")[2]).DEFAULT.transforms
    except (ValueError, KeyError, AttributeError):
        return None
    size = getattr(transforms, "keywords", {}).get("crop_size")
    return int(size) if isinstance(size, int) else None


def _channel_fix(conv: tuple[str, Any] | None, data_channels: int) -> str | None:
    """'its first convolution (conv1) takes 3 channels but the data has 1: give --channels 3 ...'."""
    if conv is None or conv[1].in_channels == data_channels:
        return None
    name, wanted = conv[0], conv[1].in_channels
    text = f"its first convolution ({name}) takes {wanted} channel{'s' if wanted != 1 else ''} but the data has {data_channels}"
    how = {(1, 3): "repeats the grey channel", (3, 1): "averages the colour channels"}.get((data_channels, wanted))
    if how:
        text += f": give --channels {wanted} (in a recipe, data.channels: {wanted}), which {how}"
    return text


def flat_tensors(y: Any) -> list[Any]:
    """The tensors in a model's output, in order: a tensor, or nested tuples, lists and dicts of them (a Hugging
    Face ModelOutput too); what the ONNX exporters make graph outputs of, in the same order."""
    import torch

    flat, todo = [], [y]
    while todo:
        item = todo.pop(0)
        if isinstance(item, torch.Tensor):
            flat.append(item)
        elif isinstance(item, (tuple, list)):
            todo[:0] = list(item)
        elif isinstance(item, dict):
            todo[:0] = list(item.values())
        elif hasattr(item, "to_tuple"):  # Hugging Face ModelOutput
            todo[:0] = list(item.to_tuple())
    return flat


VOCAB_KEY = "mlopt.input_vocabulary"  # ONNX metadata written by mlopt's export: token ids are valid below it


def input_vocabulary(module: Any, sample_shape: tuple[int, ...]) -> int | None:
    """Where the model's input is integer token ids (a text classifier whose input goes into an nn.Embedding or
    nn.EmbeddingBag): the number of ids that every such layer the input reaches takes, else None. Found by running
    one float sample with hooks on the embeddings (only models that have one): an embedding handed that float
    tensor is where the model reads its input as ids."""
    import torch

    embeddings = [m for m in module.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    if not embeddings:
        return None
    fed: list[int] = []

    def hook(m: Any, args: tuple[Any, ...]) -> Any:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            fed.append(m.num_embeddings)
            return (args[0].long(), *args[1:])  # zeros as ids: the forward goes on to every embedding the input reaches
        return None

    handles = [m.register_forward_pre_hook(hook) for m in embeddings]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros((1, *sample_shape)))
    except Exception:
        pass  # an embedding fails on float ids once its hook has seen them; other failures are probe_output's
    finally:
        for h in handles:
            h.remove()
    return min(fed) if fed else None


def parse_vocabulary(value: str | None) -> int | None:
    """A vocabulary size read from a file's metadata (`VOCAB_KEY`): a plain positive number, else None."""
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 12 or int(value) <= 0:
        return None
    return int(value)


def synthetic_input(shape: tuple[int, ...], vocab: int | None = None, generator: Any = None,
                    zeros: bool = False) -> Any:
    """A made-up input of `shape` (batch first): Gaussian noise (zeros with `zeros`), or token ids below `vocab`
    (uniform; zeros with `zeros`) for a model that reads ids (`input_vocabulary`)."""
    import torch

    if vocab is None:
        return torch.zeros(shape) if zeros else torch.randn(shape, generator=generator)
    return torch.zeros(shape, dtype=torch.long) if zeros else torch.randint(0, vocab, shape, generator=generator)


def probe_output(module: Any, sample_shape: tuple[int, ...], spec: str | None = None,
                 vocab: int | None = None) -> int | None:
    """The number of output classes where the model returns logits (batch, classes), else None: a dense output (a
    segmentation map, a feature map, an image) or several outputs (a tuple or dict: detection heads, several
    tasks). Such a model is compared by its outputs, not scored on labels."""
    shapes = probe_output_shapes(module, sample_shape, spec, vocab)
    return shapes[0][1] if len(shapes) == 1 and len(shapes[0]) == 2 else None


def probe_output_shapes(module: Any, sample_shape: tuple[int, ...], spec: str | None = None,
                        vocab: int | None = None) -> list[tuple[int, ...]]:
    """Run one dummy sample through the model; return the shapes of the tensors it returns (batch first): logits
    (1, classes), a dense output such as (1, channels, height, width), or several (a tuple, list or dict of tensors,
    flattened in order).

    A shape the model rejects becomes an InputError naming the shape and, where the tool can tell,
    the fix: the channels the model's first convolution takes (the first one the input reaches, found
    with hooks, so any model whose first layer is a convolution is covered) and, for torchvision
    models, the image size they were built for.
    """
    import torch

    module.eval()
    x = synthetic_input((1, *sample_shape), vocab, zeros=True)
    convs = [(n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    reached: list[tuple[str, Any]] = []

    def hook(name: str, args: tuple[Any, ...]) -> None:
        if not reached:
            shape = tuple(getattr(args[0], "shape", ())) if args else ()
            reached.append((name, shape))

    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: hook(n, args)) for n, m in convs]
    try:
        with torch.no_grad():
            y = module(x)
    except Exception as exc:
        channels = size_hint = None
        if len(sample_shape) >= 2:
            if reached:  # the data reached a convolution with its channels unchanged: that one decides
                name, shape = reached[0]
                first = (name, dict(convs)[name]) if len(shape) >= 2 and shape[1] == sample_shape[0] else None
            else:  # it failed before any convolution ran (a size check, say): the first one declared
                first = convs[0] if convs else None
            channels = _channel_fix(first, sample_shape[0])
            size = documented_image_size(spec)
            if size is not None and len(sample_shape) == 3 and tuple(sample_shape[1:]) != (size, size):
                size_hint = f"{spec.partition(':')[2]} was built for {size}x{size} images (--image-size {size})"
        parts = [channels or first_line(exc)] + ([size_hint] if size_hint else [])  # the fix, else what the model said
        raise InputError(f"the model rejects input of shape {format_shape((1, *sample_shape))}: "
                         f"{'; '.join(parts)}") from exc
    finally:
        for h in handles:
            h.remove()
    tensors = flat_tensors(y)
    if not tensors or any(t.dim() < 2 or t.shape[0] != 1 for t in tensors):
        got = ", ".join(format_shape(tuple(t.shape)) for t in tensors[:4]) if tensors else type(y).__name__
        raise InputError("the model must return tensors with a batch axis and at least one more (logits (batch, "
                         f"classes), a map (batch, channels, height, width), or a tuple or dict of such); it returned "
                         f"{got} for a batch of 1")
    return [tuple(int(d) for d in t.shape) for t in tensors]


def shape_attributes(module: Any) -> dict[str, dict[str, Any]]:
    """Every submodule's plain size attributes (in_channels, num_features, embed_dim, ...).

    Structured pruning changes some of them; the changed ones are recorded in model.json so that
    the pruned model reloads from its spec and a state dict, without unpickling a module.
    """
    out = {}
    for name, m in module.named_modules():
        attrs = {}
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training" or isinstance(v, bool):
                continue
            if isinstance(v, int) or (isinstance(v, tuple) and all(isinstance(i, int) for i in v)):
                attrs[k] = list(v) if isinstance(v, tuple) else v
        out[name] = attrs
    return out


def changed_attributes(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    changed = {name: {k: v for k, v in attrs.items() if before.get(name, {}).get(k) != v}
               for name, attrs in after.items()}
    return {name: diff for name, diff in changed.items() if diff}


def reparametrized(module: Any) -> list[str]:
    """The submodules whose weights are computed from other tensors on every call: torch.nn.utils.parametrize
    (weight_norm, spectral_norm, orthogonal in torch.nn.utils.parametrizations) or the older weight_norm and
    spectral_norm hooks (`weight_g`/`weight_v`, `weight_orig`)."""
    from torch.nn.utils import parametrize

    return [name for name, m in module.named_modules()
            if parametrize.is_parametrized(m) or any(type(h).__name__ in _NORM_HOOKS for h in m._forward_pre_hooks.values())]


_NORM_HOOKS = ("WeightNorm", "SpectralNorm")


def bake_reparametrized(module: Any, names: list[str] | None = None) -> list[str]:
    """Replace each reparametrized weight (`reparametrized`) by a plain parameter holding its current value: the
    module computes the same outputs, and structured pruning can cut the weight itself (Torch-Pruning replaces
    `weight`, which a parametrization or a norm hook computes, and fails with "attribute 'weight' already exists").
    `names` (a pruned model's model.json) bakes those submodules of a freshly built model; returns what was baked."""
    from torch.nn.utils import parametrize

    found = reparametrized(module)
    if names is not None:
        unknown = sorted(set(names) - set(found))
        if unknown:
            raise InputError(f"model.json records reparametrized weights in {unknown[0]!r}, which the model does not "
                             "reparametrize")
        found = [n for n in found if n in set(names)]
    for name in found:  # not under no_grad: there remove_parametrizations leaves a plain tensor, not a Parameter
        m = module.get_submodule(name)
        if parametrize.is_parametrized(m):
            for tensor in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, tensor, leave_parametrized=True)
        for key, hook in list(m._forward_pre_hooks.items()):
            if type(hook).__name__ in _NORM_HOOKS:
                hook.remove(m)  # sets the hook's tensor to its current value, as a plain parameter
                del m._forward_pre_hooks[key]
    return found


def apply_recorded_shapes(module: Any, recorded: dict[str, dict[str, Any]], state: dict[str, Any]) -> None:
    """Give a freshly built module the pruned shapes: attributes from model.json, tensor sizes from the state dict."""
    import torch

    for name, attrs in (recorded or {}).items():
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            raise InputError(f"model.json records pruned shapes for {name!r}, which the model does not have") from None
        for k, v in (attrs.items() if isinstance(attrs, dict) else ()):
            current = vars(sub).get(k)
            sized = isinstance(current, (int, tuple)) and not isinstance(current, bool) and not k.startswith("_")
            plain = isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, int) for i in v))
            if not (sized and plain):  # only the size attributes shape_attributes records, never methods or hooks
                raise InputError(f"model.json records {k}={v!r:.60} for {name!r}, which is not one of its size attributes")
            setattr(sub, k, tuple(v) if isinstance(current, tuple) or isinstance(v, list) else v)
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor) or tuple(current.shape) == tuple(value.shape):
            continue
        if isinstance(current, torch.nn.Parameter):
            setattr(owner, attr, torch.nn.Parameter(torch.empty(value.shape, dtype=current.dtype),
                                                    requires_grad=current.requires_grad))
        else:
            owner.register_buffer(attr, torch.empty(value.shape, dtype=current.dtype))
