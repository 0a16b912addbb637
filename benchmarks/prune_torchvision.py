"""Structured pruning of every torchvision classifier: prune, export with parity, one Markdown table.

    python benchmarks/prune_torchvision.py [--models resnet18,mnasnet0_5] [--out prune_torchvision.md]
        [--timeout 600] [--memory-gb 12] [--jobs 1] [--timm [--more]] [--family video|segmentation]

With --family video or segmentation, torchvision's video classifiers (clips, VIDEO_CLIPS) or segmentation models
(their maps: the output must be 1x10xSxS) instead.

With --timm, timm's classifiers instead (`pip install timm`; a spread of families by default, TIMM_MODELS, or
with --more a second spread, TIMM_MORE), built by `benchmarks/timm_model.py` with random weights.

For each model of `torchvision.models.list_models(module=torchvision.models)`, in child processes:
`mlopt prune --model torchvision:NAME --num-classes 10 --ratio 0.5 --input-shape 1x3xSxS --json`
(which times the FP32 model before and after on onnxruntime, batch 1), `mlopt export` of the result
(which checks onnxruntime against PyTorch), then one onnxruntime run of the exported model (its
output must still be 1x10 and finite). S is the smallest input that keeps the model meaningful
(input_size). Each model has a wall-clock limit (its three commands together) and a memory limit
(resident memory of each command, sampled; stopped above it). The table is rewritten after each
model, so an interrupted sweep keeps what it measured. Latency ratios are comparable only with --jobs 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import psutil
except ImportError:
    psutil = None

ROOT = Path(__file__).resolve().parents[1]
GOOD_MACS_RATIO = 1.5


# timm classifiers (--timm): a spread of families, CNNs and transformers, the small variant of each
TIMM_MODELS = ("resnet18,convnext_atto,efficientnet_b0,mobilenetv3_small_050,regnetx_002,vit_tiny_patch16_224,"
               "deit_tiny_patch16_224,swin_tiny_patch4_window7_224,mobilevit_xxs,levit_128s,poolformer_s12,"
               "coatnet_nano_rw_224,ghostnet_100,repvgg_a0,densenet121,dla34,cspresnet50,edgenext_xx_small,fastvit_t8,"
               "efficientformer_l1,tiny_vit_5m_224,hrnet_w18_small,mixer_b16_224,resmlp_12_224,xcit_nano_12_p16_224,"
               "gcvit_xxtiny,maxvit_nano_rw_256,nfnet_l0,rexnet_100").split(",")
# --timm --more: a second spread of families, none of them in the first
TIMM_MORE = ("cait_xxs24_224,pvt_v2_b0,eva02_tiny_patch14_224,deit3_small_patch16_224,convit_tiny,crossvit_tiny_240,"
             "efficientvit_b0,efficientvit_m0,inception_v3,mobileone_s0,hgnetv2_b0,res2net50_14w_8s,dpn68,"
             "mobilenetv4_conv_small,regnety_002,sebotnet33ts_256,ese_vovnet19b_dw,davit_tiny,hiera_tiny_224,pit_ti_224,"
             "starnet_s1,fasternet_t0,mambaout_femto,gmlp_ti16_224,repvit_m0_9,swiftformer_xs,resnest14d,skresnet18,"
             "sequencer2d_s,focalnet_tiny_srf").split(",")
# timm models whose position embeddings, windows or token grids are built for their input size
TIMM_FIXED_SIZE = ("vit", "deit", "swin", "levit", "mobilevit", "coatnet", "fastvit", "efficientformer", "mixer",
                   "resmlp", "xcit", "gcvit", "maxvit", "cait", "pvt", "eva", "convit", "crossvit", "efficientvit_m",
                   "sebotnet", "botnet", "halonet", "sequencer", "davit", "hiera", "pit_", "gmlp", "swiftformer",
                   "focalnet", "inception_v3", "nest_", "coat_", "twins", "volo", "visformer", "shvit", "tnt_")


def input_size(name: str) -> int:
    """The smallest square input that keeps a model meaningful (small, so each model takes minutes)."""
    if name.startswith("timm:"):
        name = name.removeprefix("timm:")
        return next((int(p) for p in name.split("_")[::-1] if p.isdigit() and int(p) >= 64), 224) \
            if any(f in name for f in TIMM_FIXED_SIZE) else 64
    if name.startswith(("vit_", "maxvit_")):
        return 224  # vit: the position embedding is sized for 224x224; maxvit: its window grid is built for 224
    if name == "inception_v3":
        return 75  # its stem and reductions need at least 75x75 (74 leaves a 2x2 map under a 3x3 kernel)
    return 64  # every other CNN, and swin (it pads to its windows): a 2x2 map before the global pooling


# torchvision video classifiers (--family video): frames and side of the smallest clip each runs on. MViT's
# position embeddings are built for 16x224x224; S3D pools 2x7x7 at the end of 8x time and 32x space reductions.
VIDEO_CLIPS = {"mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224), "s3d": (16, 224)}


def family(name: str) -> str:
    """classification, video or segmentation: which torchvision list the model is in (timm: classification)."""
    if name.startswith("timm:"):
        return "classification"
    import torchvision

    for kind, module in (("video", torchvision.models.video), ("segmentation", torchvision.models.segmentation)):
        if name in torchvision.models.list_models(module=module):
            return kind
    return "classification"


def sample_dims(name: str) -> list[int]:
    """One sample's shape: 3xSxS images (input_size), or 3xFRAMESxSxS clips for a video model (8x64x64 unless
    VIDEO_CLIPS says more)."""
    if family(name) == "video":
        frames, side = VIDEO_CLIPS.get(name, (8, 64))
        return [3, frames, side, side]
    size = input_size(name)
    return [3, size, size]


def expected_output(name: str, classes: int) -> str:
    """The exported model's output shape for a batch of one: logits, or a segmentation model's map."""
    dims = sample_dims(name)
    return "x".join(map(str, [1, classes, *dims[1:]])) if family(name) == "segmentation" else f"1x{classes}"


def _rss(pid: int) -> int:
    """Resident bytes of the process and its descendants (with /proc: its session, which it started)."""
    if psutil is not None:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return 0
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[3]) == pid:
                total += int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass  # the process ended while it was read
    return total


def run_child(cmd: list[str], timeout: float, limit: int) -> dict:
    """Run cmd; kill its whole session past `timeout` seconds or `limit` resident bytes."""
    start, peak, killed = time.monotonic(), 0, None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        while proc.poll() is None:
            peak = max(peak, _rss(proc.pid))
            killed = "timeout" if time.monotonic() - start > timeout else "out of memory" if peak > limit else None
            if killed:
                break
            time.sleep(0.2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child, or what it left running
        except ProcessLookupError:
            pass
        proc.wait()
        out.seek(0), err.seek(0)
        return {"rc": proc.returncode, "stdout": out.read().decode(errors="replace"), "killed": killed,
                "stderr": err.read().decode(errors="replace"), "peak": peak, "seconds": time.monotonic() - start}


def status(run: dict) -> str:
    """ok, timeout, out of memory, refused: <mlopt's one-line error>, or crashed: <what is known>."""
    if run["killed"]:
        return run["killed"]
    if run["rc"] == 0:
        return "ok"
    if run["rc"] < 0:
        return f"crashed: signal {signal.Signals(-run['rc']).name}"
    errors = [line for line in run["stderr"].splitlines() if line.startswith("error: ")]
    if not errors:
        tail = run["stderr"].strip().splitlines()
        return f"crashed: exit {run['rc']}" + (f", {tail[-1]}" if tail else "")
    line = re.sub(r"\x1b\[[0-9;]*m", "", errors[-1].removeprefix("error: "))  # colours an exporter printed
    # an exception mlopt did not expect: handle_errors points to the traceback
    return f"crashed: {line}" if "MLOPT_DEBUG=1" in line else f"refused: {line}"


