"""Pareto plots: validation accuracy against one cost, the front of that pair marked and joined.

Front points are drawn large with a black edge and joined by a step line (the best accuracy reachable
at each cost); dominated runs are drawn small and faint, so the runs worth choosing stand out.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.ticker import FuncFormatter

from peftlab.lab.metric import metric_label
from peftlab.lab.pareto import COSTS, pareto_front, run_points
from peftlab.lab.plots import (
    _figure,
    _footnote_left_out,
    _label_points,
    _method_colors,
    _pad_log_x,
    _pad_y,
    _save,
    format_count,
)
from peftlab.lab.results import Results

#: Costs that span orders of magnitude across methods get a log axis.
LOG_SCALE_COSTS = ("trainable_params",)


def plot_pareto(results: Results, cost: str, path: Path) -> Path | None:
    """Accuracy vs ``cost`` (a key of COSTS) for every run that has both; None when there is none."""
    label = COSTS[cost]
    by_name = {run.run_name: run for run in results.runs}
    points = run_points(results.runs, [cost])
    if not points:
        return None
    front = pareto_front(points)
    on_front = {point.name for point in front}
    colors = _method_colors(results)
    fig = _figure(height=5.2)
    ax = fig.subplots()
    for point in points:
        marked = point.name in on_front
        ax.scatter(point.costs[0], point.accuracy, s=90 if marked else 40, zorder=3 if marked else 2,
                   color=colors[by_name[point.name].method], alpha=1.0 if marked else 0.45,
                   edgecolor="black" if marked else "white", linewidth=1.2 if marked else 0.5)
    steps = sorted(front, key=lambda point: (point.costs[0], -point.accuracy))
    ax.step([point.costs[0] for point in steps], [point.accuracy for point in steps], where="post",
            color="0.25", linewidth=1.2, linestyle="--", zorder=1, label="Pareto front")
    for method in dict.fromkeys(by_name[point.name].method for point in points):
        ax.scatter([], [], s=60, color=colors[method], label=method)
    xs = [point.costs[0] for point in points]
    if cost in LOG_SCALE_COSTS and min(xs) > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda count, _: format_count(count)))
        _pad_log_x(ax, xs)
        label += " (log scale)"
    else:
        span = max(xs) - min(xs) or max(xs) or 1.0
        ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.35 * span)  # room for the point labels on the right
    _pad_y(ax, [point.accuracy for point in points])
    _label_points(ax, [(point.costs[0], point.accuracy, point.name) for point in points])
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(label)
    metric = metric_label(results.config)
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{metric[0].upper() + metric[1:]} vs {COSTS[cost]}: Pareto front marked ({len(front)} of {len(points)} runs)")
    ax.legend(fontsize=9, loc="best", ncols=1 if len(colors) <= 8 else 2)
    _footnote_left_out(fig, results, [by_name[point.name] for point in points])
    return _save(fig, path)
