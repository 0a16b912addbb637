"""benchmarks/prune_torchvision.py: the input-size rule, the status of a child run, its limits and the table."""

import importlib.util
import sys

from conftest import TESTS

_spec = importlib.util.spec_from_file_location("prune_torchvision", TESTS.parent / "benchmarks" / "prune_torchvision.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_input_size_per_family():
    assert [bench.input_size(n) for n in ("resnet18", "swin_t", "googlenet", "inception_v3", "vit_b_16", "maxvit_t")] \
        == [64, 64, 64, 75, 224, 224]
    timm = ("timm:resnet18", "timm:vit_tiny_patch16_224", "timm:maxvit_nano_rw_256", "timm:levit_128s")
    assert [bench.input_size(n) for n in timm] == [64, 224, 256, 224]
    more = ("timm:crossvit_tiny_240", "timm:sebotnet33ts_256", "timm:dpn68", "timm:inception_v3")
    assert [bench.input_size(n) for n in more] == [240, 256, 64, 224]
    assert not set(bench.TIMM_MORE) & set(bench.TIMM_MODELS)


def test_video_and_segmentation_models_get_clips_and_maps():
    assert bench.sample_dims("r3d_18") == [3, 8, 64, 64] and bench.sample_dims("mvit_v2_s") == [3, 16, 224, 224]
    assert bench.sample_dims("fcn_resnet50") == [3, 64, 64] and bench.sample_dims("resnet18") == [3, 64, 64]
    assert bench.expected_output("fcn_resnet50", 10) == "1x10x64x64"
    assert bench.expected_output("r3d_18", 10) == bench.expected_output("timm:resnet18", 10) == "1x10"


def _run(rc, stderr="", killed=None):
    return {"rc": rc, "stderr": stderr, "killed": killed}


def test_status_of_a_child_run():
    assert bench.status(_run(0)) == "ok"
    assert bench.status(_run(-9, killed="timeout")) == "timeout"
    assert bench.status(_run(2, "warning: x\nerror: cannot trace the model\n")) == "refused: cannot trace the model"
    assert bench.status(_run(1, "error: IndexError: index 96 is out of bounds (set MLOPT_DEBUG=1 for the traceback)")) \
        == "crashed: IndexError: index 96 is out of bounds (set MLOPT_DEBUG=1 for the traceback)"
    assert bench.status(_run(1, "Traceback (most recent call last):\nValueError: bad\n")) == "crashed: exit 1, ValueError: bad"
    assert bench.status(_run(-11)) == "crashed: signal SIGSEGV"
    assert bench.status(_run(2, "error: export failed: \x1b[96mstep 2/3\x1b[0m of it\n")) == "refused: export failed: step 2/3 of it"


def test_json_result_after_noise_on_stdout():
    printed = 'Maximum recursive depth reached!\n{\n  "macs_ratio": 3.5,\n  "x": {\n    "a": 1\n  }\n}\n'
    assert bench.read_json(printed) == {"macs_ratio": 3.5, "x": {"a": 1}}
    assert bench.read_json('{"shape": [1, 10], "finite": true}\n') == {"shape": [1, 10], "finite": True}


def test_output_of_the_exported_model():
    assert bench.output_status({"shape": [1, 10], "finite": True}, "1x10") == "ok"
    assert bench.output_status({"shape": [1, 5], "finite": True}, "1x10") == "wrong output: 1x5 instead of 1x10"
    assert bench.output_status({"shape": [1, 10], "finite": False}, "1x10") == "wrong output: not finite"
    assert bench.output_status({"shape": [1, 10, 8, 8], "finite": True}, "1x10x8x8") == "ok"


def test_child_is_stopped_past_its_limits():
    sleeper = bench.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3, limit=1 << 40)
    assert sleeper["killed"] == "timeout" and sleeper["seconds"] < 5 and sleeper["rc"] < 0
    hog = bench.run_child([sys.executable, "-c", "import time; b = b'x' * 400_000_000; time.sleep(30)"], 30, 200_000_000)
    assert hog["killed"] == "out of memory" and hog["peak"] > 200_000_000 and hog["seconds"] < 10
    done = bench.run_child([sys.executable, "-c", "print('{}')"], 30, 1 << 40)
    assert (done["killed"], done["rc"], done["stdout"].strip()) == (None, 0, "{}")


def test_table_and_summary():
    pruned = {"macs_before": 1.82e9, "macs_after": 4.6e8, "macs_ratio": 3.96, "params_before": 11_689_512,
              "params_after": 2_950_000, "params_ratio": 3.96, "latency_speedup": 3.41, "groups_kept_whole": 2}
    rows = [{"model": "resnet18", "input": "64x64", "metrics": pruned, "parity": "ok (2.1e-06)", "peak": 1.3e9,
             "seconds": 41.2, "status": "ok"},
            {"model": "vit_b_16", "input": "224x224", "metrics": {}, "parity": None, "peak": 2e9, "seconds": 12,
             "status": "refused: no group | can be pruned"},
            {"model": "squeezenet1_1", "input": "64x64", "metrics": {**pruned, "macs_ratio": 1.2}, "parity": "ok (1e-6)",
             "peak": 5e8, "seconds": 9, "status": "ok"}]
    lines = bench.table(rows).splitlines()
    assert lines[0].startswith("| model | input | MACs before -> after |") and len(lines) == 2 + 3 + 2
    assert lines[2] == ("| resnet18 | 64x64 | 1.82G -> 460M (3.96x) | 11.7M -> 2.95M (3.96x) | 2 | 3.41x | ok (2.1e-06) "
                        "| 1.3 GB | 41 s | ok |")
    assert lines[3] == "| vit_b_16 | 224x224 | - | - | - | - | - | 2.0 GB | 12 s | refused: no group \\| can be pruned |"
    assert lines[-1] == "1 of 3 pruned with >= 1.5x fewer MACs, ran, and exported with parity (ok: 2, refused: 1)."
