"""The training engine: options, loop, method hooks, checkpoints, data parallelism, evaluation.

    from peftlab.train import TrainOptions, run_training
    metrics = run_training(TrainOptions(method="dora", out="runs/dora"))   # a RunMetrics: metrics.json's content
    metrics.eval["eval_accuracy"], metrics.train_time_s, metrics.peak_memory_mb

HF ``Trainer`` users get the same method hooks from :mod:`peftlab.train.callback`.
"""

from peftlab.train.hooks import TrainingHook, TrainingProgress
from peftlab.train.loop import TrainingDiverged, run_training
from peftlab.train.options import OptionsError, TrainOptions
from peftlab.train.run_metrics import RunMetrics

__all__ = ["OptionsError", "RunMetrics", "TrainOptions", "TrainingDiverged", "TrainingHook", "TrainingProgress", "run_training"]
