"""What a finished training run measured: the content of its metrics.json, as typed fields.

    metrics = run_training(options)
    metrics.eval["eval_accuracy"], metrics.train_time_s, metrics.peak_memory_mb

:class:`RunMetrics` is also a read-only mapping with metrics.json's keys (``metrics["train_time_s"]``,
``json.dumps(dict(metrics))``), the form ``run_training`` returned before it had fields, so code written
against the dict and readers of metrics.json see the same names.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from peftlab.train.loop_state import EvalPoint


@dataclass(frozen=True, eq=False)  # eq: the Mapping's (equal to a dict with the same items)
class RunMetrics(Mapping[str, Any]):
    eval: dict[str, float]  # the last evaluation: eval_loss and eval_accuracy or eval_token_accuracy, ...
    train_time_s: float  # in training steps, all steps
    init_time_s: float  # EVA's or CorDA's pass over the data; 0 for the other initialisations
    peak_memory_mb: float  # the largest over processes, loading included
    peak_memory_mb_per_process: list[float]
    training_peak_memory_mb_per_process: list[float | None]  # from the first step on (None: not measurable)
    model_bytes_per_process: list[int]
    trainable_params: int
    total_params: int
    steps: int
    epochs: float
    train_loss_curve: list[float]  # each step's mean loss
    val_curve: list[EvalPoint]
    train_accuracy: list[float]  # per epoch (classification)
    time_per_step_s: float
    time_split_per_step_s: dict[str, float] | None  # forward/backward/optimizer (None: not timed)
    examples_per_s: float
    train_tokens_per_s: float  # this process's tokens, padding excluded
    padding_share: float  # the share of this process's batch slots that were padding
    data: dict[str, Any]  # what preparing causal-LM rows found: rows cut by --max-length, the length chosen
    world_size: int
    strategy: str
    options: dict[str, Any]  # every option, resolved (a TrainOptions as a dict)

    def to_dict(self) -> dict[str, Any]:
        """metrics.json: the evaluation's scores and the data's counts at the top level, as they were."""
        return dict(self._as_json)

    @functools.cached_property
    def _as_json(self) -> dict[str, Any]:
        # Built once (the fields are frozen), not on every key the mapping is asked for.
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name not in ("eval", "data")}
        before_data = {k: v for k, v in fields.items() if k not in ("world_size", "strategy", "options")}
        return {**self.eval, **before_data, **self.data, "world_size": self.world_size, "strategy": self.strategy,
                "options": self.options}

    def __getitem__(self, key: str) -> Any:
        return self._as_json[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_json)

    def __len__(self) -> int:
        return len(self._as_json)
