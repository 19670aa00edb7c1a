"""Comparison plots for a results file, one PNG per function.

Figures are drawn on matplotlib's Agg canvas directly (``Figure``, not pyplot), so plotting needs no
display, leaves the process's backend alone and holds no global figure state. Only successful runs
with the plotted metric are drawn; the others are named in a footnote. A plot function returns its
PNG path, or None when there is nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from peftlab.lab.metric import metric_label
from peftlab.lab.results import BYTES_PER_MB, Results, RunRecord

LOSS_SMOOTHING = 0.6  # the report's EMA weight: curves stay recognisable, step-to-step noise goes
DPI = 110
WIDTH_IN = 9.0


@dataclass(frozen=True)
class Plot:
    title: str
    path: Path
    caption: str


def plot_relative_time(results: Results, path: Path) -> Path | None:
    baseline = results.time_baseline()
    runs = _runs_with(results, "train_time_s")
    if baseline is None or not runs:
        return None
    percents = [100 * run.train_time_s / baseline.train_time_s for run in runs]
    labels = [f"{pct:.1f}%  ({run.train_time_s:,.1f} s)" for pct, run in zip(percents, runs)]
    baseline_label = "full" if baseline.is_full_fine_tuning else f"slowest run, {baseline.run_name}"
    fig, ax = _bar_figure(results, runs, percents, labels)
    ax.axvline(100, color="0.3", linestyle="--", linewidth=1)
    ax.set_xlabel(f"training time, % of {baseline.run_name} ({baseline.train_time_s:,.1f} s)")
    ax.set_title(f"Relative training time ({baseline_label} = 100%, lower is faster)")
    _footnote_left_out(fig, results, runs)
    return _save(fig, path)


def plot_val_accuracy(results: Results, path: Path) -> Path | None:
    runs = _runs_with(results, "val_accuracy")
    if not runs:
        return None
    values = [run.val_accuracy for run in runs]
    fig, ax = _bar_figure(results, runs, values, [f"{value:.3f}" for value in values])
    ax.set_xlim(0, 1.12)  # accuracies are compared on the full 0..1 scale; the printed values resolve them
    label = metric_label(results.config)
    ax.set_xlabel(f"validation {label} (final)")
    ax.set_title(f"Validation {label} per run (higher is better)")
    _footnote_left_out(fig, results, runs)
    return _save(fig, path)


def plot_peak_memory(results: Results, path: Path) -> Path | None:
    runs = _runs_with(results, "peak_memory_mb")
    if not runs:
        return None
    values = [run.peak_memory_mb for run in runs]
    fig, ax = _bar_figure(results, runs, values, [f"{format_mb(value)} MB" for value in values])
    ax.set_xlabel("peak memory while training (MB)")
    ax.set_title("Peak training memory per run (lower is better)")
    _footnote_left_out(fig, results, runs)
    return _save(fig, path)


def plot_model_size(results: Results, path: Path) -> Path | None:
    runs = [run for run in results.ok_runs if run.model_size_bytes or run.adapter_size_bytes]
    if not runs:
        return None
    fig = _figure(height=_bar_height(len(runs) * 1.6))
    ax = fig.subplots()
    bar_height = 0.38
    series = [
        ("base model in memory", "model_size_bytes", "#8d99ae", -bar_height / 2),
        ("adapter / checkpoint on disk", "adapter_size_bytes", "#2a9d8f", bar_height / 2),
    ]
    all_mb = []
    for label, key, color, offset in series:
        positions, sizes_mb = [], []
        for position, run in enumerate(runs):
            size = getattr(run, key)
            if size:
                positions.append(position + offset)
                sizes_mb.append(size / BYTES_PER_MB)
        bars = ax.barh(positions, sizes_mb, height=bar_height, color=color, label=label)
        ax.bar_label(bars, labels=[f"{format_mb(mb)} MB" for mb in sizes_mb], padding=3, fontsize=9)
        all_mb += sizes_mb
    ax.set_xscale("log")
    ax.set_xlim(min(all_mb) / 3, max(all_mb) * 12)  # room on the right for the value labels
    ax.xaxis.set_major_formatter(FuncFormatter(lambda mb, _: f"{mb:,g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    _run_name_axis(ax, runs)
    ax.set_xlabel("size (MB, log scale)")
    ax.set_title("Model size: base model in memory vs saved adapter")
    ax.legend(loc="lower right", fontsize=9)
    _footnote_left_out(fig, results, runs)
    return _save(fig, path)


def plot_loss_curves(results: Results, path: Path, smoothing: float = 0.0) -> Path | None:
    """All runs' training loss on one axis; smoothing is the EMA weight in [0, 1), 0 draws the raw loss."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    runs = [run for run in results.ok_runs if run.train_loss_curve]
    if not runs:
        return None
    colors = _run_colors(results)
    fig = _figure(height=5.2)
    ax = fig.subplots()
    for run in runs:
        steps = [point["step"] for point in run.train_loss_curve]
        losses = [point["loss"] for point in run.train_loss_curve]
        if smoothing:
            ax.plot(steps, losses, color=colors[run.run_name], alpha=0.2, linewidth=1)
            losses = _ema(losses, smoothing)
        ax.plot(steps, losses, color=colors[run.run_name], linewidth=1.8, label=run.run_name,
                marker="o" if len(steps) == 1 else None)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    suffix = f" (EMA smoothing {smoothing:g}, raw faint)" if smoothing else ""
    ax.set_title(f"Training loss{suffix}")
    _legend(ax, len(runs))
    _footnote_left_out(fig, results, runs)
    return _save(fig, path)


