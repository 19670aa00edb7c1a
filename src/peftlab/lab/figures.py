"""Every plot of a comparison's report, in report order: the plots of :mod:`peftlab.lab.plots` and the
Pareto plots of :mod:`peftlab.lab.pareto_plots` (which draws with the former's helpers), each with its
title and caption.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peftlab.lab.metric import metric_label
from peftlab.lab.pareto_plots import plot_pareto
from peftlab.lab.plots import (
    LOSS_SMOOTHING,
    Plot,
    file_safe,
    plot_accuracy_per_rank,
    plot_loss_curves,
    plot_model_size,
    plot_peak_memory,
    plot_rank_per_layer,
    plot_relative_time,
    plot_sweep,
    plot_val_accuracy,
    plot_val_curves,
)
from peftlab.lab.results import Results


def render_plots(results: Results, plots_dir: Path) -> list[Plot]:
    """Every plot that has data, in report order."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    baseline = results.time_baseline()
    baseline_name = "full fine-tuning" if baseline and baseline.is_full_fine_tuning else "the slowest run"
    label = metric_label(results.config)
    Label = label[0].upper() + label[1:]
    candidates: list[tuple[str, str, Callable[[Path], Path | None], str]] = [
        ("Relative training time", "relative_time.png", lambda p: plot_relative_time(results, p),
         f"Training wall-clock time as a percentage of {baseline_name}; lower is faster."),
        ("Training loss", "loss_curves.png", lambda p: plot_loss_curves(results, p, smoothing=LOSS_SMOOTHING),
         f"Training loss per logged step, EMA-smoothed (weight {LOSS_SMOOTHING}); raw values faint behind."),
        (f"Validation {label}", "val_accuracy.png", lambda p: plot_val_accuracy(results, p),
         f"Final validation {label} of each run."),
        (f"Validation {label} during training", "val_curves.png", lambda p: plot_val_curves(results, p),
         f"Validation {label} at each evaluation step."),
        ("Model size", "model_size.png", lambda p: plot_model_size(results, p),
         "Base model in memory vs the saved adapter on disk, MB on a log scale."),
        ("Peak memory", "peak_memory.png", lambda p: plot_peak_memory(results, p),
         "Peak memory while training, MB."),
        (f"{Label} vs trainable parameters", "accuracy_vs_params.png",
         lambda p: plot_pareto(results, "trainable_params", p),
         f"Validation {label} against the number of trained parameters (log scale); up and left is better. "
         f"Outlined points joined by the dashed line are the Pareto front: no other run has as high a {label} "
         "with fewer parameters."),
        (f"{Label} vs training time", "pareto_time.png", lambda p: plot_pareto(results, "train_time_s", p),
         f"Validation {label} against training wall-clock time; outlined points are the Pareto front."),
        (f"{Label} vs peak memory", "pareto_memory.png", lambda p: plot_pareto(results, "peak_memory_mb", p),
         f"Validation {label} against peak training memory; outlined points are the Pareto front."),
    ]
    candidates += [
        ("Accuracy per rank", "accuracy_per_rank.png", lambda p: plot_accuracy_per_rank(results, p),
         "Validation accuracy of one trained adapter evaluated at each rank it can run at (DyLoRA)."),
        ("Rank per layer", "rank_per_layer.png", lambda p: plot_rank_per_layer(results, p),
         "Live rank of each adapted layer after training: where AdaLoRA and dora_rank put their rank budget."),
    ]
    for variable in results.sweep_variables:
        candidates.append(
            (f"Sweep over {variable}", f"sweep_{file_safe(variable)}.png",
             lambda p, v=variable: plot_sweep(results, v, p),
             f"Validation {label} and training time for each value of {variable}, one line per method.")
        )
    plots = []
    for title, file_name, draw, caption in candidates:
        path = draw(plots_dir / file_name)
        if path is not None:
            plots.append(Plot(title=title, path=path, caption=caption))
    return plots
