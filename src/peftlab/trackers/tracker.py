"""The tracker protocol: what a training run hands to TensorBoard, MLflow or W&B, and how.

A tracker is one small file in this package: a :class:`Tracker` subclass that opens one run of its
library in ``__init__``, then takes scalars by step and is finished once. Its library is imported
only when a run asks for it, so an absent library costs nothing until then, and then gives one line
saying which extra to install.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar


class TrackerError(ValueError):
    """A tracker cannot be used: its package is missing or its store cannot be opened; the message says what to do."""


@dataclass(frozen=True)
class TrackedRun:
    """What every tracker is told about the run it logs."""

    name: str  # the run's name in the tracker (a comparison's run name, e.g. "lora[r=8]")
    group: str | None  # the runs logged together (a comparison or a study), or None
    folder: Path  # the run's output folder; trackers that write files write them under it
    options: dict[str, Any]  # the run's options (its hyperparameters), as in metrics.json
    resume_id: str | None = None  # the tracker's id of the run this one continues (--resume), else None


class Tracker:
    """One run in one tracker. Subclasses set the class attributes and implement the three methods."""

    #: What ``--report-to`` takes.
    name: ClassVar[str]
    #: The module the tracker imports, and the extra of peftlab that installs it.
    library: ClassVar[str]
    extra: ClassVar[str]

    #: The tracker's id of the run, kept in checkpoints so that a resumed run continues it.
    run_id: str | None = None

    def __init__(self, run: TrackedRun) -> None:
        raise NotImplementedError

    @classmethod
    def import_library(cls) -> ModuleType:
        """The tracker's library; a TrackerError naming the extra to install when it cannot be imported."""
        try:
            return importlib.import_module(cls.library)
        except ImportError as error:
            raise TrackerError(
                f"--report-to {cls.name} needs the {cls.extra} package, which cannot be imported ({error}); "
                f"install it with: pip install 'peftlab[{cls.extra}]'"
            ) from None

    def where(self) -> str:
        """Where the user finds the run (a folder, a URI), for the line printed when it starts."""
        raise NotImplementedError

    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self, ok: bool) -> None:
        raise NotImplementedError


def one_line(error: BaseException) -> str:
    """An exception as one line: libraries' messages may span several."""
    return " ".join(str(error).split()) or type(error).__name__
