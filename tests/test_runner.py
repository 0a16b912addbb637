"""The runner (plan, execute_step, finish) and what --resume hashes (mlopt/run/resume.py)."""

import json

import pytest

from mlopt.core.errors import InputError, RunError
from mlopt.export.bench import BenchConfig
from mlopt.export.export import ExportConfig, ExportPass
from mlopt.run import resume
from mlopt.run.outdir import MARKER
from mlopt.run.recipe import recipe_from_dict
from mlopt.report.schema import SCHEMA_VERSION
from mlopt.run.runner import plan, run_recipe

from conftest import TOY


def _recipe(steps, data=None):
    raw = {"version": 1, "model": {"spec": f"{TOY}:tiny_cnn", "input_shape": "1x1x8x8"}, "steps": steps}
    if data:
        raw["data"] = data
    return recipe_from_dict(raw, "test")


def test_resume_digest_ignores_folders_named_like_unmarked_values(tmp_path, monkeypatch):
    # The reported bug: a folder named `export/` in the working directory changed the hash of {type: export}.
    monkeypatch.chdir(tmp_path)
    step = ExportConfig(exporter="torchscript")
    before = resume.step_digest(step, [], [])
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "notes.txt").write_text("mine")
    (tmp_path / "torchscript").write_text("mine too")
    assert resume.named_files(step) == {}
    assert resume.step_digest(step, [], []) == before


def test_resume_digest_follows_the_files_of_marked_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.onnx").write_bytes(b"one")
    step = BenchConfig(compare=["other.onnx"])
    before = resume.step_digest(step, [], [])
    assert list(resume.named_files(step)) == ["other.onnx"]
    (tmp_path / "other.onnx").write_bytes(b"two")  # same name, other content
    assert resume.step_digest(step, [], []) != before
    assert resume.step_digest(step, ["data"], []) != resume.step_digest(step, [], [])  # and the inputs
    assert resume.step_digest(step, [], ["model"]) != resume.step_digest(step, [], [])


def test_resume_reads_model_and_data_specs_by_their_scheme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text("def build():\n    return None\n")
    (tmp_path / "train.npz").write_bytes(b"one")

    def fingerprints(spec, source):
        recipe = recipe_from_dict({"version": 1, "model": {"spec": spec}, "data": {"source": source},
                                   "steps": [{"type": "eval"}]}, "test")
        return resume.model_fingerprint(recipe), resume.data_fingerprint(recipe)

    specs = [("torchvision:resnet18", "digits"), ("net.py:build", "random:1x8x8"), ("mlp.mod:build", "npz:train.npz")]
    before = [fingerprints(*s) for s in specs]
    assert [fp[0][1] for fp in before] == [{}, {"net.py": resume.path_fingerprint(tmp_path / "net.py")}, {}]
    assert [list(fp[1][1]) for fp in before] == [["scikit-learn"], [], ["train.npz"]]
    # Folders named like a scheme, a source or a name in those specs are not what the specs name.
    for name in ("torchvision", "resnet18", "digits", "random", "1x8x8", "build", "npz", "mlp.mod"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    assert [fingerprints(*s) for s in specs] == before
    (tmp_path / "net.py").write_text("def build():\n    return 1\n")  # the FILE.py of FILE.py:build changed
    (tmp_path / "train.npz").write_bytes(b"two")
    after = [fingerprints(*s) for s in specs]
    assert after[0] == before[0] and after[1][0] != before[1][0] and after[2][1] != before[2][1]


def test_a_completed_step_counts_only_with_identical_config_and_inputs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("step")  # hand-written reports: not under tmp_path, whose reports are validated
    step = {"config": {"type": "eval"}, "inputs_sha256": "abc", "metrics": {"accuracy": 0.5}}
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": 1, "kind": "step", "step": step}))
    assert resume.completed_step(tmp_path, {"type": "eval"}, "abc") is None  # an earlier mlopt's report: rerun
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "kind": "step", "step": step}))
    assert resume.completed_step(tmp_path, {"type": "eval"}, "abc") == step
    assert resume.completed_step(tmp_path, {"type": "eval", "batch_size": 8}, "abc") is None
    assert resume.completed_step(tmp_path, {"type": "eval"}, "abd") is None
    assert resume.completed_step(tmp_path / "missing", {"type": "eval"}, "abc") is None
    (tmp_path / "report.json").write_text("{half written")
    assert resume.completed_step(tmp_path, {"type": "eval"}, "abc") is None


def test_plan_refuses_a_step_without_its_data_before_writing(tmp_path):
    with pytest.raises(InputError, match="step 'train' needs data"):
        plan(_recipe([{"type": "train"}]), tmp_path / "out", overwrite=False, flat=False, resume=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_failed_step_leaves_no_staging_and_resume_skips_the_steps_done(tmp_path, monkeypatch):
    from mlopt.export.eval import EvalPass

    calls = []

    def counted(cls, fail_once=False):
        real = cls.run

        def run(self, artifact, config, ctx):
            calls.append(config.type)
            if fail_once and calls.count(config.type) == 1:
                (ctx.out_dir / "half.json").write_text("{")
                raise RunError("the disk is on fire")
            return real(self, artifact, config, ctx)

        monkeypatch.setattr(cls, "run", run)

    counted(ExportPass)
    counted(EvalPass, fail_once=True)
    steps = [{"type": "export", "exporter": "torchscript", "opset": 18}, {"type": "eval"}]
    recipe = _recipe(steps, data={"source": "digits"})
    out = tmp_path / "run"
    with pytest.raises(RunError, match="on fire"):
        run_recipe(recipe, out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "01-export"]  # no staging folder of 02, no report
    first = json.loads((out / "01-export" / "report.json").read_text())["step"]

    result = run_recipe(recipe, out, resume=True)
    assert calls == ["export", "eval", "eval"]  # the completed export was not run again
    assert result.report["steps"][0] == first and result.report["steps"][1]["metrics"]["accuracy"] >= 0
    names = {p.name for p in out.iterdir()}
    assert {"01-export", "02-eval", "report.json"} <= names and not any(n.endswith(".partial") for n in names)
    steps[0]["opset"] = 17
    run_recipe(_recipe(steps, data={"source": "digits"}), out, resume=True)
    assert calls == ["export", "eval", "eval", "export", "eval"]  # a changed step runs again, and every step after it


@pytest.mark.slow
def test_two_process_recipe_trains_then_exports(tmp_path):
    import subprocess
    import sys

    import yaml

    recipe = {"version": 1, "model": {"spec": f"{TOY}:tiny_cnn"}, "data": {"source": "digits", "batch_size": 32},
              "steps": [{"type": "train", "epochs": 2, "lr": 0.02, "device": "cpu"},
                        {"type": "export", "exporter": "torchscript"}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "mlopt", "run", str(path), "--out", str(out), "--nproc", "2", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    train, export = report["steps"]
    assert (train["type"], export["type"]) == ("train", "export")
    assert train["metrics"]["processes"] == 2 and train["metrics"]["backend"] == "gloo"
    assert train["metrics"]["replica_max_abs_diff"] == 0.0 and train["metrics"]["accuracy"] > 0.7
    assert export["input"]["lineage"] == ["train"] and export["metrics"]["top1_agreement"] == 1.0
    assert (out / "01-train" / "model.pt").is_file() and (out / "02-export" / "model.onnx").is_file()
    assert not any(p.name.startswith(".") and p.name != MARKER for p in out.iterdir())  # no staging, no checkpoints
    assert json.loads(proc.stdout)["steps"][1]["type"] == "export"  # one JSON document, from rank 0 only
