"""A training run's output folder: one process at a time, no finished run replaced by accident,
and nothing left behind by an interrupted save.

    with claim_output_folder(out, overwrite=False, resuming=False) as folder:   # on the main process
        ...train, checkpoint, save into folder...

Claiming a folder: it must be writable; ``OUT/.peftlab.lock`` is locked (``flock``, released by
the OS when the process dies, so a killed run never leaves a stale lock) and names the holder's
pid for the next process's message; a folder with a run's files in it is refused unless
``--overwrite`` (or ``--resume`` of that run); the hidden ``*.tmp`` files and folders of a save
that was interrupted are deleted. With ``--overwrite`` the new run is written into a hidden sibling
folder and replaces the old run's files only once it has finished (:mod:`peftlab.output_folder`):
a failed or interrupted run leaves the old one exactly as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from peftlab.assets import notice
from peftlab.io import CONFIG_NAME, WEIGHTS_NAME
from peftlab.output_folder import staged_output
from peftlab.train.checkpoint import PREFIX as CHECKPOINT_PREFIX, checkpoints_in
from peftlab.train.options import OptionsError

LOCK_NAME = ".peftlab.lock"
#: What a run writes at its top level (an adapter, or a fully fine-tuned model) besides checkpoints.
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, "metrics.json", "metrics.jsonl", "config.json", "model.safetensors")


class FolderInUseError(OptionsError):
    """Another process is training into the same output folder."""


@contextlib.contextmanager
def claim_output_folder(out: Path, overwrite: bool, resuming: bool) -> Iterator[Path]:
    """Hold ``out`` for one run and yield the folder to write it into (``out``, or a staging folder
    when the run replaces another); see the module docstring for what is checked."""
    check_writable(out)
    lock = open(out / LOCK_NAME, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise FolderInUseError(
                f"another peftlab process (pid {holder}) is training into {out}; wait for it to finish, "
                "or choose another --out."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        replacing = not resuming and _refuse_previous_run(out, overwrite)
        _remove_interrupted_saves(out)
        if not replacing:
            yield out
            return
        notice(f"--overwrite: the run in {out} is replaced once this one has finished")
        with staged_output(out, "the new run", replaces=_is_run_entry) as stage:
            yield stage
    finally:
        lock.close()  # releases the flock; the file stays, so two processes never lock two files


def check_writable(folder: Path) -> None:
    """Fail now, not after an hour of training, when the output folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OptionsError(
            f"cannot write to the output folder {folder}: {error.strerror or error}. Choose another --out."
        ) from None


def _refuse_previous_run(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` holds a run that ``overwrite`` allows to replace; without it, an error."""
    found = [name for name in RUN_FILES if (out / name).exists()] + [p.name for p in checkpoints_in(out)]
    if found and not overwrite:
        raise OptionsError(
            f"{out} already holds a run ({', '.join(found[:4])}{' ...' if len(found) > 4 else ''}); pass --overwrite "
            f"to replace it, --resume {out} to continue it, or choose another --out."
        )
    return bool(found)


def _is_run_entry(name: str) -> bool:
    """A file or folder the previous run wrote (a later --resume must not find its checkpoints)."""
    return name in RUN_FILES or re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", name) is not None


def _remove_interrupted_saves(out: Path) -> None:
    """Delete the temporary files and folders (``.NAME.*.tmp``) that a killed save left."""
    for leftover in out.glob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        notice(f"removed {leftover.name}, left by an interrupted save")
