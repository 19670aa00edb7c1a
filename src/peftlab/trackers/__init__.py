"""Experiment trackers a training run logs to: ``--report-to tensorboard,mlflow,wandb`` (default: none).

    with TrackerGroup.start(["tensorboard"], TrackedRun("lora", None, Path("runs/lora"), options)) as trackers:
        trackers.log("train", {"loss": 0.52, "lr": 1e-3}, step=10)      # -> train/loss, train/lr

The loop logs what it writes to metrics.jsonl (``train/...``), each evaluation (``eval/...``) and
the run's final numbers (``final/...``), with the run's options as hyperparameters; only the
first process of a distributed run logs. Each tracker is one file here (see :mod:`.tracker`); its
library is an optional extra of peftlab, imported only when asked for.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from peftlab.assets import notice
from peftlab.trackers.mlflow import MlflowTracker
from peftlab.trackers.tensorboard import TensorBoardTracker
from peftlab.trackers.tracker import TrackedRun, Tracker, TrackerError, one_line
from peftlab.trackers.wandb import WandbTracker

__all__ = ["NO_TRACKER", "TRACKERS", "TrackedRun", "Tracker", "TrackerError", "TrackerGroup", "require_trackers"]

#: ``--report-to`` name -> tracker class.
TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (TensorBoardTracker, MlflowTracker, WandbTracker)}
#: What ``--report-to`` takes for no tracker (the default).
NO_TRACKER = "none"


def require_trackers(names: Iterable[str]) -> None:
    """Import each tracker's library now, so a missing one is refused before any training."""
    for name in names:
        TRACKERS[name].import_library()


class TrackerGroup:
    """The trackers of one run: every call goes to each; a tracker that fails mid-run is dropped with
    a warning, as the run's own files (metrics.jsonl, metrics.json) hold everything it would have shown."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    @classmethod
    def start(cls, names: Iterable[str], run: TrackedRun, resume_ids: dict[str, str] | None = None) -> TrackerGroup:
        """Open a run in each named tracker (continuing the runs in ``resume_ids``); all or none."""
        started: list[Tracker] = []
        try:
            for name in names:
                resume_id = (resume_ids or {}).get(name)
                tracker = TRACKERS[name](TrackedRun(run.name, run.group, run.folder, run.options, resume_id))
                started.append(tracker)
                notice(f"logging to {name}: {tracker.where()}")
        except BaseException:
            cls(started).finish(ok=False)
            raise
        return cls(started)

    def run_ids(self) -> dict[str, str]:
        return {tracker.name: tracker.run_id for tracker in self.trackers if tracker.run_id}

    def log(self, section: str, values: dict[str, Any], step: int) -> None:
        """Log the numbers of ``values`` as ``section/key`` (``eval_loss`` in section eval: ``eval/loss``)."""
        scalars = {
            f"{section}/{key.removeprefix(section + '_')}": float(value)
            for key, value in values.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        }
        if scalars:
            self._each(lambda tracker: tracker.log(scalars, step))

    def finish(self, ok: bool) -> None:
        self._each(lambda tracker: tracker.finish(ok))
        self.trackers = []

    def _each(self, call) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as error:
                self.trackers.remove(tracker)
                notice(f"warning: {tracker.name} stopped logging ({one_line(error)}); the run goes on, "
                       "and its metrics.jsonl and metrics.json hold every number")

    def __enter__(self) -> TrackerGroup:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.finish(ok=kind is None)
