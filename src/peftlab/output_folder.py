"""Every command's output folder: never written into while it holds something, unless ``--overwrite``;
and replaced only by a complete result.

    check_output_folder(out, overwrite, what="the merged model")      # before any work
    with staged_output(out, what="the merged model") as folder:        # write the result into ``folder``
        model.save_pretrained(folder)
    # here ``out`` holds the new result; had the block failed, ``out`` would be exactly as before

The result is written into a hidden sibling folder (``.NAME.<pid>.staging.tmp``) and moved into
``out`` only when the block ends without error: the entries of ``out`` it replaces are first
moved into a hidden sibling (``.NAME.<pid>.previous.tmp``) and brought back if a move fails. So a
refused, failed or interrupted command leaves the old folder as it was, and a full disk is the one
"disk full ... nothing was replaced" message. Stale hidden folders of a killed process are deleted
the next time the same ``out`` is written.

Users: ``train`` (a run folder; see :mod:`peftlab.train.run_folder`), ``merge`` and ``export``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

from peftlab.io import explain_disk_full, give_umask_modes


class OutputFolderError(ValueError):
    """``--out`` cannot be written as asked (a file, or a folder holding something without ``--overwrite``)."""


def visible_entries(folder: Path) -> list[str]:
    """The names in ``folder`` a user would see (hidden files such as a lock or a staging folder are not)."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if not entry.name.startswith("."))


def check_output_folder(out: Path, overwrite: bool, what: str) -> None:
    """``out`` is a folder or nothing yet; one that holds something is refused unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file; give a folder for {what}.")
    held = visible_entries(out)
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (" ..." if len(held) > 4 else "")
        raise OutputFolderError(
            f"--out {out} already holds something ({shown}); pass --overwrite to replace it with {what}, "
            "or choose another --out."
        )


def _hidden_sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{os.getpid()}.{kind}.tmp"


def _remove_stale_siblings(out: Path) -> None:
    """Hidden folders left by a killed process that wrote ``out`` (its pid no longer runs)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.(staging|previous)\.tmp")
    for sibling in out.parent.glob(f".{out.name}.*.tmp"):
        match = pattern.fullmatch(sibling.name)
        if match and not _running(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged_output(
    out: Path, what: str, replaces: Callable[[str], bool] = lambda name: not name.startswith(".")
) -> Iterator[Path]:
    """Yield an empty hidden folder to write ``what`` into; when the block ends without error, its
    entries move into ``out``, replacing the entries of ``out`` for which ``replaces(name)`` holds
    (default: everything visible) and any of the same name. On error ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    stage = _hidden_sibling(out, "staging")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        with explain_disk_full(f"writing {what} to {out}: nothing was replaced there", restate=True):
            yield stage
            give_umask_modes(stage)
            _move_in(stage, out, replaces)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_in(stage: Path, out: Path, replaces: Callable[[str], bool]) -> None:
    if not out.exists():
        os.rename(stage, out)  # one atomic step
        return
    new = [entry.name for entry in stage.iterdir()]
    old = [entry.name for entry in out.iterdir() if entry.name in new or replaces(entry.name)]
    previous = _hidden_sibling(out, "previous")
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        for name in old:
            os.rename(out / name, previous / name)
            moved_aside.append(name)
        for name in new:
            os.rename(stage / name, out / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.rename(out / name, stage / name)
        for name in reversed(moved_aside):
            os.rename(previous / name, out / name)
        previous.rmdir()  # empty again; were it not, its entries are the old folder's and must stay
        raise
    shutil.rmtree(previous, ignore_errors=True)
