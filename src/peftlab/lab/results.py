"""The results file written by ``peftlab compare`` and read by the report: the contract.

``results.json`` (version 1)::

    {
      "peftlab_results_version": 1,
      "environment": {...},   # free-form: versions, cpu, gpu, threads, ... (nested dicts allowed)
      "config": {...},        # free-form: the training options shared by every run
      "runs": [record, ...]
    }

Every record has every key below; a failed run carries null for each metric.

=====================  =====================================  ==========================================
key                    type                                   meaning
=====================  =====================================  ==========================================
method                 str                                    "full", "lora", "dora", "qlora", ...
run_name               str, unique in the file                "lora", or "lora[r=4]" in a sweep
sweep                  {option: value}                        the swept options of this run, {} if none
status                 "ok" | "failed"
error                  str | null                             why the run failed (null when ok)
val_accuracy           float | null                           final validation accuracy, 0..1
val_curve              [{"step": int, "accuracy": float}]     validation accuracy during training
train_loss_curve       [{"step": int, "loss": float}]         training loss per logged step
train_accuracy         [{"epoch": int, "accuracy": float}]    training accuracy per epoch
train_time_s           float | null                           wall-clock training time, seconds
time_per_step_s        float | null                           seconds per optimizer step
step_time_split_s      {"forward", "backward", "optimizer"}   seconds per step in each phase (the rest of a
                       | null                                 step is data and bookkeeping); null where not
                                                              measured (GPU runs, results from before it)
examples_per_s         float | null                           training throughput
peak_memory_mb         float | null                           peak memory while training, MB
trainable_params       int | null
total_params           int | null
adapter_size_bytes     int | null                             saved adapter (or full checkpoint) on disk
model_size_bytes       int | null                             base model in memory (fp32/bf16 or NF4)
latency_ms             {"base", "adapter", "merged"} | null   inference latency per batch, ms; "merged"
                                                              is null when the adapter cannot be merged
steps                  int | null                             optimizer steps taken
options                {option: value}                        the run's resolved options
rank_per_layer         {layer path: int}                      (optional) live rank of each layer after
                                                              training, for methods that move their rank
                                                              budget (AdaLoRA, dora_rank); {} otherwise
accuracy_per_rank      [{"rank": int, "accuracy": float}]     (optional) validation accuracy of the one
                                                              trained adapter at each rank it runs at
                                                              (DyLoRA); [] otherwise
eval_datasets          {dataset: float}                       accuracy on each --eval-dataset, 0..1, keyed
                                                              as given; {} when none (optional key)
eval_examples          int | null                             validation examples val_accuracy is over
                                                              (optional key: null when not recorded)
majority_accuracy      float | null                           accuracy of always answering the validation
                                                              set's most frequent label, 0..1: the chance
                                                              level val_accuracy must beat (classification
                                                              only; optional key, null when not recorded)
scores                 {name: float}                          (optional) the run's other scores beside
                                                              val_accuracy, e.g. contains_answer,
                                                              token_accuracy and eval_loss when the metric
                                                              is exact match (config["metric"]); {} if none
general_perplexity     float | null                           perplexity on held-out general text after
                                                              training (study forgetting; the base's is in
                                                              config["forgetting"]); null when not measured
                                                              (optional key)
=====================  =====================================  ==========================================

Curves may be null or [] on a failed run; they are written back as []. The optional keys may be
absent (files written before they existed) and read as empty. Keys not listed here are
ignored, so a version may gain keys without breaking older readers; anything else that changes the
meaning of the file bumps ``peftlab_results_version``. MB means 2**20 bytes throughout the lab.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from peftlab.io import atomic_write_text
from peftlab.train.options import FULL_FINE_TUNING

RESULTS_VERSION = 1
VERSION_KEY = "peftlab_results_version"
BYTES_PER_MB = 2**20


class ResultsFormatError(ValueError):
    """The file is not a results file this peftlab can read."""


class ResultsVersionError(ResultsFormatError):
    """The file comes from an incompatible version of the results format."""


class LossPoint(TypedDict):
    step: int
    loss: float


class AccuracyPoint(TypedDict):
    step: int
    accuracy: float


class EpochAccuracy(TypedDict):
    epoch: int
    accuracy: float


class RankAccuracy(TypedDict):
    rank: int
    accuracy: float


@dataclass
class Latency:
    """Inference latency per batch in ms: the base model, with the adapter, and merged (None: can't merge)."""

    base: float | None
    adapter: float | None
    merged: float | None


@dataclass
class RunRecord:
    """One run of one method; see the module docstring for the meaning of each field."""

    method: str
    run_name: str
    status: Literal["ok", "failed"]
    error: str | None = None
    sweep: dict[str, Any] = field(default_factory=dict)
    val_accuracy: float | None = None
    val_curve: list[AccuracyPoint] = field(default_factory=list)
    train_loss_curve: list[LossPoint] = field(default_factory=list)
    train_accuracy: list[EpochAccuracy] = field(default_factory=list)
    train_time_s: float | None = None
    time_per_step_s: float | None = None
    step_time_split_s: dict[str, float] | None = None
    examples_per_s: float | None = None
    peak_memory_mb: float | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    adapter_size_bytes: int | None = None
    model_size_bytes: int | None = None
    latency_ms: Latency | None = None
    steps: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    rank_per_layer: dict[str, int] = field(default_factory=dict)
    accuracy_per_rank: list[RankAccuracy] = field(default_factory=list)
    eval_datasets: dict[str, float] = field(default_factory=dict)
    eval_examples: int | None = None
    majority_accuracy: float | None = None
    general_perplexity: float | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_full_fine_tuning(self) -> bool:
        return self.method == FULL_FINE_TUNING

    @property
    def trainable_fraction(self) -> float | None:
        if self.trainable_params is None or not self.total_params:
            return None
        return self.trainable_params / self.total_params

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _RECORD_KEYS}
        data["latency_ms"] = None if self.latency_ms is None else vars(self.latency_ms).copy()
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RunRecord:
        if not isinstance(data, dict):
            raise ResultsFormatError(f"{where}: a run record must be an object, got {type(data).__name__}")
        missing = [key for key in _RECORD_KEYS if key not in data and key not in _OPTIONAL_KEYS]
        data = {**{key: None for key in _OPTIONAL_KEYS}, **data}
        if missing:
            raise ResultsFormatError(f"{where}: missing keys {', '.join(missing)}")
        where = f"{where} ({data['run_name']!r})" if isinstance(data["run_name"], str) else where
        for key in ("method", "run_name"):
            _require(isinstance(data[key], str) and data[key], where, key, "a non-empty string", data[key])
        _require(data["status"] in ("ok", "failed"), where, "status", '"ok" or "failed"', data["status"])
        _require(data["error"] is None or isinstance(data["error"], str), where, "error", "a string or null",
                 data["error"])
        for key in ("sweep", "options"):
            _require(isinstance(data[key], dict), where, key, "an object", data[key])
        data["rank_per_layer"] = data["rank_per_layer"] or {}
        _require(all(isinstance(v, int) and not isinstance(v, bool) for v in data["rank_per_layer"].values()),
                 where, "rank_per_layer", "an object of integers", data["rank_per_layer"])
        for key in _NUMBER_KEYS:
            _require(data[key] is None or _is_number(data[key]), where, key, "a number or null", data[key])
        split = data.get("step_time_split_s")
        _require(split is None or (isinstance(split, dict) and all(_is_number(v) for v in split.values())),
                 where, "step_time_split_s", "null or an object of numbers", split)
        eval_datasets = data.get("eval_datasets") or {}
        _require(isinstance(eval_datasets, dict) and all(_is_number(v) for v in eval_datasets.values()),
                 where, "eval_datasets", "an object of numbers", eval_datasets)
        scores = data.get("scores") or {}
        _require(isinstance(scores, dict) and all(_is_number(v) for v in scores.values()),
                 where, "scores", "an object of numbers", scores)
        curves: dict[str, Any] = {key: _read_curve(data[key], where, key, keys) for key, keys in _CURVE_KEYS.items()}
        return cls(
            **{key: data[key] for key in _RECORD_KEYS if key not in (*curves, *_OPTIONAL_KEYS, "latency_ms")},
            **curves,
            latency_ms=_read_latency(data["latency_ms"], where),
            step_time_split_s=split,
            rank_per_layer=data["rank_per_layer"],
            eval_datasets=eval_datasets,
            eval_examples=data["eval_examples"],
            majority_accuracy=data["majority_accuracy"],
            general_perplexity=data["general_perplexity"],
            scores=scores,
        )


