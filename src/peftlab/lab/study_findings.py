"""The sentences a study's report gives after its verdicts, each computed from the records:

    Validation accuracy ranged from 0.842 (r=2) to 0.871 (r=8), 2.9 points apart; within a setting the
    seeds differed by 0.4 to 1.0 points.

Per study: the range of its metric across settings against the seed-to-seed spread within them;
trainable parameters where the settings differ in them; the slowest setting's training time
against the fastest's; the gap between last-epoch training accuracy and validation accuracy
(overfitting); failed runs. For ``peftlab study all``: how many claims held, were contradicted,
showed no effect or were not judged, and which. A number the records lack leaves its sentence out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from peftlab.lab.findings import share
from peftlab.lab.plots import format_count
from peftlab.lab.results import RunRecord
from peftlab.lab.verdict import ACCURACY, OUTCOMES, Cell, Metric, Verdict, cell_of, matches, settings


#: How the count of each outcome reads: "3 held".
TALLY = {"holds": "held", "contradicted": "were contradicted",
         "no effect beyond noise": "showed no effect beyond noise", "not judged": "could not be judged"}


def study_findings(runs: Sequence[RunRecord], metric: Metric) -> list[str]:
    """What a study's runs show beyond its verdicts; [] when no run succeeded."""
    cells = [(setting, cell_of(runs, setting, metric).finite()) for setting in settings(runs)]
    cells = [(setting, cell) for setting, cell in cells if cell.values]
    if not cells:
        return []
    sentences = _range_sentence([cell for _, cell in cells], metric)
    sentences += _parameters_sentence(runs, cells)
    sentences += _time_sentence(runs, cells)
    if metric.key == ACCURACY.key:
        sentences += _overfitting_sentence(runs, cells)
    infinite = [f"{run.run_name} ({metric.of(run)})" for run in runs
                if run.ok and metric.of(run) is not None and not math.isfinite(metric.of(run))]
    if infinite:
        sentences.append(f"{metric.name.capitalize()} was not finite, a run that diverged, and is left out of the "
                         f"numbers above for: {', '.join(infinite)}.")
    failed = [run.run_name for run in runs if not run.ok]
    if failed:
        sentences.append(f"{len(failed)} run{'s' if len(failed) > 1 else ''} failed and "
                         f"{'are' if len(failed) > 1 else 'is'} left out of every number above: {', '.join(failed)}.")
    return sentences


def all_findings(verdicts: Sequence[tuple[str, Verdict]]) -> list[str]:
    """For ``study all``: the outcomes counted, then the claims of each outcome named; ``verdicts`` as (study, verdict)."""
    if not verdicts:
        return []
    counts = [(outcome, [f"{study}: {verdict.claim}" for study, verdict in verdicts if verdict.outcome == outcome])
              for outcome in OUTCOMES]
    tally = ", ".join(f"{len(claims)} {TALLY[outcome]}" for outcome, claims in counts if claims)
    sentences = [f"Of {len(verdicts)} claims tested, {tally}."]
    for outcome, claims in counts:
        if claims:
            sentences.append(f"{outcome[0].upper()}{outcome[1:]}: " + "; ".join(claims) + ".")
    return sentences


def last_epoch_train_accuracy(runs: Sequence[RunRecord]) -> float | None:
    """The mean over ``runs`` of the training accuracy counted during their last epoch."""
    values = [run.train_accuracy[-1]["accuracy"] for run in runs if run.train_accuracy]
    return fmean(values) if values else None


def _range_sentence(cells: list[Cell], metric: Metric) -> list[str]:
    spreads = [spread for spread in (cell.spread(metric) for cell in cells) if spread is not None]
    within = ""
    if spreads:
        within = (f"the seeds differed by {metric.amount(min(spreads))}" if min(spreads) == max(spreads) else
                  f"the seeds differed by {metric.amount(min(spreads))} to {metric.amount(max(spreads))}")
    if len(cells) == 1:
        cell = cells[0]
        return [f"{metric.name.capitalize()} of {cell.label} ranged from "
                f"{metric.value(min(cell.values))} to {metric.value(max(cell.values))} over {len(cell.values)} "
                f"seed{'s' if len(cell.values) > 1 else ''}, mean {metric.value(cell.mean)}."]
    low, high = min(cells, key=lambda cell: cell.mean), max(cells, key=lambda cell: cell.mean)
    if low.mean == high.mean:
        return [f"{metric.name.capitalize()} was {metric.value(low.mean)} in every setting (the mean over seeds)"
                + (f"; within a setting {within}." if within else ".")]
    apart = metric.amount(metric.scale * (high.mean - low.mean))
    return [f"{metric.name.capitalize()} ranged from {metric.value(low.mean)} ({low.label}) to "
            f"{metric.value(high.mean)} ({high.label}), {apart} apart between settings"
            + (f"; within a setting {within}." if within else ".")]


def _mean_of(runs: Sequence[RunRecord], setting: dict[str, Any], key: str) -> float | None:
    values = [getattr(run, key) for run in runs if run.ok and getattr(run, key) is not None
              and matches(run, setting)]
    return fmean(values) if values else None


def _extremes(runs: Sequence[RunRecord], cells: list[tuple[dict, Cell]], key: str) -> tuple | None:
    """(lowest, highest) of the cells' mean ``key`` as (label, value), or None when they do not differ."""
    measured = [(cell.label, value) for setting, cell in cells
                if (value := _mean_of(runs, setting, key)) is not None]
    if len(measured) < 2:
        return None
    low, high = min(measured, key=lambda item: item[1]), max(measured, key=lambda item: item[1])
    return None if low[1] == high[1] else (low, high)


def _parameters_sentence(runs: Sequence[RunRecord], cells: list[tuple[dict, Cell]]) -> list[str]:
    extremes = _extremes(runs, cells, "trainable_params")
    if extremes is None or not extremes[0][1]:
        return []
    (low_label, low), (high_label, high) = extremes
    return [f"{high_label} trained {format_count(high)} parameters, {high / low:.1f}x the {format_count(low)} "
            f"of {low_label}."]


def _time_sentence(runs: Sequence[RunRecord], cells: list[tuple[dict, Cell]]) -> list[str]:
    extremes = _extremes(runs, cells, "train_time_s")
    if extremes is None:
        return []
    (fast_label, fast), (slow_label, slow) = extremes
    return [f"The slowest setting, {slow_label}, trained in {slow:,.1f} s per run, {share(slow, fast)} of the "
            f"fastest, {fast_label} ({fast:,.1f} s)."]


def _overfitting_sentence(runs: Sequence[RunRecord], cells: list[tuple[dict, Cell]]) -> list[str]:
    gaps = []
    for setting, cell in cells:
        own = [run for run in runs if run.ok and run.val_accuracy is not None
               and matches(run, setting)]
        train = last_epoch_train_accuracy(own)
        if train is not None:
            gaps.append((cell.label, train, cell.mean, 100 * (train - cell.mean)))
    if not gaps:
        return []

    def clause(gap: tuple[str, float, float, float]) -> str:
        label, train, validation, points = gap
        return f"{points:+.1f} points with {label} (training {train:.3f}, validation {validation:.3f})"

    widest, narrowest = max(gaps, key=lambda gap: gap[3]), min(gaps, key=lambda gap: gap[3])
    both = clause(widest) if widest is narrowest else f"{clause(widest)}, against {clause(narrowest)}"
    return [f"Training accuracy in the last epoch minus validation accuracy, the overfitting gap: {both}."]
