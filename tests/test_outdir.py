"""--out safety: mlopt replaces only what it recorded writing, and one run writes a folder at a time."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from mlopt.cli.main import app
from mlopt.run.outdir import MARKER, OutputDir

from conftest import TOY


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def export(out, *extra):
    return invoke("export", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "--exporter", "torchscript",
                  "--out", out, "--quiet", *extra)


def one_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": {"spec": f"{TOY}:tiny_cnn", "input_shape": "1x1x8x8"},
                                    "steps": [{"type": "export", "exporter": "torchscript"}]}))
    return path


def test_output_is_marked_with_what_mlopt_wrote(tmp_path):
    out = tmp_path / "out"
    assert export(out).exit_code == 0
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["entries"]) == ["model.json", "model.onnx", "report.json", "report.md"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *marker["entries"]])


@pytest.mark.parametrize("foreign", ["notes.txt", "data/", "data/inner.txt", "model.onnx.bak"])
def test_overwrite_refuses_a_folder_holding_the_users_files(tmp_path, foreign):
    out = tmp_path / "out"
    assert export(out).exit_code == 0  # an mlopt output, then the user adds something of theirs
    target = out / foreign.rstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if foreign.endswith("/"):
        target.mkdir()
    else:
        target.write_text("precious")
    before = listing(out)
    result = export(out, "--overwrite")
    assert result.exit_code == 2
    line = one_line(result)
    assert repr(foreign.rstrip("/").split("/")[0]) in line and "--overwrite replaces only mlopt's own output" in line
    assert listing(out) == before
    if not foreign.endswith("/"):
        assert target.read_text() == "precious"


def test_overwrite_of_an_unmarked_folder_removes_nothing(tmp_path):
    # The reported data loss: --out pointing at a folder of the user's, with --overwrite.
    out = tmp_path / "mydir"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "src").mkdir()
    (out / "src" / "main.py").write_text("print()")
    result = export(out, "--overwrite")
    assert result.exit_code == 2 and "'notes.txt'" in one_line(result)
    assert listing(out) == ["notes.txt", "src", "src/main.py"]


def test_overwrite_of_a_file_inside_a_step_folder_is_refused(tmp_path, recipe):
    out = tmp_path / "run"
    assert invoke("run", recipe, "--out", out, "--quiet").exit_code == 0
    (out / "01-export" / "mine.txt").write_text("precious")
    result = invoke("run", recipe, "--out", out, "--overwrite", "--quiet")
    assert result.exit_code == 2 and "'01-export/mine.txt'" in one_line(result)
    assert (out / "01-export" / "mine.txt").read_text() == "precious"
    assert (out / "01-export" / "model.onnx").is_file()


@pytest.mark.slow
def test_recipe_overwrite_replaces_its_own_run_and_keeps_nothing_old(tmp_path, recipe):
    out = tmp_path / "run"
    assert invoke("run", recipe, "--out", out, "--quiet").exit_code == 0
    raw = yaml.safe_load(recipe.read_text())
    raw["steps"] = [{"type": "export", "exporter": "torchscript"}, {"type": "bench", "iterations": 2, "warmup": 0}]
    recipe.write_text(yaml.safe_dump(raw))
    assert invoke("run", recipe, "--out", out, "--quiet").exit_code == 2  # not empty, no --overwrite
    assert invoke("run", recipe, "--out", out, "--overwrite", "--quiet").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "01-export", "02-bench", "report.html", "report.json",
                                                     "report.md"]
    # Into an unmarked folder of the user's, a recipe run with --overwrite removes nothing either.
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README").write_text("mine")
    result = invoke("run", recipe, "--out", mine, "--overwrite", "--quiet")
    assert result.exit_code == 2 and listing(mine) == ["README"]


def test_flat_overwrite_removes_what_the_earlier_output_wrote(tmp_path, trained_dir):
    out = tmp_path / "out"
    args = ["train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--epochs", "1", "--out", out, "--quiet"]
    assert invoke(*args).exit_code == 0 and (out / "model.pt").is_file()
    assert export(out, "--overwrite").exit_code == 0
    assert not (out / "model.pt").exists() and (out / "model.onnx").is_file()
    assert json.loads((out / MARKER).read_text())["entries"] == ["model.json", "model.onnx", "report.json", "report.md"]


def test_out_may_be_a_link_to_a_folder_and_the_link_is_kept(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    assert export(link).exit_code == 0
    assert export(link, "--overwrite").exit_code == 0
    assert link.is_symlink() and (real / "model.onnx").is_file()
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "nowhere")
    result = export(dangling)
    assert result.exit_code == 2 and "symbolic link" in one_line(result) and not (tmp_path / "nowhere").exists()


def test_links_inside_out_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    out = tmp_path / "out"
    assert export(out).exit_code == 0
    # A recorded name replaced by a link, and a marker edited to name paths outside the folder.
    (out / "model.onnx").unlink()
    (out / "model.onnx").symlink_to(outside / "keep.txt")
    marker = json.loads((out / MARKER).read_text())
    marker["entries"] += ["../outside/keep.txt", "../outside", "/etc/passwd"]
    marker["trees"] = ["..", "../outside"]
    (out / MARKER).write_text(json.dumps(marker))
    result = export(out, "--overwrite")
    assert result.exit_code == 2 and "symbolic link 'model.onnx'" in one_line(result)
    assert (outside / "keep.txt").read_text() == "precious"
    (out / "model.onnx").unlink()
    assert export(out, "--overwrite").exit_code == 0  # the forged entries were ignored, not followed
    assert (outside / "keep.txt").read_text() == "precious" and (out / "model.onnx").is_file()


def test_a_second_run_on_a_folder_being_written_is_refused(tmp_path):
    out = tmp_path / "out"
    held = OutputDir(out).open(replace=False)  # another run is writing
    try:
        result = export(out, "--overwrite")
        assert result.exit_code == 2 and "being written by another mlopt run" in one_line(result)
    finally:
        held.close()
    assert not out.exists()  # the other run wrote nothing: its folder went with it
    assert export(out).exit_code == 0
    assert export(out).exit_code == 2  # finished: not empty, and without --overwrite nothing is replaced


@pytest.mark.slow
def test_two_racing_runs_one_wins_the_other_is_refused(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlopt", "export", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8",
           "--exporter", "torchscript", "--out", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another mlopt run" in refused or "not empty" in refused
    marker = json.loads((out / MARKER).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *marker["entries"]])


def test_a_users_folder_named_like_a_checkpoint_is_not_mlopts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoint").mkdir()  # a user's folder that happens to share the name: not mlopt's
    result = invoke("train", "--model", f"{TOY}:tiny_cnn", "--data", "digits", "--epochs", "1", "--out", out,
                    "--resume", "--quiet")
    assert result.exit_code == 2 and "'.checkpoint'" in one_line(result)
    assert (out / ".checkpoint").is_dir()


def test_failed_step_leaves_the_users_empty_folder_as_it_was(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = invoke("export", "--model", f"{TOY}:export_drift", "--input-shape", "1x1x8x8", "--out", out,
                    "--atol", 1e-4, "--rtol", 0, "--exporter", "torchscript", "--quiet")  # off by 1e-3: fails
    assert result.exit_code == 1 and "disagrees with PyTorch" in one_line(result)
    assert out.is_dir() and list(out.iterdir()) == []


def test_foreign_file_message_does_not_walk_a_whole_home(tmp_path):
    # --out pointing at a big folder of the user's is refused at its first entry, without walking it all.
    home = tmp_path / "home"
    for i in range(200):
        (home / f"d{i}").mkdir(parents=True)
        (home / f"d{i}" / "f").write_text("x")
    calls = []
    real = os.scandir

    def counting(path):
        calls.append(path)
        return real(path)

    import mlopt.run.outdir as outdir

    outdir.os.scandir = counting
    try:
        assert OutputDir(home).first_foreign() == "d0"
    finally:
        outdir.os.scandir = real
    assert len(calls) == 1


def test_save_recipe_never_replaces_a_users_file_without_overwrite(tmp_path):
    target = tmp_path / "recipe.yaml"
    target.write_text("my own recipe\n")
    args = ["export", "--model", f"{TOY}:tiny_cnn", "--input-shape", "1x1x8x8", "--out", tmp_path / "o",
            "--save-recipe", target]
    result = invoke(*args)
    assert result.exit_code == 2 and "mlopt did not write it" in one_line(result)
    assert target.read_text() == "my own recipe\n"
    assert invoke(*args, "--overwrite").exit_code == 0
    assert yaml.safe_load(target.read_text())["steps"][0]["type"] == "export"


def test_junit_file_of_the_users_is_refused_before_any_work(tmp_path, recipe):
    raw = yaml.safe_load(recipe.read_text())
    raw["gates"] = {"max_size_mb": 100}
    recipe.write_text(yaml.safe_dump(raw))
    junit = tmp_path / "results.xml"
    junit.write_text('<testsuite name="pytest"><testcase classname="tests.test_x" name="t"/></testsuite>\n')
    result = invoke("run", recipe, "--out", tmp_path / "run", "--junit", junit, "--quiet")
    assert result.exit_code == 2 and "mlopt did not write it" in one_line(result)
    assert "pytest" in junit.read_text() and not (tmp_path / "run").exists()
    junit.unlink()
    assert invoke("run", recipe, "--out", tmp_path / "run", "--junit", junit, "--quiet").exit_code == 0
    assert invoke("run", recipe, "--out", tmp_path / "run", "--junit", junit, "--overwrite", "--quiet").exit_code == 0
    assert 'classname="mlopt.gates"' in junit.read_text()  # mlopt's own report is replaced on the next run


def test_a_file_system_without_locks_still_writes_and_says_so(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out"
    result = export(out)
    assert result.exit_code == 0 and "cannot lock --out" in result.stderr
    assert (out / "model.onnx").is_file() and (out / MARKER).is_file()


def test_a_write_a_killed_run_left_unfinished_does_not_block_the_next(tmp_path):
    # A process killed between an atomic write's temporary file and its rename (a torchrun restart) leaves the
    # temporary file: it is mlopt's when the file it was to replace is, and the next run removes it.
    out = tmp_path / "out"
    assert export(out).exit_code == 0
    ours = [out / "..mlopt-output.json.yb74ksxv.tmp", out / ".report.json.a_1b2c3d.tmp"]
    for path in ours:
        path.write_text("{")
    theirs = out / ".notes.txt.abcd1234.tmp"  # the temporary file of a write mlopt never recorded
    theirs.write_text("precious")
    result = export(out, "--overwrite")
    assert result.exit_code == 2 and "'.notes.txt.abcd1234.tmp'" in one_line(result)
    assert all(path.exists() for path in ours)  # a refused run removes nothing
    theirs.unlink()
    assert export(out, "--overwrite").exit_code == 0
    assert not any(path.exists() for path in ours)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "model.json", "model.onnx", "report.json",
                                                             "report.md"])


@pytest.mark.parametrize("name, target", [("..mlopt-output.json.yb74ksxv.tmp", ".mlopt-output.json"),
                                          ("a/.b.json.x1y2z3w4.tmp", "a/b.json"), (".b.json.tmp", None),
                                          (".b.json.X1Y2Z3W4.tmp", None), ("b.json.x1y2z3w4.tmp", None)])
def test_the_temporary_file_of_an_atomic_write_names_its_target(name, target):
    from mlopt.core.fsutil import atomic_write_target

    assert atomic_write_target(name) == target
