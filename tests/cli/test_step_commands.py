"""The step commands are made from the step configs: a new step type gets its command from its config."""

import json
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.core.contracts import PASSES, Pass, StepResult, cli

from conftest import TOY

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class ToyConfig(BaseModel):
    """Say some words, a number of times."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["toy"] = "toy"
    repeats: int = Field(2, gt=0, description="times the words are said", json_schema_extra=cli(short="-r"))
    loud: bool = Field(False, description="say them in capitals")
    words: list[str] = Field(default_factory=list, description="a word to say; repeatable",
                             json_schema_extra=cli(flag="--word"))
    tone: Literal["calm", "sharp"] = "calm"


@pytest.fixture
def toy_pass():
    """A step type defined here, and removed again so other tests see only the built-in ones."""
    from mlopt.run import recipe

    class ToyPass(Pass):
        name = "toy"
        config_class = ToyConfig
        produces_model = False

        def run(self, artifact, config, ctx):
            said = " ".join(config.words * config.repeats)
            return StepResult(artifact=artifact, metrics={"said": said.upper() if config.loud else said,
                                                          "tone": config.tone})

    yield ToyPass
    del PASSES["toy"]
    recipe._add_step_type(ToyPass)  # rebuild the recipe's step union without it


def test_toy_pass_gets_a_command_with_its_fields_as_options(toy_pass):
    root = invoke("--help")
    assert root.exit_code == 0 and "toy" in root.output and "Say some words" in root.output
    result = invoke("toy", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the help wraps lines
    for shown in ("-r, --repeats <int>", "Times the words are said. [default: (2)]", "--loud / --no-loud",
                  "Say them in capitals", "--word <list[str]>", "--tone <calm|sharp>", "[default: (calm)]",
                  "-m, --model", "--input-shape", "--json", "--save-recipe"):
        assert shown in text, shown
    # neither needs data nor makes a model: no data options, --out optional
    assert "--data" not in text and "--batch-size" not in text and "--resume" not in text
    assert "Output directory (artifact and report)" not in text


def test_toy_command_runs_with_the_given_options(toy_pass):
    result = invoke("toy", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "-r", 3, "--loud",
                    "--word", "a", "--word", "b", "--tone", "sharp", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"said": "A B A B A B", "tone": "sharp"}


def test_toy_command_records_only_what_was_given(toy_pass, tmp_path):
    path = tmp_path / "r.yaml"
    result = invoke("toy", "--model", f"{TOY}:tiny_cnn", "--word", "a", "--save-recipe", path)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(path.read_text())["steps"] == [{"type": "toy", "words": ["a"]}]


def test_toy_command_choice_is_checked_by_the_recipe(toy_pass):
    result = invoke("toy", "--model", f"{TOY}:tiny_cnn", "--tone", "loud")
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: command line: steps.0.toy.tone: Input should be 'calm' or 'sharp'"]


def test_toy_step_type_is_in_the_recipe_schema(toy_pass):
    result = invoke("recipe", "schema")
    assert result.exit_code == 0, result.output
    assert "ToyConfig" in json.loads(result.stdout)["$defs"]


def _saved(tmp_path, *args):
    path = tmp_path / "r.yaml"
    result = invoke(*args, "--save-recipe", path)
    assert result.exit_code == 0, result.output
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("command,flags", [
    ("train", ["-e, --epochs", "--lr", "--resume", "--nproc", "-b, --batch-size <int>"]),
    ("prune", ["--global / --per-layer", "--latency / --no-latency", "--finetune-epochs", "--lr", "--amp",
               "--ignore", "--target-params", "--head-ratio"]),
    ("distill", ["--student", "--teacher", "--feature <list[str]>", "--baseline / --no-baseline", "--resume"]),
    ("ptq", ["--per-channel / --per-tensor", "--format <qdq|qoperator>", "-b, --batch-size <list[int]>",
             "-n, --iterations", "--fallback / --no-fallback", "--max-length"]),
    ("qat", ["--bench-batch-size <list[int]>", "--keep-int8", "--teacher / --no-teacher", "-e, --epochs",
             "--no-runtime-points", "-b, --batch-size <int>"]),
    ("bench", ["-b, --batch-size <list[int]>", "-n, --iterations", "--duration <float>", "--provider"]),
])
def test_builtin_commands_keep_their_flags(command, flags):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for flag in flags:
        assert flag in result.output, flag


@pytest.mark.parametrize("args,step,data", [
    (["ptq", "--data", "digits", "--mode", "static", "--format", "qoperator", "--per-tensor", "-b", 1, "-b", 8, "-n", 5],
     {"type": "ptq", "mode": "static", "format": "qoperator", "per_channel": False, "batch_sizes": [1, 8], "iterations": 5},
     {"source": "digits"}),
    (["qat", "--data", "digits", "--bench-batch-size", 4, "--keep-int8", "--no-teacher", "-e", 3, "-b", 16, "--seed", 2],
     {"type": "qat", "batch_sizes": [4], "keep_int8": True, "teacher": False, "epochs": 3, "seed": 2},
     {"source": "digits", "batch_size": 16, "seed": 2}),
])
def test_flags_fill_their_config_fields(tmp_path, args, step, data):
    saved = _saved(tmp_path, *args, "--model", f"{TOY}:tiny_cnn", "--out", tmp_path / "o")
    assert saved["steps"] == [step] and saved["data"] == data


def test_distill_student_is_the_model(tmp_path):
    saved = _saved(tmp_path, "distill", "--student", f"{TOY}:tiny_cnn", "--teacher", "t", "--data", "digits",
                   "--feature", "a:b", "--no-baseline", "--out", tmp_path / "o")
    assert saved["model"] == {"spec": f"{TOY}:tiny_cnn"}
    assert saved["steps"] == [{"type": "distill", "teacher": "t", "features": ["a:b"], "baseline": False}]
    missing = invoke("distill", "--student", f"{TOY}:tiny_cnn", "--data", "digits", "--out", tmp_path / "o")
    assert missing.exit_code == 2 and "--teacher" in missing.output


def test_prune_options_fill_the_nested_finetune_config(tmp_path):
    saved = _saved(tmp_path, "prune", "--model", f"{TOY}:tiny_cnn", "--out", tmp_path / "p", "--ratio", 0.5,
                   "--lr", 0.01, "--amp", "bf16", "--seed", 3, "--per-layer", "--no-latency", "--ignore", "conv1")
    assert saved["steps"] == [{"type": "prune", "ratio": 0.5, "ignore": ["conv1"], "measure_latency": False,
                               "finetune": {"lr": 0.01, "seed": 3, "amp": "bf16"}}]
    assert saved["model"]["seed"] == 3
    assert "--epochs" not in invoke("prune", "--help").output  # finetune_epochs sets them


def test_bench_models_argument(tmp_path):
    run_dir = tmp_path / "run"  # an mlopt output directory stands for its model.onnx
    run_dir.mkdir()
    saved = _saved(tmp_path, "bench", run_dir, tmp_path / "b.onnx", "-b", 1, "-b", 4, "--duration", 0.5)
    assert saved["model"]["spec"] == str(run_dir / "model.onnx")
    assert saved["steps"] == [{"type": "bench", "batch_sizes": [1, 4], "duration_s": 0.5, "iterations": None,
                               "compare": [str(tmp_path / "b.onnx")]}]
