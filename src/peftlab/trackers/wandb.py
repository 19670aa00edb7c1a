"""Weights & Biases: one W&B run per training run, offline unless ``WANDB_MODE`` says otherwise.

peftlab never logs in: the run is written under ``OUT/wandb/offline-run-*`` and uploaded, when
wanted, with ``wandb sync``. ``WANDB_MODE=online`` (after ``wandb login``) logs live instead. The
project is ``WANDB_PROJECT``, else ``peftlab``; a comparison's runs share its name as their group.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftlab.trackers.tracker import TrackedRun, Tracker, TrackerError, one_line

DEFAULT_PROJECT = "peftlab"


class WandbTracker(Tracker):
    name = "wandb"
    library = "wandb"
    extra = "wandb"

    def __init__(self, run: TrackedRun) -> None:
        wandb = self.import_library()
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run.name, group=run.group,
                config=run.options, dir=str(run.folder), mode=self.mode, id=run.resume_id,
                resume="allow" if run.resume_id else None,
                settings=wandb.Settings(silent=True, console="off"),  # the run's output stays peftlab's
            )
        except Exception as error:  # e.g. WANDB_MODE=online without a login
            raise TrackerError(f"W&B cannot start a {self.mode} run: {one_line(error)}") from None
        self.run_id = self.run.id

    def where(self) -> str:
        folder = Path(self.run.dir).parent
        return f"{folder} (upload with: wandb sync {folder})" if self.mode == "offline" else self.run.url or self.mode

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