def plot_val_curves(results: Results, path: Path) -> Path | None:
    """None when no run was evaluated more than once: one point per run is the final-accuracy plot again."""
    runs = [run for run in results.ok_runs if run.val_curve]
    if not any(len(run.val_curve) > 1 for run in runs):
        return None
    label = metric_label(results.config)
    return _accuracy_lines(results, runs, "val_curve", "step", "optimizer step", f"Validation {label} during training",
                           path, label)


def plot_sweep(results: Results, variable: str, path: Path) -> Path | None:
    """Val accuracy and training time against one swept option; a line per method (and per other swept values)."""
    runs = [run for run in results.ok_runs if variable in run.sweep]
    if not runs:
        return None
    value_of = {run.run_name: _hashable(run.sweep[variable]) for run in runs}
    values = list(dict.fromkeys(value_of.values()))
    numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
    if numeric:
        values.sort()
    position = {value: value if numeric else index for index, value in enumerate(values)}
    log_x = numeric and min(values) > 0 and max(values) / min(values) >= 8
    lines: dict[str, list[RunRecord]] = {}
    for run in runs:
        others = ", ".join(f"{key}={value}" for key, value in run.sweep.items() if key != variable)
        lines.setdefault(f"{run.method} ({others})" if others else run.method, []).append(run)
    colors = _method_colors(results)
    fig = _figure(height=4.6)
    accuracy_ax, time_ax = fig.subplots(1, 2)
    for style_index, (label, own) in enumerate(lines.items()):
        own.sort(key=lambda run: values.index(value_of[run.run_name]))
        xs = [position[value_of[run.run_name]] for run in own]
        style = dict(color=colors[own[0].method], marker="o", linewidth=1.8, label=label,
                     linestyle=["-", "--", ":", "-."][style_index % 4])
        accuracy_points = [(x, run.val_accuracy) for x, run in zip(xs, own) if run.val_accuracy is not None]
        time_points = [(x, run.train_time_s) for x, run in zip(xs, own) if run.train_time_s is not None]
        if accuracy_points:
            accuracy_ax.plot(*zip(*accuracy_points), **style)
        if time_points:
            time_ax.plot(*zip(*time_points), **style)
    metric = metric_label(results.config)
    for ax, ylabel in ((accuracy_ax, f"validation {metric}"), (time_ax, "training time (s)")):
        if log_x:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks([position[value] for value in values], [str(value) for value in values])
        ax.set_xlabel(variable)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    accuracy_ax.set_title(f"Validation {metric} vs {variable}")
    time_ax.set_title(f"Training time vs {variable}")
    accuracy_ax.legend(fontsize=8, loc="best")
    _footnote_left_out(fig, results, runs, among=[run for run in results.runs if variable in run.sweep])
    return _save(fig, path)


