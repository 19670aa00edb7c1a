"""Run by the distributed tests under torchrun: several trainings in one launch (one process group).

    torchrun --nproc_per_node=2 tests/training_worker.py runs.json

``runs.json`` holds a list of TrainOptions dicts; each is trained in turn with ``run_training``,
which joins the process group started here instead of starting its own. One launch instead of
one per run: each launch costs two interpreters importing torch and transformers.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from peftlab.train import TrainOptions, run_training


def main(path: str) -> None:
    dist.init_process_group("gloo")
    try:
        for options in json.loads(open(path, encoding="utf-8").read()):
            run_training(TrainOptions(**options))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