# Runs the exported model once on onnxruntime: its output must still be (1, classes) and finite.
CHECK_OUTPUT = """import json, sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal([int(d) for d in sys.argv[2].split("x")], dtype=np.float32)
y = s.run(None, {s.get_inputs()[0].name: x})[0]
print(json.dumps({"shape": list(y.shape), "finite": bool(np.isfinite(y).all())}))"""


def measure(name: str, timeout: float, limit: int) -> dict:
    """Prune, export, run the exported model once; the row's raw figures."""
    dims, classes = sample_dims(name), 10
    shape = "x".join(map(str, [1, *dims]))
    row = {"model": name, "input": "x".join(map(str, dims[1:])), "metrics": {}, "parity": None, "peak": 0,
           "seconds": 0.0}
    mlopt = [sys.executable, "-m", "mlopt"]
    with tempfile.TemporaryDirectory(prefix=f"prune-{name.replace(':', '-')}-") as tmp:
        spec = f"benchmarks.timm_model:{name.removeprefix('timm:')}" if name.startswith("timm:") else f"torchvision:{name}"
        steps = [("prune", [*mlopt, "prune", "--model", spec, "--num-classes", str(classes),
                            "--ratio", "0.5", "--input-shape", shape, "--out", f"{tmp}/pruned", "--json"]),
                 ("export", [*mlopt, "export", "--model", f"{tmp}/pruned", "--out", f"{tmp}/onnx", "--json"]),
                 ("output", [sys.executable, "-c", CHECK_OUTPUT, f"{tmp}/onnx/model.onnx", shape])]
        for step, cmd in steps:
            run = run_child(cmd, timeout - row["seconds"], limit)
            row["peak"], row["seconds"] = max(row["peak"], run["peak"]), row["seconds"] + run["seconds"]
            row["status"] = status(run)
            if row["status"] != "ok":
                if step == "export":  # the pruned model failed to reload, export, or match PyTorch
                    row["parity"] = row["status"].removeprefix("refused: ")
                if step != "prune":
                    row["status"] = f"{step} " + row["status"].replace("refused: ", "failed: ", 1)
                return row
            try:
                result = read_json(run["stdout"])
            except ValueError:
                row["status"] = f"crashed: {step} printed no JSON result"
                return row
            if step == "prune":
                row["metrics"] = result
            elif step == "export":
                top1 = "" if result.get("top1_agreement") is None else f", top-1 {result['top1_agreement']:.2f}"
                row["parity"] = f"ok (max error {result['max_abs_error']:.1e}{top1})"
            else:
                row["status"] = output_status(result, expected_output(name, classes))
    return row