def plot_accuracy_per_rank(results: Results, path: Path) -> Path | None:
    """Validation accuracy of one trained adapter evaluated at each rank (DyLoRA), a line per run."""
    runs = [run for run in results.ok_runs if run.accuracy_per_rank]
    if not runs:
        return None
    # measure_ranks scores with the loss's metric: a causal LM's token accuracy, whatever ranks the comparison.
    label = "accuracy" if results.config.get("task", "seq-cls") == "seq-cls" else "token accuracy"
    return _accuracy_lines(results, runs, "accuracy_per_rank", "rank", "rank at inference",
                           f"{label[0].upper() + label[1:]} per rank, one trained adapter each", path, label)


def _accuracy_lines(results: Results, runs: list, series: str, x: str, xlabel: str, title: str, path: Path,
                    label: str) -> Path:
    """Validation accuracy against ``x``, a line per run, from each run's list of points ``run.<series>``."""
    colors = _run_colors(results)
    fig = _figure(height=5.2)
    ax = fig.subplots()
    for run in runs:
        points = getattr(run, series)
        ax.plot([point[x] for point in points], [point["accuracy"] for point in points],
                color=colors[run.run_name], marker="o", markersize=4, linewidth=1.8, label=run.run_name)
    _pad_y(ax, [point["accuracy"] for run in runs for point in getattr(run, series)])
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"validation {label}")
    ax.set_title(title)
    _legend(ax, len(runs))
    _footnote_left_out(fig, results, runs)
    return _save(fig, path)


def plot_rank_per_layer(results: Results, path: Path) -> Path | None:
    """Live rank of each adapted layer after training, for methods that move their rank budget."""
    runs = [run for run in results.ok_runs if run.rank_per_layer]
    if not runs:
        return None
    colors = _run_colors(results)
    layers = list(dict.fromkeys(layer for run in runs for layer in run.rank_per_layer))
    fig = _figure(height=4.0 + 0.12 * len(layers))
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        ax.barh([j + i * width for j in range(len(layers))], [run.rank_per_layer.get(layer, 0) for layer in layers],
                height=width, color=colors[run.run_name], label=run.run_name)
    ax.set_yticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, fontsize=7)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel("live rank after training")
    ax.set_title("Where the rank budget went, per layer")
    _legend(ax, len(runs))
    _footnote_left_out(fig, results, runs)
    return _save(fig, path)


def _runs_with(results: Results, metric: str) -> list[RunRecord]:
    return [run for run in results.ok_runs if getattr(run, metric) is not None]


def _figure(height: float) -> Figure:
    return Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")


def _bar_height(rows: float) -> float:
    return 1.6 + 0.45 * max(rows, 2)


def _bar_figure(results: Results, runs: Sequence[RunRecord], values: Sequence[float],
                labels: Sequence[str]) -> tuple[Figure, Axes]:
    """One horizontal bar per run, coloured by method, with its value printed at the end of the bar."""
    colors = _run_colors(results)
    fig = _figure(height=_bar_height(len(runs)))
    ax = fig.subplots()
    bars = ax.barh(range(len(runs)), values, color=[colors[run.run_name] for run in runs], height=0.6)
    ax.bar_label(bars, labels=labels, padding=4, fontsize=9)
    ax.set_xlim(0, max(values) * 1.35 if max(values) > 0 else 1)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,g}"))
    _run_name_axis(ax, runs)
    ax.grid(True, axis="x", alpha=0.3)
    return fig, ax


def _run_name_axis(ax: Axes, runs: Sequence[RunRecord]) -> None:
    ax.set_yticks(range(len(runs)), [run.run_name for run in runs])
    ax.invert_yaxis()  # first run at the top, as in the tables
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend(ax: Axes, entries: int) -> None:
    ax.legend(fontsize=9, ncols=1 if entries <= 8 else 2, loc="best")


