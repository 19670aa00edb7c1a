"""The Pareto front of a comparison: the runs no other run beats on accuracy and cost at once.

Run ``q`` dominates run ``p`` when ``q`` is at least as accurate and costs at most as much on every
cost (trainable parameters, training time, peak memory, ...), and is strictly better on at least one
of them. The front is the runs nobody dominates. Two runs with identical numbers do not dominate each
other, so both stay on the front (or both leave it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from peftlab.lab.results import RunRecord

#: The costs the report draws a front for: (RunRecord field, axis label), lower is better.
COSTS: dict[str, str] = {
    "trainable_params": "trainable parameters",
    "train_time_s": "training time (s)",
    "peak_memory_mb": "peak memory (MB)",
}


@dataclass(frozen=True)
class Point:
    name: str
    accuracy: float  # higher is better
    costs: tuple[float, ...]  # each lower is better


def dominates(better: Point, worse: Point) -> bool:
    if len(better.costs) != len(worse.costs):
        raise ValueError(f"{better.name} and {worse.name} have different numbers of costs")
    no_worse = better.accuracy >= worse.accuracy and all(b <= w for b, w in zip(better.costs, worse.costs))
    strictly = better.accuracy > worse.accuracy or any(b < w for b, w in zip(better.costs, worse.costs))
    return no_worse and strictly


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point dominates, in the given order."""
    return [point for point in points if not any(dominates(other, point) for other in points)]


def run_points(runs: Sequence[RunRecord], costs: Sequence[str]) -> list[Point]:
    """A point per successful run that has its accuracy and every one of ``costs`` (RunRecord fields), each
    a finite number: a NaN would neither dominate nor be dominated, so it would sit on every front."""
    points = []
    for run in runs:
        values = [run.val_accuracy, *(getattr(run, cost) for cost in costs)]
        if run.ok and all(value is not None and math.isfinite(value) for value in values):
            points.append(Point(run.run_name, float(values[0]), tuple(float(value) for value in values[1:])))
    return points


def front_names(runs: Sequence[RunRecord], costs: Sequence[str]) -> list[str]:
    """The names of the runs on the front of accuracy against ``costs`` taken together."""
    return [point.name for point in pareto_front(run_points(runs, costs))]
