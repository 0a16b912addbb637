from mlopt.core.fsutil import atomic_write_text


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_full_disk_is_reported_with_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    import pytest
    import torch

    from mlopt.compress.lib.engine import _save_checkpoint
    from mlopt.core.errors import storage_error

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: (os.close(fd), full())[1])
    with pytest.raises(OSError) as caught:
        atomic_write_text(tmp_path / "report.json", "{}")
    assert storage_error(caught.value).args[0] == f"cannot write {tmp_path / 'report.json'}: no space left on the device"
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as caught:
        _save_checkpoint(tmp_path / "checkpoint.pt", {"step": 1})
    assert "checkpoint.pt: no space left" in str(storage_error(caught.value))
    assert list(tmp_path.iterdir()) == []
