"""`mmalign` command line. Subcommands live in `mmalign/commands/` (one module each)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Sequence

import mmalign.commands


def register_modules(sub: argparse._SubParsersAction, package: ModuleType) -> None:
    """Every module of `package` that defines `register(subparsers)` adds one sub-command, so a
    new command (or `build-pairs` / `eval` method) is a new file and no central list changes."""
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description="Preference alignment across modalities.")
    register_modules(parser.add_subparsers(dest="command", required=True), mmalign.commands)
    return parser


def close_process_group(finished: bool) -> None:
    """Tear down the torch.distributed group a launcher started (torchrun, accelerate launch) before
    the interpreter exits: gloo threads still alive at exit can abort a finished process
    ("terminate called without an active exception"). A finished run first waits for every
    process, so none tears its connections down while another still uses them (without the wait a
    2-process FSDP2 run aborted at exit in 3 of 20 runs on a loaded 2-core machine; with it, 0 of
    50); a failed one does not wait (the others may never arrive)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmalign.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileExistsError) as e:  # user errors: one clear line, no traceback
        return _fail(str(e), 2)
    except (NonFiniteLossError, CheckpointError) as e:  # the run stopped; its message names the step / file
        return _fail(str(e), 1)
    except OSError as e:
        message = os_error_line(e)
        if message is None:
            raise
        return _fail(message, 1)


def _fail(message: str, code: int) -> int:
    print(f"mmalign: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def os_error_line(e: OSError) -> str | None:
    """One line for the OS errors a user can fix: a full disk, a folder that cannot be written
    (read-only, no permission); None for any other (a bug: keep its traceback)."""
    import errno

    where = e.filename if e.filename is not None else "a file"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {where}: free some space, then rerun (a run resumes with train.resume=true)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where}: {e.strerror} (choose a writable output folder)"
    return None


def entry() -> int:
    """The `mmalign` command and `python -m mmalign.cli` (what launchers run): `main`, then the
    process group closed."""
    code = None
    try:
        code = main()
        return code
    finally:
        close_process_group(finished=code == 0)


if __name__ == "__main__":
    sys.exit(entry())
