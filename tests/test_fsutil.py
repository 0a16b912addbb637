import pytest

from mlopt.errors import InputError
from mlopt.fsutil import atomic_write_text, check_output_dir, commit_dir, staging_dir


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        check_output_dir(tmp_path / "full", overwrite=False)
    check_output_dir(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_output_dir(tmp_path / "file" / "out", overwrite=False)


def test_staging_then_commit_replaces(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    stage = staging_dir(final)
    atomic_write_text(stage / "new.txt", "new")
    commit_dir(stage, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
