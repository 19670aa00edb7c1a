"""Out-of-domain evaluation in the lab: every run of a comparison scored on extra labelled datasets.

    peftlab compare --eval-dataset reviews.csv --eval-dataset rt_snippets

Each ``--eval-dataset`` is a labelled file or folder (all of a single file is used; a folder's
validation split) or a named dataset. Its labels must be among the classes the runs are trained on:
the comparison checks that before any run, as `peftlab eval` does against a trained classifier, so a
file labelled with other classes stops it at once instead of scoring every run against the wrong
classes. ``--max-eval-samples`` applies to these sets too. Each run's record keeps the accuracy per
set (``eval_datasets``), keyed by the set as given on the command line.

A comparison scored by exact match (causal LM on instruction rows, see :mod:`.metric`) scores these
sets the same way, by what the run answers (greedy, as its validation split), so the extra column
and the in-domain one are the same measure; a set without questions and answers (plain text) is
refused before any run.
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
    from peftlab.train.generation_eval import held_out_questions

    train, _ = load_datasets(options)
    for name in names:
        try:
            data = load_eval_set(options, name, getattr(train, "num_labels", None), getattr(train, "label_names", None))
            if _by_exact_match(options):
                held_out_questions(data, name)
        except (DataError, FileNotFoundError, ValueError) as error:
            raise OptionsError(f"--eval-dataset {name}: {error}") from None


def load_eval_set(options: TrainOptions, name: str, num_labels: int | None, label_names: tuple[str, ...] | None):
    """The set ``name``, its labels mapped to the training classes (an unknown label is an error)."""
    from peftlab.train.build import load_eval_dataset

    return load_eval_dataset(dataclasses.replace(options, dataset=name), num_labels, label_names, held_out=False)


def _by_exact_match(options: TrainOptions) -> bool:
    from peftlab.lab.metric import EXACT_MATCH, metric_for

    return metric_for(options) is EXACT_MATCH


def evaluate_eval_datasets(options: TrainOptions, names: Sequence[str], num_labels: int | None,
                           label_names: tuple[str, ...] | None, accuracy_key: str) -> dict[str, float]:
    """The trained run in ``options.out`` scored on each set: {set as given: accuracy}, or exact match
    in a comparison scored by it (``accuracy_key`` is then not used)."""
    from peftlab.train.build import load_run, make_collator
    from peftlab.train.distributed import start_processes
    from peftlab.train.evaluate import evaluate, shard_batches
    from peftlab.train.generation import Sampling
    from peftlab.train.generation_eval import DEFAULT_EVAL_NEW_TOKENS, held_out_questions, score_answers

    if not names:
        return {}
    processes = start_processes(options.device)
    try:
        model, tokenizer = load_run(options, num_labels)
        model.to(processes.device)
        scores = {}
        for name in names:
            data = load_eval_set(options, name, num_labels, label_names)
            if _by_exact_match(options):  # greedy answers, as the run's validation split is scored
                answered, _ = score_answers(model, tokenizer, held_out_questions(data, name),
                                            Sampling(DEFAULT_EVAL_NEW_TOKENS), options.eval_batch_size, with_base=False)
                scores[name] = answered["exact_match"]
                continue
            batches = shard_batches(data, make_collator(options, tokenizer), processes, options.eval_batch_size)
            scores[name] = evaluate(model, batches, options.task, processes, options.bf16)[accuracy_key]
        return scores
    finally:
        processes.close()
