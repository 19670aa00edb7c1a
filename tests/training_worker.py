"""Run by the distributed tests under torchrun: several trainings in one launch (one process group).

    torchrun --nproc_per_node=2 tests/training_worker.py runs.json

``runs.json`` holds a list of TrainOptions dicts; each is trained in turn with ``run_training``,
which joins the process group started here instead of starting its own. One launch instead of
one per run: each launch costs two interpreters importing torch and transformers. A run refused
with an OptionsError leaves the message in ``OUT/refused.txt`` and the next run goes on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from peftlab.train import OptionsError, TrainOptions, run_training


def main(path: str) -> None:
    dist.init_process_group("gloo")
    try:
        for values in json.loads(open(path, encoding="utf-8").read()):
            options = TrainOptions(**values)
            try:
                run_training(options)
            except OptionsError as error:
                Path(options.out).mkdir(parents=True, exist_ok=True)
                (Path(options.out) / "refused.txt").write_text(str(error), encoding="utf-8")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
