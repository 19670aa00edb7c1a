"""The verdicts of a study: does a rule of thumb hold on these runs, by more than seed-to-seed noise?

A study's runs fall into *cells*, one per setting (``lora_alpha=2r``), each run with several seeds.
A question compares cells on one metric (validation accuracy, or peak memory):

    Effect        treatment vs control. The effect is the difference of the cells' means; the
                  noise it must beat is the seed-to-seed spread, the larger of the two cells'
                  max-minus-min across seeds -- and for accuracy at least the evaluation set's
                  sampling error sqrt(p (1 - p) / n) (p the cells' mean accuracy, n examples): two or
                  three seeds often land close together by luck (0.3 points apart, where the choice of
                  872 evaluation examples alone moves accuracy by 1.4), and a difference smaller than
                  what the evaluation examples decide says nothing about the task.
                  Claiming the treatment is "higher" or "lower":
                      holds                   |effect| > noise, in the claimed direction
                      contradicted            |effect| > noise, against it
                      no effect beyond noise  |effect| <= noise: these runs cannot tell them apart
                  Claiming the "same" (SGD saves no memory at r = 8): holds when |effect| <= noise,
                  contradicted beyond it.
                  Paired (peak memory): compared seed by seed, the effect is the mean of the per-seed
                  differences and the spread their max minus min, so what a seed does to both
                  cells alike (the batches' padded lengths) cancels.
    Interaction   the same effect in two contexts (cosine vs constant with SGD, and with AdamW),
                  claimed larger in the first. Each effect carries its own spread, so their
                  difference must beat the sum of the two spreads (each at least the sampling error,
                  for accuracy); the three outcomes as above.
    GapNarrowing  does a treatment narrow a control's gap to a reference cell (LoftQ: QLoRA's to LoRA)?
                  Judged as the Effect of treatment over control, claimed higher (the gap shrinks by
                  exactly that), with both gaps to the reference stated; not judged without the reference.
    Consistency   one cell over several seeds: the spread is the result. "Results are consistent
                  across runs" holds when the seed-to-seed standard deviation is at most the
                  evaluation set's own sampling error, sqrt(p (1 - p) / n) for accuracy p on n
                  examples (the seed then moves accuracy less than the choice of evaluation
                  examples does), and is contradicted above it.

A question is "not judged" when a cell has no successful run, fewer than two seeds (no spread to
beat), a value that is not finite (a perplexity that overflowed: a mean or a spread of it says
nothing), or two runs at one seed (the setting does not pin every swept option); its text says which.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import fmean, stdev
from typing import Any, Callable, Literal, Protocol

from peftlab.lab.results import RunRecord

Outcome = Literal["holds", "contradicted", "no effect beyond noise", "not judged"]
Expect = Literal["higher", "lower", "same"]
OUTCOMES: tuple[Outcome, ...] = ("holds", "contradicted", "no effect beyond noise", "not judged")
#: A study's runs are told apart by seed through this sweep option.
SEED_OPTION = "seed"
#: A setting may name the method, as if it were swept: ``method=full`` against ``method=lora``.
METHOD_OPTION = "method"
#: Rounding must not turn "equal to the spread" into "beyond it".
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Metric:
    """A number of a run record, and how a verdict writes its values and differences."""

    key: str  # the RunRecord attribute
    name: str
    unit: str  # of a difference: "points", "MB"
    scale: float  # a difference in ``unit`` is scale x the difference of the raw values
    value_style: str
    digits: int  # of a difference
    axis: str = ""  # the label of a plot axis, when not the name
    #: A metric computed from the record (from its loss curve, say) rather than read from its ``key`` attribute.
    compute: Callable[[RunRecord], float | None] | None = None

    def of(self, run: RunRecord) -> float | None:
        return self.compute(run) if self.compute else getattr(run, self.key)

    def value(self, raw: float) -> str:
        return self.value_style.format(raw)

    def amount(self, difference: float, signed: bool = False) -> str:
        """A difference already in ``unit``: "+5.0 points", "43 MB"."""
        return f"{difference:{'+' if signed else ''},.{self.digits}f} {self.unit}"


ACCURACY = Metric("val_accuracy", "validation accuracy", "points", 100.0, "{:.3f}", 1, "validation accuracy")
PEAK_MEMORY = Metric("peak_memory_mb", "peak memory", "MB", 1.0, "{:,.0f} MB", 0, "peak memory while training (MB)")
GENERAL_PERPLEXITY = Metric("general_perplexity", "perplexity on held-out general text", "perplexity", 1.0, "{:.3f}",
                            3, "perplexity on held-out general text after training")


#: The share of a run's steps whose training loss :data:`EARLY_LOSS` averages.
EARLY_SHARE = 0.1


def early_loss(run: RunRecord) -> float | None:
    """The mean training loss over the first 10% of the run's optimizer steps: the steps 1 .. ceil(0.1 x
    steps) of its loss curve (each step's own loss, the mean over its batch), so at least the first step.
    A mean over those steps, not the loss at one step, so that one batch's difficulty weighs little.
    None when the run recorded no loss curve."""
    curve = run.train_loss_curve
    if not curve:
        return None
    steps = run.steps or curve[-1]["step"]
    last = max(1, math.ceil(EARLY_SHARE * steps - TOLERANCE))
    return fmean(point["loss"] for point in curve if point["step"] <= last)


EARLY_LOSS = Metric("early_train_loss", "training loss over the first 10% of steps", "loss", 1.0, "{:.4f}", 4,
                    "mean training loss, first 10% of steps", compute=early_loss)


@dataclass(frozen=True)
class Cell:
    """The runs of one setting: its label (``lora_alpha=2r``) and the metric's value per seed."""

    label: str
    values: tuple[float, ...]
    seeds: tuple[Any, ...] = ()  # the seed of each value, where known

    @property
    def mean(self) -> float:
        return fmean(self.values)

    def spread(self, metric: Metric) -> float | None:
        """Max minus min across seeds, in the metric's unit; None with fewer than two seeds."""
        return None if len(self.values) < 2 else metric.scale * (max(self.values) - min(self.values))

    def finite(self) -> Cell:
        """The cell without its values that are not finite (inf, nan)."""
        kept = [index for index, value in enumerate(self.values) if math.isfinite(value)]
        return Cell(self.label, tuple(self.values[i] for i in kept),
                    tuple(self.seeds[i] for i in kept) if self.seeds else ())


@dataclass(frozen=True)
class Verdict:
    claim: str
    measured: str  # what the runs show: the effect's size and the spread it had to beat
    outcome: Outcome
    effect: float | None = None  # in the metric's unit
    spread: float | None = None  # the threshold the effect had to beat, same unit
    note: str = ""  # said after the outcome, e.g. "(no effect beyond noise)" for a claim of no effect

    def text(self) -> str:
        return f"Claim: {self.claim}. Measured: {self.measured}. Verdict: {self.outcome}{self.note}."


def not_judged(claim: str, why: str) -> Verdict:
    return Verdict(claim, why, "not judged")


def judge(claim: str, control: Cell, treatment: Cell, expect: Expect = "higher", metric: Metric = ACCURACY,
          paired: bool = False, eval_examples: int | None = None) -> Verdict:
    """The verdict on ``claim``: that ``treatment``'s metric is ``expect`` (higher, lower, the same) than
    ``control``'s. ``paired``: compared seed by seed (see :func:`judge_paired`). ``eval_examples``: the
    evaluation set's size, whose sampling error is the least noise an accuracy effect must beat."""
    missing = _missing(control, treatment)
    if missing:
        return not_judged(claim, missing)
    if paired:
        return judge_paired(claim, control, treatment, expect, metric)
    effect = metric.scale * (treatment.mean - control.mean)
    measured = (f"{treatment.label} {metric.value(treatment.mean)} vs {control.label} {metric.value(control.mean)}, "
                f"an effect of {metric.amount(effect, signed=True)} ({_seeds(control, treatment)})")
    spreads = [control.spread(metric), treatment.spread(metric)]
    if None in spreads:
        return Verdict(claim, measured + "; one seed gives no seed-to-seed spread, run at least two", "not judged", effect)
    spread = max(spreads)
    measured += f"; seed-to-seed spread {metric.amount(spread)}"
    noise, said = _at_least_sampling_error(spread, metric, (control, treatment), eval_examples)
    return _weigh(claim, measured + said, effect, noise, expect)


def judge_paired(claim: str, control: Cell, treatment: Cell, expect: Expect, metric: Metric) -> Verdict:
    """Seed by seed: the effect is the mean of the per-seed differences, the spread to beat their max
    minus min. For a metric a seed moves the same way in both cells (peak memory: a seed's data order
    sets the batches' padded lengths for both optimizers), the seed's own effect cancels."""
    by_seed = dict(zip(control.seeds, control.values))
    pairs = [(value, by_seed[seed]) for seed, value in zip(treatment.seeds, treatment.values) if seed in by_seed]
    if not pairs:
        return not_judged(claim, f"{control.label} and {treatment.label} share no seed to compare on")
    differences = [mine - theirs for mine, theirs in pairs]
    effect = metric.scale * fmean(differences)
    # the means of the shared seeds, so the effect is their difference (a seed run in one cell only is left out)
    means = [fmean(pair[side] for pair in pairs) for side in (0, 1)]
    measured = (f"{treatment.label} {metric.value(means[0])} vs {control.label} {metric.value(means[1])}, "
                f"an effect of {metric.amount(effect, signed=True)} (mean of the differences at {len(differences)} "
                f"seed{'s' if len(differences) > 1 else ''}, each seed's runs sharing its batches)")
    if len(differences) < 2:
        return Verdict(claim, measured + "; one seed gives no seed-to-seed spread, run at least two", "not judged", effect)
    spread = metric.scale * (max(differences) - min(differences))
    measured += f"; seed-to-seed spread of the differences {metric.amount(spread)}"
    return _weigh(claim, measured, effect, spread, expect)


def judge_interaction(claim: str, first: tuple[Cell, Cell], second: tuple[Cell, Cell], treatment: str,
                      contexts: tuple[str, str], metric: Metric = ACCURACY,
                      eval_examples: int | None = None) -> Verdict:
    """The verdict on ``claim``: that the effect of ``treatment`` (each pair is control, treatment) is
    larger in the first context than in the second."""
    missing = _missing(*first, *second)
    if missing:
        return not_judged(claim, missing)
    effects = [metric.scale * (pair[1].mean - pair[0].mean) for pair in (first, second)]
    difference = effects[0] - effects[1]
    measured = (f"{treatment}'s effect is {metric.amount(effects[0], signed=True)} with {contexts[0]} and "
                f"{metric.amount(effects[1], signed=True)} with {contexts[1]}, a difference of "
                f"{metric.amount(difference, signed=True)} ({_seeds(*first, *second)})")
    spreads = [cell.spread(metric) for cell in (*first, *second)]
    if None in spreads:
        return Verdict(claim, measured + "; one seed gives no seed-to-seed spread, run at least two", "not judged",
                       difference)
    noises = [_at_least_sampling_error(max(spreads[:2]), metric, first, eval_examples)[0],
              _at_least_sampling_error(max(spreads[2:]), metric, second, eval_examples)[0]]
    spread = max(spreads[:2]) + max(spreads[2:])
    measured += f"; the two effects' seed-to-seed spreads add up to {metric.amount(spread)}"
    if sum(noises) > spread + TOLERANCE:
        measured += (f", each raised to at least the evaluation set's sampling error: {metric.amount(sum(noises))} "
                     f"({eval_examples:,} examples)")
    return _weigh(claim, measured, difference, sum(noises), "higher")


def judge_consistency(claim: str, cell: Cell, eval_examples: int | None) -> Verdict:
    """The verdict on ``claim``: that one setting's accuracy varies across seeds by no more than the
    sampling error of its ``eval_examples`` evaluation examples."""
    missing = _missing(cell)
    if missing:
        return not_judged(claim, missing)
    seeds = len(cell.values)
    if seeds < 2:
        return not_judged(claim, f"{cell.label} has one successful seed; the spread needs at least two")
    deviation = 100 * stdev(cell.values)
    measured = (f"{cell.label} over {seeds} seeds: mean {cell.mean:.3f}, from {min(cell.values):.3f} to "
                f"{max(cell.values):.3f} (range {100 * (max(cell.values) - min(cell.values)):.1f} points), "
                f"standard deviation {deviation:.2f} points")
    if not eval_examples:
        return Verdict(claim, measured + "; the number of evaluation examples is not recorded, so there is no "
                       "sampling error to weigh it against", "not judged", deviation)
    sampling = 100 * sampling_error(cell.mean, eval_examples)
    measured += f", against the evaluation set's sampling error of {sampling:.2f} points ({eval_examples:,} examples)"
    return Verdict(claim, measured, "holds" if deviation <= sampling + TOLERANCE else "contradicted", deviation, sampling)


def sampling_error(accuracy: float, examples: int) -> float:
    """The standard error of an accuracy measured on ``examples`` evaluation examples, sqrt(p (1 - p) / n):
    how far the choice of those examples alone moves it (a fraction, like the accuracy)."""
    return math.sqrt(accuracy * (1 - accuracy) / examples)


def _at_least_sampling_error(spread: float, metric: Metric, cells: Sequence[Cell],
                             eval_examples: int | None) -> tuple[float, str]:
    """The noise an accuracy effect must beat: the seed spread, or the evaluation set's sampling error at
    the cells' mean accuracy when that is larger (then also the words that say so)."""
    if metric.key != ACCURACY.key or not eval_examples:
        return spread, ""
    sampling = metric.scale * sampling_error(fmean(cell.mean for cell in cells), eval_examples)
    if sampling <= spread:
        return spread, ""
    return sampling, (f", below the evaluation set's sampling error of {metric.amount(sampling)} "
                      f"({eval_examples:,} examples), the noise the effect had to beat")


def _weigh(claim: str, measured: str, effect: float, spread: float, expect: Expect) -> Verdict:
    within = abs(effect) <= spread + TOLERANCE
    if expect == "same":
        return Verdict(claim, measured, "holds" if within else "contradicted", effect, spread,
                       " (no effect beyond noise)" if within else "")
    if within:
        return Verdict(claim, measured, "no effect beyond noise", effect, spread)
    return Verdict(claim, measured, "holds" if (effect > 0) == (expect == "higher") else "contradicted", effect, spread)


def _missing(*cells: Cell) -> str:
    """Why ``cells`` cannot be weighed (see the module's docstring), or "" when they can."""
    empty = [cell.label for cell in cells if not cell.values]
    if empty:
        return f"no successful runs for {', '.join(dict.fromkeys(empty))}, so nothing to compare"
    for cell in cells:
        infinite = [(seed, value) for seed, value in zip(cell.seeds or [None] * len(cell.values), cell.values)
                    if not math.isfinite(value)]
        if infinite:
            where = ", ".join(f"{value}" + ("" if seed is None else f" at seed {seed}") for seed, value in infinite)
            return (f"{cell.label} has a value that is not finite ({where}: a run that diverged), so its mean and "
                    "spread say nothing")
        known = [seed for seed in cell.seeds if seed is not None]
        if len(set(known)) < len(known):
            return (f"{cell.label} holds several runs at one seed ({', '.join(map(str, known))}): the setting "
                    "leaves a swept option free, so its runs are not one setting over seeds")
    return ""


def _seeds(*cells: Cell) -> str:
    """How many seeds each mean is over: "mean of 2 seeds", or "means of 2 and 3 seeds" when they differ."""
    counts = sorted(set(len(cell.values) for cell in cells))
    if len(counts) == 1:
        return f"mean of {counts[0]} seed{'s' if counts[0] > 1 else ''}"
    return f"means of {', '.join(map(str, counts[:-1]))} and {counts[-1]} seeds"


# -- cells from a study's records ---------------------------------------------------------------------


def setting_label(setting: dict[str, Any]) -> str:
    return ",".join(f"{option}={value}" for option, value in setting.items())


def value_of(run: RunRecord, option: str) -> Any:
    """The run's value of a swept option; ``method`` is every run's, swept or not."""
    return run.sweep.get(option, run.method if option == METHOD_OPTION else None)


def matches(run: RunRecord, setting: dict[str, Any]) -> bool:
    return all(value_of(run, option) == value for option, value in setting.items())


def cell_of(runs: Sequence[RunRecord], setting: dict[str, Any], metric: Metric = ACCURACY) -> Cell:
    """The successful runs that match every option of ``setting``, one metric value each."""
    matching = [run for run in runs if run.ok and metric.of(run) is not None and matches(run, setting)]
    if matching:  # the label in the runs' own order of options, as in their names
        order = [METHOD_OPTION, *matching[0].sweep]
        setting = {option: setting[option] for option in order if option in setting}
    label = setting_label(setting) or ", ".join(dict.fromkeys(run.method for run in matching)) or "the runs"
    return Cell(label, tuple(metric.of(run) for run in matching), tuple(run.sweep.get(SEED_OPTION) for run in matching))


def settings(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Every distinct sweep of ``runs`` without its seed, in run order, led by the method when the runs
    have several: the cells of a study."""
    several_methods = len({run.method for run in runs}) > 1
    seen: dict[str, dict[str, Any]] = {}
    for run in runs:
        setting = {**({METHOD_OPTION: run.method} if several_methods else {}),
                   **{option: value for option, value in run.sweep.items() if option != SEED_OPTION}}
        seen.setdefault(setting_label(setting), setting)
    return list(seen.values())


def eval_examples(runs: Sequence[RunRecord]) -> int | None:
    """How many examples the runs were evaluated on, when recorded and the same for all of them."""
    counts = {run.eval_examples for run in runs if run.ok}
    return counts.pop() if len(counts) == 1 else None


# -- the questions a study asks of its records ---------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    """Is ``option=treatment`` ``expect`` (higher, lower, the same) than ``option=control``, the other
    options of both cells fixed at ``where``?"""

    claim: str
    option: str
    control: Any
    treatment: Any
    expect: Expect = "higher"
    metric: Metric = ACCURACY
    where: dict[str, Any] = field(default_factory=dict)
    paired: bool = False  # compared seed by seed

    def judge(self, runs: Sequence[RunRecord]) -> Verdict:
        control, treatment = (cell_of(runs, {**self.where, self.option: value}, self.metric)
                              for value in (self.control, self.treatment))
        return judge(self.claim, control, treatment, self.expect, self.metric, self.paired, eval_examples(runs))


@dataclass(frozen=True)
class Interaction:
    """Is the effect of ``option=treatment`` over ``option=control`` larger with ``context=first``
    than with ``context=second``?"""

    claim: str
    option: str
    control: Any
    treatment: Any
    context: str
    first: Any
    second: Any
    metric: Metric = ACCURACY

    def judge(self, runs: Sequence[RunRecord]) -> Verdict:
        pairs = [tuple(cell_of(runs, {self.context: context, self.option: value}, self.metric)
                       for value in (self.control, self.treatment)) for context in (self.first, self.second)]
        return judge_interaction(self.claim, pairs[0], pairs[1], f"{self.option}={self.treatment}",
                                 (f"{self.context}={self.first}", f"{self.context}={self.second}"), self.metric,
                                 eval_examples(runs))


@dataclass(frozen=True)
class GapNarrowing:
    """Does ``option=treatment`` narrow the gap of ``option=control`` (both at ``where``) to the ``reference``
    setting? Judged as the effect of the treatment over the control (claimed higher: the gap below the
    reference shrinks by exactly that effect), with both gaps to the reference said beside it."""

    claim: str
    option: str
    control: Any
    treatment: Any
    where: dict[str, Any]
    reference: dict[str, Any]
    metric: Metric = ACCURACY

    def judge(self, runs: Sequence[RunRecord]) -> Verdict:
        control, treatment = (cell_of(runs, {**self.where, self.option: value}, self.metric)
                              for value in (self.control, self.treatment))
        reference = cell_of(runs, self.reference, self.metric)
        missing = _missing(reference)
        if missing:
            return not_judged(self.claim, missing)
        verdict = judge(self.claim, control, treatment, "higher", self.metric, eval_examples=eval_examples(runs))
        if verdict.outcome == "not judged":
            return verdict
        gaps = [self.metric.scale * (reference.mean - cell.mean) for cell in (control, treatment)]
        said = (f"gap to {reference.label} ({self.metric.value(reference.mean)}): {self.metric.amount(gaps[0], signed=True)} "
                f"for {control.label}, {self.metric.amount(gaps[1], signed=True)} for {treatment.label}; ")
        return dataclasses.replace(verdict, measured=said + verdict.measured)


@dataclass(frozen=True)
class Consistency:
    """Does the study's one setting vary across seeds by no more than its evaluation set's sampling error?"""

    claim: str

    def judge(self, runs: Sequence[RunRecord]) -> Verdict:
        cells = settings(runs)
        if len(cells) != 1:
            return not_judged(self.claim, f"expected one setting over several seeds, found {len(cells)}")
        return judge_consistency(self.claim, cell_of(runs, cells[0]), eval_examples(runs))


class Question(Protocol):
    """What a study asks of its records: a claim, and the verdict on it."""

    claim: str

    def judge(self, runs: Sequence[RunRecord]) -> Verdict: ...
