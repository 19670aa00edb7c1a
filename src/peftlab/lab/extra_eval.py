"""Out-of-domain evaluation in the lab: every run of a comparison scored on extra labelled datasets.

    peftlab compare --eval-dataset reviews.csv --eval-dataset rt_snippets

Each ``--eval-dataset`` is a labelled file or folder (all of a single file is used; a folder's
validation split) or a named dataset. Its labels must be among the classes the runs are trained on:
the comparison checks that before any run, as `peftlab eval` does against a trained classifier, so a
file labelled with other classes stops it at once instead of scoring every run against the wrong
classes. ``--max-eval-samples`` applies to these sets too. Each run's record keeps the accuracy per
set (``eval_datasets``), keyed by the set as given on the command line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from peftlab.train.options import OptionsError, TrainOptions


def check_eval_datasets(options: TrainOptions, names: Sequence[str]) -> None:
    """Raise OptionsError when a set cannot be read, or has labels the training data does not know."""
    from peftlab.data.datasets import DataError
    from peftlab.train.build import load_datasets

    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise OptionsError(f"--eval-dataset {repeated[0]} is given twice; give each set once.")
    train, _ = load_datasets(options)
    for name in names:
        try:
            load_eval_set(options, name, getattr(train, "num_labels", None), getattr(train, "label_names", None))
        except (DataError, FileNotFoundError, ValueError) as error:
            raise OptionsError(f"--eval-dataset {name}: {error}") from None


def load_eval_set(options: TrainOptions, name: str, num_labels: int | None, label_names: tuple[str, ...] | None):
    """The set ``name``, its labels mapped to the training classes (an unknown label is an error)."""
    from peftlab.train.build import load_eval_dataset

    return load_eval_dataset(dataclasses.replace(options, dataset=name), num_labels, label_names, held_out=False)


def evaluate_eval_datasets(options: TrainOptions, names: Sequence[str], num_labels: int | None,
                           label_names: tuple[str, ...] | None, accuracy_key: str) -> dict[str, float]:
    """The trained run in ``options.out`` scored on each set: {set as given: accuracy}."""
    from peftlab.train.build import load_run, make_collator
    from peftlab.train.distributed import start_processes
    from peftlab.train.evaluate import evaluate, shard_batches

    if not names:
        return {}
    processes = start_processes(options.device)
    try:
        model, tokenizer = load_run(options, num_labels)
        model.to(processes.device)
        scores = {}
        for name in names:
            data = load_eval_set(options, name, num_labels, label_names)
            batches = shard_batches(data, make_collator(options, tokenizer), processes, options.eval_batch_size)
            scores[name] = evaluate(model, batches, options.task, processes, options.bf16)[accuracy_key]
        return scores
    finally:
        processes.close()