def _footnote_left_out(fig: Figure, results: Results, shown: Sequence[RunRecord],
                       among: Sequence[RunRecord] | None = None) -> None:
    shown_names = {run.run_name for run in shown}
    left_out = [run for run in (results.runs if among is None else among) if run.run_name not in shown_names]
    if left_out:
        names = ", ".join(f"{run.run_name} ({'failed' if not run.ok else 'no data'})" for run in left_out)
        fig.supxlabel(f"Not shown: {names}", fontsize=8, color="0.4", x=0.01, ha="left")


def _method_colors(results: Results) -> dict[str, Any]:
    palette = [f"C{i}" for i in range(10)]
    methods = dict.fromkeys(run.method for run in results.runs)
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def _run_colors(results: Results) -> dict[str, Any]:
    """The method's colour, shaded from dark to light across that method's runs (sweeps stay one hue)."""
    method_colors = _method_colors(results)
    colors = {}
    for method, base in method_colors.items():
        names = [run.run_name for run in results.runs if run.method == method]
        rgb = to_rgb(base)
        for index, name in enumerate(names):
            shade = 0.0 if len(names) == 1 else -0.35 + 0.75 * index / (len(names) - 1)
            target = 1.0 if shade > 0 else 0.0
            colors[name] = tuple(c + (target - c) * abs(shade) for c in rgb)
    return colors


def _ema(values: Sequence[float], weight: float) -> list[float]:
    smoothed, current = [], None
    for value in values:
        current = value if current is None or not math.isfinite(current) else weight * current + (1 - weight) * value
        smoothed.append(current)
    return smoothed


def _label_points(ax: Axes, points: Sequence[tuple[float, float, str]]) -> None:
    """Label each point, stacking a label above any earlier one it would overprint (LoRA and DoRA often
    coincide). Works in axes fractions, which depend only on the limits, so call it after setting them."""
    to_axes = ax.transData + ax.transAxes.inverted()
    line_height = 11  # points, for 9 pt text
    fig_width_pt, axes_height_pt = WIDTH_IN * 72, ax.figure.get_figheight() * 72 * 0.8
    placed: list[tuple[float, float, float, float]] = []  # label boxes in axes fractions
    for x, y, label in sorted(points, key=lambda point: tuple(to_axes.transform(point[:2]))):
        fx, fy = to_axes.transform((x, y))
        width, height = len(label) * 5.5 / fig_width_pt, line_height / axes_height_pt
        lift = 0
        while any(fx < px + pw and px < fx + width and fy + lift * height < py + ph and py < fy + (lift + 1) * height
                  for px, py, pw, ph in placed):
            lift += 1
        placed.append((fx, fy + lift * height, width, height))
        leader = {"arrowstyle": "-", "color": "0.6", "linewidth": 0.6, "relpos": (0, 0), "shrinkB": 3} if lift else None
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4 + lift * line_height), fontsize=9,
                    arrowprops=leader)


def _pad_y(ax: Axes, values: Sequence[float]) -> None:
    low, high = min(values), max(values)
    margin = max((high - low) * 0.15, 0.01)
    ax.set_ylim(low - margin, high + margin * 1.5)


def _pad_log_x(ax: Axes, values: Sequence[float]) -> None:
    ax.set_xlim(min(values) / 2.5, max(values) * 4)  # room for the point labels on the right


def format_mb(mb: float) -> str:
    """Megabytes with precision that suits the magnitude: 2,880 / 45.3 / 6.25 / 0.38."""
    if mb >= 100:
        return f"{mb:,.0f}"
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.2g}" if mb < 1 else f"{mb:.2f}"


def format_count(count: float) -> str:
    """A parameter count in K/M/B: 774M, 1.18M, 294K."""
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= limit:
            return f"{count / limit:.3g}{suffix}"
    return f"{count:.3g}"


def _hashable(value: Any) -> Any:
    return str(value) if isinstance(value, (list, dict)) else value


def file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return path
