"""The sentences a comparison report opens with: what its numbers show, each computed from the records.

    lora reached 98% of full fine-tuning's accuracy (0.882 vs 0.900) with 1.5% of its trainable
    parameters, in 70% of its training time and with 45% of its peak memory.

Which sentences appear depends on the records: the most accurate run; for each run on the Pareto front
of accuracy against trainable parameters, its accuracy, parameters, time and memory as a share of the
reference (full fine-tuning, else the most accurate run); the fastest and the leanest run; runs that
another run beats on accuracy, parameters, time and memory at once; failed runs. First of all, runs whose
accuracy is not clearly above chance (always answering the most frequent label) are named and left out of
the other sentences: "dora_rank used the least memory" says nothing when dora_rank learned nothing. A number a run lacks
leaves its clause out (a run without all three costs is in no dominance claim); nothing is said
without the numbers behind it. "Accuracy" is the comparison's metric, named by its label
(:mod:`peftlab.lab.metric`: exact match for a causal LM's answers); with generation metrics the untrained base
model's score opens the findings, and each run's change from it.
"""

from __future__ import annotations

from collections.abc import Sequence

from peftlab.lab.metric import metric_label
from peftlab.lab.pareto import COSTS, dominates, front_names, run_points
from peftlab.lab.results import Results, RunRecord
from peftlab.lab.verdict import sampling_error
from peftlab.train.options import FULL_FINE_TUNING

#: Dominated runs named in the sentence; the rest are counted.
DOMINATED_LISTED = 6
#: A run is "at chance" when its accuracy is within this many standard errors (one-sided, of the majority
#: share on the evaluation set's size) of always answering the most frequent label.
CHANCE_STANDARD_ERRORS = 2.0


def findings(results: Results) -> list[str]:
    """The report's opening sentences, most telling first; [] when no run has a validation accuracy."""
    runs = [run for run in results.ok_runs if run.val_accuracy is not None]
    if not runs:
        return []
    label = metric_label(results.config)
    sentences = _base_model_sentences(runs, results.config.get("base_scores"), label)
    sentences += _chance_sentences([run for run in runs if at_chance(run)])
    runs = [run for run in runs if not at_chance(run)]
    if not runs:
        return sentences + _failed_sentences(results)
    reference = _full_run(runs)
    best = max(runs, key=lambda run: run.val_accuracy)  # the first of equals: run order breaks ties
    sentences.append(_best_sentence(runs, best, reference, label))
    anchor = reference or best
    if reference is None:
        anchor_name = f"the most accurate run ({best.run_name})"
    else:  # a swept full run is one of several: say which
        anchor_name = "full fine-tuning" + ("" if reference.run_name == FULL_FINE_TUNING else f" ({reference.run_name})")
    for name in front_names(runs, ["trainable_params"]):
        run = _named(runs, name)
        if run is not anchor:
            sentences.append(_share_sentence(run, anchor, anchor_name, label))
    sentences += _extreme_sentence(runs, "train_time_s", "trained fastest", "{:,.1f} s", anchor, anchor_name, label)
    sentences += _extreme_sentence(runs, "peak_memory_mb", "used the least peak memory", "{:,.0f} MB", anchor,
                                   anchor_name, label)
    sentences += _dominated_sentences(runs, label)
    return sentences + _failed_sentences(results)


def _base_model_sentences(runs: Sequence[RunRecord], base: dict | None, label: str) -> list[str]:
    """How far training moved each run from the untrained base model (generation metrics: config["base_scores"])."""
    if not base or base.get("exact_match") is None:
        return []
    gains = ", ".join(f"{run.run_name} {100 * (run.val_accuracy - base['exact_match']):+.1f}" for run in runs)
    return [f"The base model, untrained, scored {base['exact_match']:.3f} {label} (contains the answer: "
            f"{base['contains_answer']:.3f}) on the same {base.get('examples', '?')} held-out questions; "
            f"each run's change in points: {gains}."]


def chance_margin(run: RunRecord) -> float | None:
    """How far above the majority share an accuracy must be to count as learned; None when not recorded."""
    if run.majority_accuracy is None or not run.eval_examples:
        return None
    return CHANCE_STANDARD_ERRORS * sampling_error(run.majority_accuracy, run.eval_examples)


def at_chance(run: RunRecord) -> bool:
    margin = chance_margin(run)
    return margin is not None and run.val_accuracy is not None and run.val_accuracy <= run.majority_accuracy + margin


def _chance_sentences(runs: Sequence[RunRecord]) -> list[str]:
    if not runs:
        return []
    names = ", ".join(run.run_name for run in runs[:-1]) + (" and " if len(runs) > 1 else "") + runs[-1].run_name
    accuracies = sorted(run.val_accuracy for run in runs)
    accuracy = (f"{accuracies[0]:.3f}" if accuracies[0] == accuracies[-1]
                else f"{accuracies[0]:.3f}-{accuracies[-1]:.3f}")
    majority = sorted({run.majority_accuracy for run in runs})
    margin = max(chance_margin(run) for run in runs)
    plural = len(runs) > 1
    return [f"{names} did not learn the task measurably: {'their' if plural else 'its'} accuracy ({accuracy}) is "
            f"within {CHANCE_STANDARD_ERRORS:g} standard errors (+{margin:.3f} on {runs[0].eval_examples:,} examples) of "
            f"always answering the most frequent label ({', '.join(f'{m:.3f}' for m in majority)}), so "
            f"{'they are' if plural else 'it is'} left out of the sentences below; a higher learning rate "
            "(--set METHOD.lr=...) or a longer run may change that."]


