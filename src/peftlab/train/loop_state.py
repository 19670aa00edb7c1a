"""Where a training run stands: what the loop counts as it goes, and what a checkpoint saves so a
resumed run continues the same curves (see :mod:`peftlab.train.checkpoint`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: An evaluation's scores at a step: ``{"step": 10, "eval_loss": 0.41, "eval_accuracy": 0.83}``.
EvalPoint = dict[str, float]
#: A metrics.jsonl line: step, epoch, loss, lr, step_time_s, examples_per_s, tokens_per_s.
LogLine = dict[str, float]


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # global batches of the current epoch already used
    train_time_s: float = 0.0  # wall clock spent in training steps (not evaluation or checkpoints)
    examples_seen: int = 0
    tokens_seen: int = 0  # this process's tokens, padding excluded
    token_slots: int = 0  # this process's batch slots, padding included
    train_loss_curve: list[float] = field(default_factory=list)  # each step's mean loss
    val_curve: list[EvalPoint] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)  # per finished epoch (classification)
    epoch_correct: int = 0  # the current epoch's training predictions so far
    epoch_count: int = 0
    logged: list[LogLine] = field(default_factory=list)  # metrics.jsonl, rewritten whole on resume
    data_sha256: str | None = None  # the examples the run trains on (a resume on changed data is refused)
    tracker_runs: dict[str, str] | None = None  # the trackers' run ids, continued on resume
    phase_time_s: dict[str, float] = field(default_factory=dict)  # forward/backward/optimizer, CPU runs

    @property
    def padding_share(self) -> float:
        return 1 - self.tokens_seen / self.token_slots if self.token_slots else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        """The state a checkpoint saved; keys written by other versions of peftlab are named, not dropped."""
        names = {spec.name for spec in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise ValueError(f"unknown loop state {', '.join(unknown)} (written by another version of peftlab?)")
        return cls(**saved)