@dataclass
class Results:
    """A whole results file: where it ran, the shared config, and one record per run."""

    runs: list[RunRecord]
    environment: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_runs(self) -> list[RunRecord]:
        return [run for run in self.runs if run.ok]

    @property
    def sweep_variables(self) -> list[str]:
        """The swept options, in order of first appearance."""
        return list(dict.fromkeys(key for run in self.runs for key in run.sweep))

    def time_baseline(self) -> RunRecord | None:
        """The run that counts as 100% time: the full fine-tune, else the slowest successful run."""
        timed = [run for run in self.ok_runs if run.train_time_s]
        full = [run for run in timed if run.is_full_fine_tuning]
        if full:
            return next((run for run in full if run.run_name == FULL_FINE_TUNING), full[0])
        return max(timed, key=lambda run: run.train_time_s or 0.0, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            VERSION_KEY: RESULTS_VERSION,
            "environment": self.environment,
            "config": self.config,
            "runs": [run.to_dict() for run in self.runs],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "results") -> Results:
        if not isinstance(data, dict):
            raise ResultsFormatError(f"{source}: expected a JSON object at the top level")
        version = data.get(VERSION_KEY)
        if version != RESULTS_VERSION:
            found = f"no {VERSION_KEY} key" if version is None else f"{VERSION_KEY}={version!r}"
            raise ResultsVersionError(
                f"{source}: has {found}, but this peftlab reads {VERSION_KEY}={RESULTS_VERSION}. "
                "Re-run `peftlab compare` with this peftlab, or read it with the peftlab that wrote it."
            )
        for key, kind in (("environment", dict), ("config", dict), ("runs", list)):
            if not isinstance(data.get(key), kind):
                raise ResultsFormatError(f"{source}: {key!r} must be a JSON {'object' if kind is dict else 'list'}")
        runs = [RunRecord.from_dict(run, f"{source}: runs[{i}]") for i, run in enumerate(data["runs"])]
        names = [run.run_name for run in runs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ResultsFormatError(f"{source}: run_name must be unique, repeated: {', '.join(duplicates)}")
        return cls(runs=runs, environment=data["environment"], config=data["config"])


def load_results(path: str | os.PathLike[str]) -> Results:
    """Read and validate a results file; raises ResultsVersionError for a file from another format version."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ResultsFormatError(f"{path}: not valid JSON ({error})") from error
    return Results.from_dict(data, source=str(path))


def save_results(path: str | os.PathLike[str], results: Results) -> Path:
    """Write the results file atomically, so a crash mid-write never leaves a truncated file behind."""
    atomic_write_text(path, json.dumps(results.to_dict(), indent=2) + "\n")
    return Path(path)


def results_to_csv(results: Results, path: str | os.PathLike[str]) -> Path:
    """Write one row per run with flat scalar columns (sweep_* and option_* columns for the varying parts)."""
    rows = [_csv_row(run) for run in results.runs]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


_CURVE_KEYS = {
    "val_curve": ("step", "accuracy"),
    "train_loss_curve": ("step", "loss"),
    "train_accuracy": ("epoch", "accuracy"),
    "accuracy_per_rank": ("rank", "accuracy"),
}
_NUMBER_KEYS = (
    "val_accuracy", "train_time_s", "time_per_step_s", "examples_per_s", "peak_memory_mb", "trainable_params",
    "total_params", "adapter_size_bytes", "model_size_bytes", "steps", "eval_examples", "majority_accuracy",
    "general_perplexity",
)
_RECORD_KEYS = tuple(name for name in RunRecord.__dataclass_fields__)
#: Keys added after version 1 was first written: a file without them still reads (as null or empty).
_OPTIONAL_KEYS = ("step_time_split_s", "rank_per_layer", "accuracy_per_rank", "eval_datasets", "eval_examples",
                  "majority_accuracy", "general_perplexity", "scores")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(condition: bool, where: str, key: str, expected: str, got: Any) -> None:
    if not condition:
        raise ResultsFormatError(f"{where}: {key} must be {expected}, got {got!r}")


def _read_curve(points: Any, where: str, key: str, point_keys: tuple[str, str]) -> list[Any]:
    if points is None:
        return []
    _require(isinstance(points, list), where, key, "a list or null", points)
    for point in points:
        valid = isinstance(point, dict) and all(_is_number(point.get(k)) for k in point_keys)
        _require(valid, where, key, f"a list of {{{', '.join(map(repr, point_keys))}}} numbers", point)
    return points


def _read_latency(latency: Any, where: str) -> Latency | None:
    if latency is None:
        return None
    valid = isinstance(latency, dict) and all(
        latency.get(key) is None or _is_number(latency.get(key)) for key in ("base", "adapter", "merged")
    )
    _require(valid, where, "latency_ms", 'null or {"base", "adapter", "merged"} numbers or nulls', latency)
    return Latency(base=latency.get("base"), adapter=latency.get("adapter"), merged=latency.get("merged"))


def _csv_row(run: RunRecord) -> dict[str, Any]:
    latency = run.latency_ms or Latency(None, None, None)
    last_loss = run.train_loss_curve[-1]["loss"] if run.train_loss_curve else None
    last_train_accuracy = run.train_accuracy[-1]["accuracy"] if run.train_accuracy else None
    row: dict[str, Any] = {
        "run_name": run.run_name,
        "method": run.method,
        "status": run.status,
        "error": run.error,
        **{f"sweep_{key}": _csv_scalar(value) for key, value in run.sweep.items()},
        "val_accuracy": run.val_accuracy,
        "final_train_loss": last_loss,
        "final_train_accuracy": last_train_accuracy,
        "train_time_s": run.train_time_s,
        "time_per_step_s": run.time_per_step_s,
        **{f"step_{phase}_s": seconds for phase, seconds in (run.step_time_split_s or {}).items()},
        "examples_per_s": run.examples_per_s,
        "peak_memory_mb": run.peak_memory_mb,
        "trainable_params": run.trainable_params,
        "total_params": run.total_params,
        "trainable_fraction": run.trainable_fraction,
        "adapter_size_bytes": run.adapter_size_bytes,
        "model_size_bytes": run.model_size_bytes,
        "latency_base_ms": latency.base,
        "latency_adapter_ms": latency.adapter,
        "latency_merged_ms": latency.merged,
        "steps": run.steps,
        "majority_accuracy": run.majority_accuracy,
        **{f"eval_{key}_accuracy": accuracy for key, accuracy in run.eval_datasets.items()},
        **({"general_perplexity": run.general_perplexity} if run.general_perplexity is not None else {}),
        **{f"score_{key}": value for key, value in run.scores.items()},
        **{f"option_{key}": _csv_scalar(value) for key, value in run.options.items()},
    }
    return {key: "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            for key, value in row.items()}


def _csv_scalar(value: Any) -> Any:
    """Lists and dicts become compact JSON so every cell stays a single scalar."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
