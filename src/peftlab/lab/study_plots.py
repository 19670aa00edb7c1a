"""A study's plots. Its metric per setting, each seed a dot, the mean a bar, the seed-to-seed range a line:
one row per setting (``lora_alpha=2r``), so the effect a verdict weighs -- the distance between two
rows' means -- is drawn against the spread it had to beat -- each row's range. Each seed keeps its
colour across rows, which shows whether one seed is better everywhere. For accuracy, a hollow
diamond marks the mean training accuracy of the last epoch: its distance from the validation mean is
the overfitting gap.

And, for a study that asks how fast the loss falls (``init``), the training loss against the steps:
one colour per setting, each seed a thin line, the mean over seeds a thick one.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean

from peftlab.lab.plots import _bar_height, _figure, _footnote_left_out, _save
from peftlab.lab.results import Results
from peftlab.lab.study_findings import last_epoch_train_accuracy
from peftlab.lab.verdict import ACCURACY, EARLY_SHARE, SEED_OPTION, Metric, cell_of, matches, setting_label, settings

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


def plot_loss_by_setting(results: Results, title: str, path: Path) -> Path | None:
    """Training loss against the optimizer step, one colour per setting: each seed's curve thin, their mean
    (at the steps every seed logged) thick. A dotted line marks 10% of the steps, the end of the window the
    early-loss verdicts average. None when no run recorded a loss curve."""
    rows = [(setting, [run for run in results.ok_runs if run.train_loss_curve and matches(run, setting)])
            for setting in settings(results.runs)]
    rows = [(setting, runs) for setting, runs in rows if runs]
    if not rows:
        return None
    fig = _figure(height=5.2)
    ax = fig.subplots()
    drawn, longest = [], 0
    for index, (setting, runs) in enumerate(rows):
        color = f"C{index % 10}"
        curves = [{point["step"]: point["loss"] for point in run.train_loss_curve} for run in runs]
        for curve in curves:
            ax.plot(list(curve), list(curve.values()), color=color, linewidth=0.7, alpha=0.35)
        shared = sorted(set.intersection(*(set(curve) for curve in curves)))
        ax.plot(shared, [fmean(curve[step] for curve in curves) for step in shared], color=color, linewidth=2,
                label=f"{setting_label(setting)} (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''})")
        drawn += runs
        longest = max(longest, *(run.steps or max(curve) for run, curve in zip(runs, curves)))
    ax.axvline(EARLY_SHARE * longest, color="0.5", linestyle=":", linewidth=1)
    ax.annotate(f"{EARLY_SHARE:.0%} of the steps", (EARLY_SHARE * longest, 1), xycoords=("data", "axes fraction"),
                xytext=(4, -12), textcoords="offset points", fontsize=8, color="0.4")
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    _footnote_left_out(fig, results, drawn)
    return _save(fig, path)
