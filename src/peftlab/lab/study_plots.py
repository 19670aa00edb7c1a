"""A study's plot: its metric per setting, each seed a dot, the mean a bar, the seed-to-seed range a line.

One row per setting (``lora_alpha=2r``), so the effect a verdict weighs -- the distance between two
rows' means -- is drawn against the spread it had to beat -- each row's range. Each seed keeps its
colour across rows, which shows whether one seed is better everywhere. For accuracy, a hollow
diamond marks the mean training accuracy of the last epoch: its distance from the validation mean is
the overfitting gap.
"""

from __future__ import annotations

import math
from pathlib import Path

from peftlab.lab.plots import _bar_height, _figure, _footnote_left_out, _save
from peftlab.lab.results import Results
from peftlab.lab.study_findings import last_epoch_train_accuracy
from peftlab.lab.verdict import ACCURACY, SEED_OPTION, Metric, cell_of, matches, settings

MEAN_COLOR = "0.1"


def plot_study(results: Results, metric: Metric, title: str, path: Path) -> Path | None:
    """None when no run has the metric; a run whose value is not finite is left out (named in the footnote)."""
    rows = [(setting, cell_of(results.runs, setting, metric).finite()) for setting in settings(results.runs)]
    rows = [(setting, cell) for setting, cell in rows if cell.values]
    if not rows:
        return None
    measured = [run for run in results.ok_runs if metric.of(run) is not None and math.isfinite(metric.of(run))]
    seeds = sorted({run.sweep.get(SEED_OPTION) for run in measured}, key=str)
    colors = {seed: f"C{index % 10}" for index, seed in enumerate(seeds)}
    fig = _figure(height=_bar_height(len(rows)) + 0.8)
    ax = fig.subplots()
    drawn, every_value = [], []
    for row, (setting, cell) in enumerate(rows):
        runs = [run for run in measured if matches(run, setting)]
        drawn += runs
        values = [metric.of(run) for run in runs]
        every_value += values
        ax.plot([min(values), max(values)], [row, row], color="0.6", linewidth=2, zorder=1)
        for run in runs:
            ax.scatter(metric.of(run), row, s=45, color=colors[run.sweep.get(SEED_OPTION)], zorder=3,
                       edgecolor="white", linewidth=0.6)
        ax.scatter(cell.mean, row, marker="|", s=250, color=MEAN_COLOR, linewidth=2.2, zorder=4)
        spread = cell.spread(metric)
        note = f"{metric.value(cell.mean)}" + (f"  (spread {metric.amount(spread)})" if spread is not None else "")
        ax.annotate(note, (max(values), row), textcoords="offset points", xytext=(10, 6), fontsize=9)
        train = last_epoch_train_accuracy(runs) if metric is ACCURACY else None
        if train is not None:
            every_value.append(train)
            ax.scatter(train, row, marker="D", s=50, facecolor="none", edgecolor=MEAN_COLOR, zorder=3)
    ax.set_yticks(range(len(rows)), [cell.label for _, cell in rows])
    ax.set_ylim(len(rows) - 0.5, -0.7)  # first setting on top, room above it for its label
    low, high = min(every_value), max(every_value)
    span = (high - low) or abs(high) * 0.05 or 1.0
    ax.set_xlim(low - 0.1 * span, high + 0.6 * span)  # room for the labels on the right
    ax.grid(True, axis="x", alpha=0.3)
    for seed in seeds:
        ax.scatter([], [], s=45, color=colors[seed], label=f"seed {seed}")
    ax.scatter([], [], marker="|", s=200, color=MEAN_COLOR, linewidth=2.2, label="mean")
    if metric is ACCURACY and any(last_epoch_train_accuracy([run]) is not None for run in drawn):
        ax.scatter([], [], marker="D", s=40, facecolor="none", edgecolor=MEAN_COLOR,
                   label="training accuracy, last epoch (mean)")
    fig.legend(fontsize=8, loc="outside lower center", ncols=len(seeds) + 2)
    ax.set_xlabel(metric.axis or metric.name)
    ax.set_title(title)
    _footnote_left_out(fig, results, drawn)
    return _save(fig, path)