def _failed_sentences(results: Results) -> list[str]:
    failed = [run.run_name for run in results.runs if not run.ok]
    if not failed:
        return []
    return [f"{len(failed)} run{'s' if len(failed) > 1 else ''} failed and {'are' if len(failed) > 1 else 'is'} "
            f"in no comparison above: {', '.join(failed)}."]


def share(value: float, of: float) -> str:
    """``value`` as a percentage of ``of``, with the precision its size needs: 98%, 7.5%, 0.19%."""
    percent = 100 * value / of
    if percent >= 10:
        return f"{percent:.0f}%"
    return f"{percent:.1f}%" if percent >= 1 else f"{percent:.2g}%"


def _full_run(runs: Sequence[RunRecord]) -> RunRecord | None:
    full = [run for run in runs if run.is_full_fine_tuning]
    return next((run for run in full if run.run_name == FULL_FINE_TUNING), full[0] if full else None)


def _named(runs: Sequence[RunRecord], name: str) -> RunRecord:
    return next(run for run in runs if run.run_name == name)


def _tied_with(runs: Sequence[RunRecord], chosen: RunRecord, key: str) -> str:
    """", tied with X and Y" when other runs have ``chosen``'s value of ``key``: the first of equals is no winner."""
    others = [run.run_name for run in runs if run is not chosen and getattr(run, key) == getattr(chosen, key)]
    return f", tied with {', '.join(others)}" if others else ""


def _best_sentence(runs: Sequence[RunRecord], best: RunRecord, reference: RunRecord | None, label: str) -> str:
    sentence = (f"{best.run_name} reached the highest validation {label}, {best.val_accuracy:.3f}"
                f"{_tied_with(runs, best, 'val_accuracy')}")
    if reference is not None and reference is not best:
        points = 100 * (best.val_accuracy - reference.val_accuracy)
        name = "full fine-tuning" if reference.run_name == FULL_FINE_TUNING else reference.run_name
        sentence += f", {points:+.1f} points over {name} ({reference.val_accuracy:.3f})"
    return sentence + "."


def _share_sentence(run: RunRecord, anchor: RunRecord, anchor_name: str, label: str) -> str:
    accuracy = (f"{share(run.val_accuracy, anchor.val_accuracy)} of {anchor_name}'s {label} "
                f"({run.val_accuracy:.3f} vs {anchor.val_accuracy:.3f})" if anchor.val_accuracy
                else f"a {label} of {run.val_accuracy:.3f}")
    clauses = []
    for key, words in (("trainable_params", "with {} of its trainable parameters"),
                       ("train_time_s", "in {} of its training time"),
                       ("peak_memory_mb", "with {} of its peak memory")):
        mine, theirs = getattr(run, key), getattr(anchor, key)
        if mine is not None and theirs:
            clauses.append(words.format(share(mine, theirs)))
    return f"{run.run_name} reached {accuracy}" + (" " + ", ".join(clauses) if clauses else "") + "."


def _extreme_sentence(runs: Sequence[RunRecord], key: str, verb: str, style: str, anchor: RunRecord,
                      anchor_name: str, label: str) -> list[str]:
    measured = [run for run in runs if getattr(run, key) is not None]
    if len(measured) < 2:
        return []
    lowest = min(measured, key=lambda run: getattr(run, key))
    value, anchor_value = getattr(lowest, key), getattr(anchor, key)
    relative = f", {share(value, anchor_value)} of {anchor_name}'s" if lowest is not anchor and anchor_value else ""
    return [f"{lowest.run_name} {verb} ({style.format(value)}{relative}{_tied_with(measured, lowest, key)}), "
            f"at {label} {lowest.val_accuracy:.3f}."]


def _dominated_sentences(runs: Sequence[RunRecord], label: str) -> list[str]:
    """One sentence naming the runs another run beats on every count at once, each with its most accurate
    dominator: on these numbers there is no reason to pick them."""
    points = run_points(runs, list(COSTS))
    named = []
    for point in points:
        winners = [other for other in points if dominates(other, point)]
        if winners:
            named.append(f"{point.name} (by {max(winners, key=lambda other: other.accuracy).name})")
    if not named:
        return []
    listed = ", ".join(named[:DOMINATED_LISTED]) + (f" and {len(named) - DOMINATED_LISTED} more"
                                                    if len(named) > DOMINATED_LISTED else "")
    as_good = "as accurate" if label == "accuracy" else f"as high in {label}"
    return [f"{len(named)} of {len(points)} runs are dominated -- another run is at least {as_good} with no "
            f"more trainable parameters, training time or peak memory, and better on one of them: {listed}."]
