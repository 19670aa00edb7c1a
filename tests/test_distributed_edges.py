"""Issue 26, class 8: a global batch smaller than the number of processes is a clear error, and no
batch of an epoch leaves a process without rows (the trailing one too small for that is dropped)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peftlab.train.distributed import Processes
from peftlab.train.loop import TrainingRun
from peftlab.train.options import OptionsError


def run_of(examples: int, batch_size: int, world_size: int, rank: int = 0) -> SimpleNamespace:
    processes = Processes(rank, world_size, None, False, "ddp")
    run = SimpleNamespace(train_data=list(range(examples)), processes=processes,
                          options=SimpleNamespace(batch_size=batch_size, seed=0))
    run.batches_per_epoch = TrainingRun._count_batches(run)
    return run


def test_a_global_batch_smaller_than_the_processes_is_refused():
    with pytest.raises(OptionsError, match="--batch-size 2 is the global batch, split over 4 processes: each needs at "
                                           "least one example; use --batch-size 4 or more"):
        run_of(examples=64, batch_size=2, world_size=4)


@pytest.mark.parametrize("examples, batch_size, world_size, batches", [(9, 4, 2, 2), (10, 4, 2, 3), (13, 4, 4, 3),
                                                                       (12, 3, 3, 4), (7, 7, 7, 1)])
def test_no_batch_leaves_a_process_without_rows(examples, batch_size, world_size, batches):
    for rank in range(world_size):
        run = run_of(examples, batch_size, world_size, rank)
        assert run.batches_per_epoch == batches
        for epoch in range(2):
            assert all(run.processes.shard(batch) for batch in TrainingRun.epoch_batches(run, epoch))
