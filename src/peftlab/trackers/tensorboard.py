"""TensorBoard: event files in ``OUT/tensorboard``, written by torch's ``SummaryWriter``.

``tensorboard --logdir OUT`` shows a run; ``tensorboard --logdir COMPARISON/runs`` shows every run
of a comparison or study side by side, each under its run name. The options are in the Text tab.
"""

from __future__ import annotations

import json
import shutil

from peftlab.trackers.tracker import TrackedRun, Tracker

FOLDER = "tensorboard"


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    library = "torch.utils.tensorboard"  # needs the tensorboard package; torch's writer is the one HF uses too
    extra = "tensorboard"

    def __init__(self, run: TrackedRun) -> None:
        writer_module = self.import_library()
        self.folder = run.folder / FOLDER
        if run.resume_id is None and self.folder.exists():
            shutil.rmtree(self.folder)  # the events of the run this one replaces (--overwrite)
        self.writer = writer_module.SummaryWriter(log_dir=str(self.folder))
        self.run_id = FOLDER  # any id: it tells a resumed run to append to these events instead of clearing them
        if run.resume_id is None:
            self.writer.add_text("options", "```\n" + json.dumps(run.options, indent=1) + "\n```")

    def where(self) -> str:
        return f"{self.folder} (view with: tensorboard --logdir {self.folder})"

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, ok: bool) -> None:
        self.writer.close()
