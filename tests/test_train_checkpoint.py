"""Checkpoints: exact resume, atomic writes that survive a failure, and stopping on NaN."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

import peftlab.train.checkpoint as checkpoint_module
import peftlab.train.loop as loop_module
from peftlab.train import TrainingDiverged, TrainingHook, run_training
from peftlab.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint

N = 5  # steps before the interruption; 8 batches of 8 per epoch with grad_accum 2: 4 steps an epoch


class Killed(Exception):
    pass


class KillAfter(TrainingHook):
    """Stands for a process killed right after step ``step`` (and its checkpoint) completed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, progress):
        if progress.step == self.step:
            raise Killed()


def resume_options(bert_dir, sentiment_dir, out, **changes):
    # Dropout on, several epochs, accumulation: the RNG, data position and optimizer state all matter.
    return tiny_options(bert_dir, sentiment_dir, out, max_steps=2 * N, grad_accum=2, lora_dropout=0.2, lr=1e-2,
                        scheduler="linear", warmup_ratio=0.2, **changes)


def test_resume_continues_the_loss_curve_exactly(bert_dir, sentiment_dir, tmp_path, monkeypatch):
    whole = run_training(resume_options(bert_dir, sentiment_dir, tmp_path / "whole"))

    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: [KillAfter(N)])
    with pytest.raises(Killed):
        run_training(resume_options(bert_dir, sentiment_dir, tmp_path / "cut", save_every=N))
    assert find_checkpoint(tmp_path / "cut").name == f"checkpoint-{N}"
    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: [KillAfter(-1)])  # same hooks, never fires

    resumed = run_training(resume_options(bert_dir, sentiment_dir, tmp_path / "cut", resume=str(tmp_path / "cut")))
    assert len(resumed["train_loss_curve"]) == 2 * N
    assert resumed["train_loss_curve"] == pytest.approx(whole["train_loss_curve"], abs=1e-6)
    assert resumed["train_accuracy"] == whole["train_accuracy"]
    assert resumed["eval_accuracy"] == whole["eval_accuracy"]
    a, b = load_file(tmp_path / "whole/adapter_model.safetensors"), load_file(tmp_path / "cut/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    lines = [json.loads(line)["step"] for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert lines == list(range(1, 2 * N + 1))


def test_checkpoint_contents_load_without_pickle(bert_dir, sentiment_dir, tmp_path):
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, max_steps=4, save_every=2))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-4"]  # older ones are removed
    saved = load_checkpoint(tmp_path)  # torch.load(weights_only=True) inside
    assert saved.state["step"] == 4 and len(saved.state["train_loss_curve"]) == 4
    assert any("lora_A" in name for name in saved.trainable) and saved.optimizer["state"]
    assert saved.state["options"]["seed"] == 42 and len(saved.rng) == 1


def test_a_failed_write_keeps_the_previous_checkpoint(bert_dir, sentiment_dir, tmp_path, monkeypatch):
    writes = []

    def failing_fsync(path):
        writes.append(path)
        if "checkpoint-4" in str(path.parent):
            raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "_fsync", failing_fsync)
    with pytest.raises(OSError, match=r"^disk full while writing checkpoint .*checkpoint-4: nothing was replaced there, the previous checkpoint is intact\. Free space"):
        run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, max_steps=6, save_every=2))
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert load_checkpoint(tmp_path).state["step"] == 2


def test_a_half_written_checkpoint_is_never_picked(bert_dir, sentiment_dir, tmp_path):
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, max_steps=2, save_every=2))
    # What a process killed during the next write leaves: a hidden temporary folder with some files.
    partial = tmp_path / ".checkpoint-4.abc.tmp"
    shutil.copytree(tmp_path / "checkpoint-2", partial)
    (partial / "trainable.safetensors").write_bytes(b"truncated")
    assert find_checkpoint(tmp_path).name == "checkpoint-2"
    (tmp_path / "checkpoint-2" / "rng.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "checkpoint-2")


def test_resume_refuses_other_options(bert_dir, sentiment_dir, tmp_path):
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "a", max_steps=2, save_every=2))
    with pytest.raises(CheckpointError, match="lr: saved 0.001, now 0.01"):
        run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "b", max_steps=2, lr=0.01, resume=str(tmp_path / "a")))
    with pytest.raises(CheckpointError, match="no checkpoint-N folder"):
        run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "c", resume=str(tmp_path)))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(bert_dir, sentiment_dir, tmp_path, monkeypatch):
    real = loop_module.forward_totals
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        totals = real(*args, **kwargs)
        if len(calls) == 3:  # the third step's loss
            totals.loss_sum = totals.loss_sum * float("nan")
        return totals

    monkeypatch.setattr(loop_module, "forward_totals", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*checkpoint-2.*Lower --lr"):
        run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, max_steps=6, save_every=2))
    saved = load_checkpoint(tmp_path)
    assert saved.state["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved.trainable.values())
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_an_exploding_learning_rate_is_caught(bert_dir, sentiment_dir, tmp_path):
    with pytest.raises(TrainingDiverged, match="became (nan|inf)"):
        run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, method="full", optimizer="sgd", lr=1e30,
                                  momentum=0.0, max_grad_norm=None, scheduler="constant", warmup_ratio=0.0, epochs=3))
