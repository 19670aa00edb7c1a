"""The engine's hand-offs are typed (issue 25): what run_training returns, what a checkpoint saves."""

from __future__ import annotations

import dataclasses
import json

import pytest
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

from peftlab.train import run_training
import peftlab.train.loop as loop_module
from peftlab.train.checkpoint import CheckpointError, load_checkpoint
from peftlab.train.loop_state import LoopState
from peftlab.train.run_metrics import RunMetrics


def test_run_metrics_fields_are_metrics_json(bert_dir, sentiment_dir, tmp_path):
    metrics = run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, max_steps=3))
    assert isinstance(metrics, RunMetrics)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert dict(metrics) == written == metrics.to_dict()
    assert list(written)[: len(metrics.eval)] == list(metrics.eval)  # the scores come first, as before
    assert metrics.steps == 3 == len(metrics.train_loss_curve) and metrics["steps"] == 3
    assert metrics.eval["eval_accuracy"] == written["eval_accuracy"] == metrics.val_curve[-1]["eval_accuracy"]
    assert metrics.options["max_steps"] == 3 and metrics.trainable_params < metrics.total_params
    assert not {"eval", "data"} & set(written)  # the two groups are flattened into the top level


def test_a_checkpoint_saves_the_loop_state_and_refuses_one_it_does_not_know(bert_dir, sentiment_dir, tmp_path,
                                                                          monkeypatch):
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "run", max_steps=4, save_every=2))
    state = load_checkpoint(tmp_path / "run").state  # trainer_state.json
    assert set(state) - {"options"} <= {spec.name for spec in dataclasses.fields(LoopState)}
    restored = LoopState.from_dict({k: v for k, v in state.items() if k != "options"})
    assert restored.step == 4 and len(restored.train_loss_curve) == 4 and len(restored.logged) == 4
    assert restored.to_dict() == {k: v for k, v in state.items() if k != "options"}
    with pytest.raises(ValueError, match=r"unknown loop state future_counter \(written by another version"):
        LoopState.from_dict({**restored.to_dict(), "future_counter": 1})

    def with_an_unknown_key(path):
        checkpoint = load_checkpoint(path)
        checkpoint.state["future_counter"] = 1
        return checkpoint

    monkeypatch.setattr(loop_module, "load_checkpoint", with_an_unknown_key)
    with pytest.raises(CheckpointError, match="future_counter .*resume it with that version"):
        run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "run", max_steps=4, save_every=2,
                                  resume=str(tmp_path / "run")))
