"""Data parallelism: two processes under torchrun (gloo, CPU) train the same adapter as one process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import bert_dir, gpt2_dir, prompt_dir, sentiment_dir, tiny_options  # noqa: F401

from peftlab.train import run_training
from peftlab.train.distributed import Processes


def test_each_process_takes_a_contiguous_disjoint_slice_of_the_batch():
    batch = list(range(100, 111))
    shards = [Processes(rank, 3, torch.device("cpu"), owns_group=False).shard(batch) for rank in range(3)]
    assert shards[0] + shards[1] + shards[2] == batch
    assert [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_two_processes_train_the_same_adapter_as_one(task, request, tmp_path):
    # 7 examples a batch: the processes get 4 and 3 (and different numbers of label tokens), so the
    # loss must be normalised over the whole step to agree.
    model_dir, data_dir = (request.getfixturevalue(name) for name in (
        ("bert_dir", "sentiment_dir") if task == "seq-cls" else ("gpt2_dir", "prompt_dir")))
    run = dict(task=task, batch_size=7, grad_accum=2, max_steps=3, eval_every=2, lr=1e-2)
    tracked = task == "seq-cls" and importlib.util.find_spec("tensorboard") is not None  # only rank 0 logs
    if tracked:
        run["report_to"] = ["tensorboard"]
    single = run_training(tiny_options(model_dir, data_dir, tmp_path / "one", **run))
    flags = ["--model", str(model_dir), "--dataset", str(data_dir), "--task", task, "--out", str(tmp_path / "two"),
             "--batch-size", "7", "--grad-accum", "2", "--max-steps", "3", "--eval-every", "2", "--lr", "1e-2", "--lora-dropout", "0",
             "--max-length", "16", "--eval-batch-size", "16", "--log-every", "1", *(["--report-to", "tensorboard"] * tracked)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "peftlab", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    two = json.loads((tmp_path / "two/metrics.json").read_text())
    assert two["world_size"] == 2
    assert two["train_loss_curve"] == pytest.approx(single["train_loss_curve"], abs=1e-6)
    assert two["val_curve"][0]["eval_loss"] == pytest.approx(single["val_curve"][0]["eval_loss"], abs=1e-6)
    assert two["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-6)
    one_adapter = load_file(tmp_path / "one/adapter_model.safetensors")
    two_adapter = load_file(tmp_path / "two/adapter_model.safetensors")
    assert one_adapter.keys() == two_adapter.keys()
    for key in one_adapter:
        torch.testing.assert_close(two_adapter[key], one_adapter[key], atol=1e-5, rtol=1e-4)  # summation order differs
    # Only the first process wrote: one summary on stdout, one set of files.
    assert result.stdout.count('"eval_loss"') == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    if tracked:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        [events_file] = (tmp_path / "two/tensorboard").iterdir()
        events = EventAccumulator(str(events_file))
        events.Reload()
        losses = [event.value for event in events.Scalars("train/loss")]
        assert losses == pytest.approx(two["train_loss_curve"], rel=1e-6)
