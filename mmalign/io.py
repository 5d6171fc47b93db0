"""Writing files so that a file that exists is complete: write beside, fsync, then rename."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

_TMP_PID = re.compile(r"^\..+\.tmp-(\d+)$")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded")
LOW_SPACE = 1 << 20  # bytes: a write that failed with less free space than this ran out of disk


def is_disk_full(error: BaseException) -> bool:
    """True for an OSError ENOSPC / EDQUOT, also as wrapped by libraries that re-raise it with
    the message only (safetensors' SafetensorError, torch.save's RuntimeError)."""
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
        return True
    return any(text in str(error) for text in _FULL_TEXT)


def disk_full_error(error: BaseException, path: str | Path) -> OSError | None:
    """An `OSError(ENOSPC, ..., path)` naming `path` when `error` (raised while writing `path`)
    means the disk is full: by its errno or message, or because less than `LOW_SPACE` bytes are
    free on `path`'s filesystem (torch.save says only "file write failed"); else None."""
    full = is_disk_full(error)
    if not full and not isinstance(error, KeyboardInterrupt):
        try:
            full = shutil.disk_usage(Path(path).parent).free < LOW_SPACE
        except OSError:
            full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if full else None


def fsync_path(path: str | Path) -> None:
    """Flush a file (or every file under a folder, then the folder itself) to the disk, so that
    a rename that follows can never expose an empty or partial file after a power loss."""
    path = Path(path)
    if path.is_dir():
        for child in path.iterdir():
            fsync_path(child)
        fsync_dir(path)
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in folder `path` durable (POSIX; a no-op where folders cannot
    be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder (created if needed); when the block succeeds
    it is fsynced and renamed onto `path` (atomic on one filesystem), and the rename is made
    durable; when it fails it is removed. A kill leaves at most a hidden `.NAME.tmp-PID`, which
    the next write of `path` ignores and `clean_stale_tmp` removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:
        full = disk_full_error(e, path)
        if full is None:
            raise
        raise full from e
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any], ensure_ascii: bool = True) -> None:
    """`rows` as jsonl (one `json.dumps` per line, UTF-8) written through `atomic_path`: a reader
    sees the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), encoding="utf-8")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove the `.NAME.tmp-PID` leftovers of killed writers (processes no longer alive) directly
    in `folder`; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        match = _TMP_PID.match(p.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
