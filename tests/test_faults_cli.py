"""One-line CLI errors for the faults a user meets (issue 23): a run stopped by non-finite values,
a refused overwrite, no intact checkpoint, a full disk, a read-only output folder. Before the fix
each was a Python traceback."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest
import torch

from mmalign.cli import main
from mmalign.train import checkpoint as ckpt


def one_line_error(capsys, code: int, expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmalign: error: ")]
    assert code != 0 and len(lines) == 1, err
    assert "Traceback" not in err and expected in lines[0], err
    return lines[0]


def test_non_finite_loss_is_one_line(make_config, capsys):
    cfg = make_config(optim={"lr": 1e30}, train={"max_steps": 6})
    code = main(["train", str(cfg)])
    one_line_error(capsys, code, "at step")
    assert code == 1


def test_refused_overwrite_is_one_line(make_config, capsys):
    cfg = make_config(train={"max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    code = main(["train", str(cfg)])
    one_line_error(capsys, code, "set train.resume=true")
    assert code == 2


def test_no_intact_checkpoint_is_one_line(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    (tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    code = main(["train", str(cfg), "train.resume=true", "train.max_steps=2"])
    one_line_error(capsys, code, "no intact checkpoint in")


class StorageFull(Exception):
    """What safetensors raises on a full disk (a SafetensorError with the OS message only)."""


@pytest.mark.parametrize("how", ["safetensors", "torch_save"])
def test_disk_full_during_a_checkpoint_names_the_file(make_config, tmp_path, capsys, monkeypatch, how):
    cfg = make_config(train={"max_steps": 2, "save_every": 1})
    real_save_file, real_torch_save, calls = ckpt.save_file, torch.save, []

    def full_save_file(state, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint
            raise StorageFull("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")
        return real_save_file(state, path, *a, **k)

    def full_torch_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # torch.save names no cause; the free space tells
            monkeypatch.setattr("shutil.disk_usage", lambda p: type("Usage", (), {"free": 0})())
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed "
                               "writing file data/0: file write failed")
        return real_torch_save(obj, path, *a, **k)

    if how == "safetensors":
        monkeypatch.setattr(ckpt, "save_file", full_save_file)
    else:
        monkeypatch.setattr(ckpt.torch, "save", full_torch_save)
    code = main(["train", str(cfg)])
    name = "model.safetensors" if how == "safetensors" else "trainer.pt"
    line = one_line_error(capsys, code, "disk full while writing ")
    assert line.split("disk full while writing ")[1].startswith(str(tmp_path / "run" / "checkpoints" /
                                                                    ".step_00000002.tmp" / name))
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"  # the previous one stays the latest
    assert not (root / ".step_00000002.tmp").exists()  # the partial one is removed (frees the space)


def test_disk_full_in_an_atomic_write_names_the_target(tmp_path):
    from mmalign.io import write_jsonl_atomic

    class Full:
        def __init__(self):
            self.real = Path.write_text

        def __call__(self, path, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")  # what a write() raises: no filename

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "write_text", Full())
        with pytest.raises(OSError) as err:
            write_jsonl_atomic(tmp_path / "rows.jsonl", [{"a": 1}])
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "rows.jsonl")
    assert list(tmp_path.iterdir()) == []


def read_only(monkeypatch, folder: Path) -> None:
    """`folder` behaves as on a read-only filesystem (the tests may run as root, which ignores
    chmod): creating or writing anything under it raises EROFS."""
    folder, real_open, real_mkdir, real_os_open = str(folder), builtins.open, Path.mkdir, os.open

    def inside(path) -> bool:
        return os.path.abspath(os.fspath(path)).startswith(folder)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def guarded_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def guarded_mkdir(self, *a, **k):
        if inside(self) and not self.is_dir():
            refuse(self)
        return real_mkdir(self, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(Path, "mkdir", guarded_mkdir)
    monkeypatch.setattr(os, "open", guarded_os_open)


def test_read_only_output_folder_is_one_line(make_config, tmp_path, capsys, monkeypatch):
    cfg = make_config(train={"max_steps": 1})
    (tmp_path / "run").mkdir()
    read_only(monkeypatch, tmp_path / "run")
    code = main(["train", str(cfg)])
    line = one_line_error(capsys, code, f"cannot write {tmp_path / 'run'}")
    assert "Read-only file system (choose a writable output folder)" in line