def read_json(stdout: str) -> dict:
    """The JSON object a command printed last (mlopt's --json prints it indented, after anything a
    library printed on stdout)."""
    return json.JSONDecoder().raw_decode(stdout, stdout.rfind("\n{\n") + 1)[0]


def output_status(result: dict, expected: str) -> str:
    """ok, or what is wrong with the exported model's output (a pruned classifier, NaNs)."""
    shape = "x".join(map(str, result["shape"]))
    if shape != expected:
        return f"wrong output: {shape} instead of {expected}"
    return "ok" if result["finite"] else "wrong output: not finite"


def _si(n: float) -> str:
    return next(f"{n / scale:.3g}{unit}" for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")) if n >= scale or scale == 1)


def _change(m: dict, key: str) -> str:
    if f"{key}_after" not in m:
        return "-"
    return f"{_si(m[f'{key}_before'])} -> {_si(m[f'{key}_after'])} ({m[f'{key}_ratio']:.2f}x)"


def good(row: dict) -> bool:
    """Pruned to at least 1.5x fewer MACs, ran, and exported with parity."""
    return row["metrics"].get("macs_ratio", 0) >= GOOD_MACS_RATIO and row["status"] == "ok"


def table(rows: list[dict]) -> str:
    """The Markdown table and the summary line."""
    head = ["model", "input", "MACs before -> after", "parameters before -> after", "groups kept whole",
            "onnxruntime latency ratio", "export parity", "peak RSS", "wall time", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["metrics"]
        speedup = f"{m['latency_speedup']:.2f}x" if "latency_speedup" in m else "-"
        cells = [r["model"], r["input"], _change(m, "macs"), _change(m, "params"),
                 str(m.get("groups_kept_whole", "-")), speedup, r["parity"] or "-", f"{r['peak'] / 1e9:.1f} GB",
                 f"{r['seconds']:.0f} s", r["status"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    counts = {}
    for r in rows:
        kind = r["status"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    others = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    lines += ["", f"{sum(map(good, rows))} of {len(rows)} pruned with >= {GOOD_MACS_RATIO}x fewer MACs, ran, and "
                  f"exported with parity ({others})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated names (default: every torchvision classifier)")
    p.add_argument("--timm", action="store_true", help="timm classifiers instead (pip install timm; default: "
                   "TIMM_MODELS, a spread of families)")
    p.add_argument("--more", action="store_true", help="with --timm: the second spread, TIMM_MORE")
    p.add_argument("--family", choices=("classification", "video", "segmentation"), default="classification",
                   help="which of torchvision's model lists (default: its classifiers)")
    p.add_argument("--out", type=Path, help="write the Markdown table there too")
    p.add_argument("--timeout", type=float, default=600, help="seconds per model, prune and export together")
    p.add_argument("--memory-gb", type=float, default=12, help="resident memory above which a model is stopped")
    p.add_argument("--jobs", type=int, default=1, help="models measured at once")
    args = p.parse_args()
    if args.timm:
        names = [f"timm:{n}" for n in (args.models.split(",") if args.models else TIMM_MORE if args.more else TIMM_MODELS)]
    elif args.models:
        names = args.models.split(",")
    else:
        import torchvision

        module = {"classification": torchvision.models, "video": torchvision.models.video,
                  "segmentation": torchvision.models.segmentation}[args.family]
        names = torchvision.models.list_models(module=module)
    rows: dict[str, dict] = {}
    lock = threading.Lock()

    def one(name: str) -> None:
        row = measure(name, args.timeout, int(args.memory_gb * 1e9))
        with lock:
            rows[name] = row
            print(f"{name}: {row['status']} ({row['seconds']:.0f} s, {row['peak'] / 1e9:.1f} GB)", file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(table([rows[n] for n in names if n in rows]))

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, names))
    print(table([rows[n] for n in names]), end="")


if __name__ == "__main__":
    main()
