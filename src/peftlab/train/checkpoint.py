"""Checkpoints that a killed process cannot corrupt, and that resume a run exactly.

    OUT/checkpoint-200/
      trainable.safetensors     every trainable tensor, by parameter name
      optimizer.pt              optimizer, scheduler and hook states (tensors and plain values)
      rng.pt                    each process's RNG states (python, torch CPU, CUDA)
      trainer_state.json        step, epoch, position in the epoch, metrics so far, options

A checkpoint is written into a hidden temporary folder beside it and renamed into place when
complete; only then is the previous one deleted. So at any moment the newest ``checkpoint-N``
folder is whole, and a half-written one is never mistaken for a checkpoint. The ``.pt`` files
are read with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers
only, never arbitrary objects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from peftlab.io import explain_disk_full, give_umask_modes

PREFIX = "checkpoint-"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
FILES = (WEIGHTS, OPTIMIZER, RNG, STATE)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or from a different run."""


@dataclass
class Checkpoint:
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    hooks: dict[str, Any]
    rng: list[dict[str, Any]]  # one per process, in rank order
    state: dict[str, Any]  # trainer_state.json
    path: Path


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the nested tuples that random.getstate gave.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    hooks: dict[str, Any],
    rng: list[dict[str, Any]],
    state: dict[str, Any],
) -> Path:
    """Write ``OUT/checkpoint-<step>`` atomically, then delete older checkpoints; returns its path."""
    out_dir = Path(out_dir)
    final = out_dir / f"{PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{PREFIX}{step}.", suffix=".tmp", dir=out_dir))
    try:
        with explain_disk_full(f"writing checkpoint {final}: nothing was replaced there, the previous checkpoint is intact"):
            save_file({k: v.detach().contiguous().cpu().clone() for k, v in trainable.items()}, str(tmp / WEIGHTS))
            torch.save({"optimizer": optimizer, "scheduler": scheduler, "hooks": hooks}, tmp / OPTIMIZER)
            torch.save({"ranks": rng}, tmp / RNG)
            (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1) + "\n", encoding="utf-8")
            for name in FILES:
                _fsync(tmp / name)
        give_umask_modes(tmp)
        if final.exists():  # a resumed run reaching a step it had saved before: replace that copy
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for older in checkpoints_in(out_dir):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)
    return final


def checkpoints_in(folder: Path) -> list[Path]:
    """Complete checkpoint folders in ``folder``, oldest first (temporary ones start with '.')."""
    found = [p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a checkpoint, else the newest checkpoint inside it."""
    path = Path(path)
    if (path / STATE).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"cannot resume from {path}: no such folder. Pass a run's --out folder or one of its checkpoint-N folders.")
    found = checkpoints_in(path)
    if not found:
        raise CheckpointError(
            f"cannot resume from {path}: it holds no {PREFIX}N folder. Checkpoints are written with --save-every N."
        )
    return found[-1]


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    folder = find_checkpoint(path)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); resume from an older one.")
    states = _read(folder / OPTIMIZER, lambda p: torch.load(p, weights_only=True))
    return Checkpoint(
        trainable=_read(folder / WEIGHTS, lambda p: load_file(str(p))),
        optimizer=states["optimizer"],
        scheduler=states["scheduler"],
        hooks=states["hooks"],
        rng=_read(folder / RNG, lambda p: torch.load(p, weights_only=True))["ranks"],
        state=_read_state(folder),
        path=folder,
    )


def saved_options(path: str | os.PathLike) -> dict[str, Any]:
    """The options the run that wrote this checkpoint (or the newest one in this run folder) had."""
    return dict(_read_state(find_checkpoint(path)).get("options") or {})


def _read_state(folder: Path) -> dict[str, Any]:
    state = _read(folder / STATE, lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{folder / STATE} is not a trainer state (no step); resume from an older checkpoint.")
    return state


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """``reader(path)``, with any failure of a truncated or corrupt file named as such."""
    try:
        return reader(path)
    except Exception as error:  # torch, safetensors and json each raise their own types
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {str(error)[:200]}); resume from an older "
            "checkpoint, or start again."
        ) from None
