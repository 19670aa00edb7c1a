"""``peftlab study NAME``: a rule of thumb put to the test as a preset sweep that ends in verdicts.

    peftlab study alpha                     # lora_alpha = r vs 2r, two seeds each, on the default model
    peftlab study rank --model my-model --dataset my.csv --out runs/rank
    peftlab study all --out runs/studies    # every study, one report with every verdict first
    peftlab study forgetting --general-text my-corpus.txt   # a causal LM's perplexity before and after

A study is a comparison (the same runner, results.json and report as ``peftlab compare``) whose
grid is fixed by the study, always over several seeds so every verdict can be weighed against the
seed-to-seed spread (see :mod:`peftlab.lab.verdict`). The report opens with the verdicts, what the
runs show, and a plot of the effect with each seed's value; the verdicts are also printed and
written to ``verdicts.md``. The options a study sweeps are its own: giving one (``--r`` to the
rank study, ``--seed`` to any) is an error, not silently overridden.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from peftlab.io import atomic_write_text
from peftlab.lab import forgetting
from peftlab.lab.cli import EXIT_INTERRUPTED, SHARED_OPTIONS, plan_from_args
from peftlab.lab.results import Results
from peftlab.lab.sweep import PlannedRun, parse_sweep
from peftlab.lab.verdict import (
    ACCURACY,
    GENERAL_PERPLEXITY,
    METHOD_OPTION,
    PEAK_MEMORY,
    SEED_OPTION,
    Consistency,
    Effect,
    Interaction,
    Metric,
    Question,
    Verdict,
)
from peftlab.train.options import OptionsError, TrainOptions, add_train_arguments

ALL = "all"
VERDICTS_FILE = "verdicts.md"
#: Seeds a study runs unless it says otherwise: two, the fewest that give a spread.
TWO_SEEDS = (0, 1)
#: SGD's learning rate in the scheduler study. SGD needs a far larger step than AdamW, whose update is
#: normalised per parameter; at AdamW's 1e-3 SGD barely moves an adapter that starts at zero.
SGD_LR = 0.1
SMALL_RANK, LARGE_RANK = 8, 256


class StudyWork(Protocol):
    """A study's own work around the runner (forgetting: see :mod:`peftlab.lab.forgetting`)."""

    def check(self, options: TrainOptions, args: argparse.Namespace) -> None: ...  # before any run
    def measure(self, results: Results, args: argparse.Namespace) -> Results: ...  # after the runs, before verdicts
    def findings(self, results: Results) -> list[str]: ...  # sentences for the report


@dataclass(frozen=True)
class Study:
    """A rule of thumb as a preset grid and the questions its verdicts answer.

    ``grid`` is one or more arms, each a tuple of ``--sweep`` texts; every arm runs at every seed and
    the runs of all arms make the study. ``budget`` holds options the study starts from that the
    user's flags may change (the swept ones they may not).
    """

    name: str
    about: str  # what is compared, one line
    methods: str
    grid: tuple[tuple[str, ...], ...]
    questions: tuple[Question, ...]
    seeds: tuple[int, ...] = TWO_SEEDS
    metric: Metric = ACCURACY  # what its plot shows
    budget: dict[str, Any] = field(default_factory=dict)
    why_seeds: str = ""  # why this many seeds, when it is not the default two
    work: StudyWork | None = None

    def swept_options(self) -> list[str]:
        """The options the study sets itself: those of its grid, and the seed."""
        return list(dict.fromkeys([*(parse_sweep(text).option for arm in self.grid for text in arm), SEED_OPTION]))

    def seed_sweep(self) -> str:
        return f"{SEED_OPTION}={','.join(map(str, self.seeds))}"


def _memory_note() -> str:
    return ("Two seeds even for memory, which has no training noise: batches are padded to their longest "
            "sentence, so the data order a seed draws changes the activations' size (on a CPU by tens of MB), and "
            "the resident set also moves with the allocator. So memory is compared seed by seed: the two optimizers "
            "at one seed train on the same batches, and the spread to beat is that of the per-seed differences. "
            "Ten steps and 64 evaluation examples suffice: the optimizer's state is allocated at the first step, "
            "and accuracy is not what this study measures.")


STUDIES: dict[str, Study] = {study.name: study for study in (
    Study("alpha", "LoRA's scale: lora_alpha = 2r against lora_alpha = r", "lora", (("lora_alpha=r,2r",),),
          (Effect("alpha = 2r is more accurate than alpha = r", "lora_alpha", "r", "2r"),)),
    Study("rank", "LoRA's rank: r = 2, 8, 32", "lora", (("r=2,8,32",),),
          (Effect("a rank too small underfits: r = 8 is more accurate than r = 2", "r", 2, 8),
           Effect("a rank too large overfits: r = 32 is less accurate than r = 8", "r", 8, 32, expect="lower"))),
    Study("targets", "which layers LoRA adapts: the query and value projections (attn) against every linear "
          "layer of attention and MLP (all-linear)", "lora", (("target_modules=attn,all-linear",),),
          (Effect("adapting every linear layer is more accurate than adapting only the query and value projections",
                  "target_modules", "attn", "all-linear"),)),
    Study("scheduler", f"a cosine learning-rate schedule against a constant one, for SGD (lr {SGD_LR:g}) and "
          "for AdamW (the method's default lr)", "lora",
          ((f"optimizer=sgd", f"lr={SGD_LR:g}", "scheduler=constant,cosine"),
           ("optimizer=adamw", "scheduler=constant,cosine")),
          (Effect("a cosine schedule makes SGD more accurate than a constant learning rate", "scheduler", "constant",
                  "cosine", where={"optimizer": "sgd"}),
           Effect("a cosine schedule makes no difference to AdamW", "scheduler", "constant", "cosine", expect="same",
                  where={"optimizer": "adamw"}),
           Interaction("a cosine schedule helps SGD more than AdamW", "scheduler", "constant", "cosine", "optimizer",
                       "sgd", "adamw"))),
    Study("optimizer-memory", f"peak training memory of SGD (momentum: one state tensor per parameter) against "
          f"AdamW (two) at r = {SMALL_RANK} and r = {LARGE_RANK}", "lora",
          ((f"optimizer=adamw,sgd", f"r={SMALL_RANK},{LARGE_RANK}"),),
          (Effect(f"at a small rank (r = {SMALL_RANK}) SGD saves no memory over AdamW", "optimizer", "adamw", "sgd",
                  expect="same", metric=PEAK_MEMORY, where={"r": SMALL_RANK}, paired=True),
           Effect(f"at a large rank (r = {LARGE_RANK}) SGD needs less peak memory than AdamW", "optimizer", "adamw",
                  "sgd", expect="lower", metric=PEAK_MEMORY, where={"r": LARGE_RANK}, paired=True)),
          metric=PEAK_MEMORY, budget={"max_steps": 10, "max_eval_samples": 64}, why_seeds=_memory_note()),
    Study("epochs", "training for 1 epoch against 3 over the same data", "lora", (("epochs=1,3",),),
          (Effect("several epochs hurt through overfitting: 3 epochs are less accurate than 1", "epochs", 1, 3,
                  expect="lower"),)),
    Study("consistency", "the same LoRA run over five seeds: how far the seed alone moves the result", "lora", ((),),
          (Consistency("results are consistent across runs: the seed moves accuracy no more than the evaluation "
                       "set's sampling error"),),
          seeds=(0, 1, 2, 3, 4), why_seeds="Five seeds: the spread is the result, and two would barely estimate it."),
    Study("forgetting", "full fine-tuning against adapters on a causal LM: accuracy on the task (learning) and "
          "perplexity on held-out general text before and after (forgetting)", forgetting.METHODS, ((),),
          tuple(question for method in forgetting.ADAPTER_METHODS for question in (
              Effect(f"{method} learns less than full fine-tuning: its task accuracy is lower", METHOD_OPTION, "full",
                     method, expect="lower"),
              Effect(f"{method} forgets less than full fine-tuning: its perplexity on held-out general text rises "
                     "less", METHOD_OPTION, "full", method, expect="lower", metric=GENERAL_PERPLEXITY))),
          metric=GENERAL_PERPLEXITY, budget=forgetting.BUDGET, work=forgetting.FORGETTING),
)}


def study_named(name: str) -> Study:
    if name not in STUDIES:
        raise OptionsError(f"unknown study {name!r}; the studies are: {', '.join(STUDIES)} (or {ALL}).")
    return STUDIES[name]


def studies_named(name: str) -> list[Study]:
    return list(STUDIES.values()) if name == ALL else [study_named(name)]


def verdicts(study: Study, runs) -> list[Verdict]:
    return [question.judge(runs) for question in study.questions]


def check_flags(studies: Sequence[Study], args: argparse.Namespace) -> None:
    """Refuse a flag for an option a study sets itself: it would be silently overridden."""
    for study in studies:
        clash = [name for name in study.swept_options() if hasattr(args, name)]
        if clash:
            flag = "--" + clash[0].replace("_", "-")
            setters = [other.name for other in studies if clash[0] in other.swept_options()]
            raise OptionsError(f"{flag} is set by the stud{'ies' if len(setters) > 1 else 'y'} {', '.join(setters)} "
                               f"itself ({_sweeps_of(study, clash[0])}); drop {flag}.")


def _sweeps_of(study: Study, option: str) -> str:
    if option == SEED_OPTION:
        return f"study {study.name} runs {study.seed_sweep()}"
    texts = [text for arm in study.grid for text in arm if parse_sweep(text).option == option]
    return f"study {study.name} runs {' and '.join(texts)}"


def plan_study(study: Study, args: argparse.Namespace) -> tuple[list[PlannedRun], dict[str, Any]]:
    """The study's runs: each arm of its grid at every seed, on the shared options of ``args``."""
    check_flags([study], args)
    shared = {name: getattr(args, name) for name in SHARED_OPTIONS if hasattr(args, name)}
    base = {**study.budget, **shared, "methods": study.methods, "overrides": [], "config": None, "eval_datasets": []}
    runs: list[PlannedRun] = []
    config: dict[str, Any] = {}
    for arm in study.grid:
        arm_runs, config = plan_from_args(argparse.Namespace(**base, sweeps=[*arm, study.seed_sweep()]))
        runs += arm_runs
    if study.work:
        study.work.check(TrainOptions(**runs[0].options), args)
    grid = [" ".join([*arm, study.seed_sweep()]) for arm in study.grid]
    return runs, {**config, "sweep": grid, "study": study.name}


def plan_studies(studies: Sequence[Study], args: argparse.Namespace
                 ) -> tuple[list[tuple[Study, list[PlannedRun], dict[str, Any]]], list[tuple[Study, str]]]:
    """Each study's runs; of several, one that cannot apply to this model or data (its plan fails while
    another's does not: no attention layers known for ``targets``, a classifier for a study that needs a
    causal LM) is left out with its reason. When every plan fails, the first error is raised."""
    plans, left_out = [], []
    for study in studies:
        try:
            plans.append((study, *plan_study(study, args)))
        except OptionsError as error:
            if len(studies) == 1:
                raise
            left_out.append((study, str(error)))
    if not plans:
        raise OptionsError(f"no study applies: {left_out[0][0].name}: {left_out[0][1]}")
    return plans, left_out


class StudyCommand:
    help = "test fine-tuning rules of thumb on your model and data: preset sweeps over seeds that end in verdicts"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.description = __doc__.split("\n\n")[0]
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        width = max(map(len, STUDIES))
        parser.epilog = "studies:\n" + "\n".join(f"  {name:{width}}  {study.about}" for name, study in STUDIES.items()) + (
            f"\n  {ALL:{width}}  every study above, one report with every verdict first")
        parser.add_argument("study", metavar="NAME", help=f"the study: {', '.join(STUDIES)}, or {ALL}")
        parser.add_argument("--out", dest="compare_out", type=Path, metavar="DIR",
                            help="output folder (default: runs/study-NAME-DATE-TIME)")
        parser.add_argument("--resume", dest="study_resume", type=Path, metavar="DIR",
                            help="continue the study in DIR: runs that finished with the same options are kept "
                                 "(give the flags of the first start again)")
        parser.add_argument("--general-text", metavar="TEXT",
                            help="study forgetting: the held-out general text, shakespeare (default) or a .txt file")
        add_train_arguments(parser.add_argument_group("training options shared by every run (as in peftlab train)"),
                            only=SHARED_OPTIONS)

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.lab.measure import environment
        from peftlab.lab.runner import PLAN_FILE, RESULTS_FILE, check_resumable, publish, run_comparison
        from peftlab.lab.study_report import study_head, write_study_all_report

        studies = studies_named(args.study)
        check_flags(studies, args)
        if args.general_text and not any(study.work for study in studies):
            raise OptionsError(f"--general-text is the held-out text of study forgetting; study {args.study} has none.")
        plans, left_out = plan_studies(studies, args)  # every plan checked before any run
        for study, why in left_out:
            print(f"peftlab study: {study.name} left out: {why}", file=sys.stderr)
        if args.study_resume and args.compare_out and args.compare_out != args.study_resume:
            raise OptionsError("--resume DIR continues in DIR; drop --out, or give the same folder.")
        out = (args.study_resume or args.compare_out
               or Path("runs") / f"study-{args.study}-{datetime.now():%Y%m%d-%H%M%S}")
        folders = {study.name: out / study.name if len(studies) > 1 else out for study, _, _ in plans}
        # verdicts.md: a `study all` folder has no results.json of its own, and one study's report would replace its report
        if not args.study_resume and any((folder / name).exists() for folder in {out, *folders.values()}
                                         for name in (RESULTS_FILE, VERDICTS_FILE)):
            raise OptionsError(f"{out} already holds a study; continue it with --resume {out}, or choose another --out.")
        holds_one = (out / PLAN_FILE).exists()
        holds_several = any((out / name / PLAN_FILE).exists() for name in STUDIES)
        if args.study_resume and not (holds_one or holds_several):
            check_resumable(out)  # the error: nothing to resume there
        if args.study_resume and (holds_one if len(studies) > 1 else holds_several and not holds_one):
            raise OptionsError(f"{out} holds {'one study' if holds_one else 'several studies (study all)'}, not what "
                               f"study {args.study} writes there; resume it with the study it was started as.")
        resumed = bool(args.study_resume)
        total, done, began = sum(len(runs) for _, runs, _ in plans), 0, time.monotonic()
        weights = iter(run_weights([run for _, runs, _ in plans for run in runs]))
        work = [sum(next(weights) for _ in runs) for _, runs, _ in plans]  # each study's
        outcomes = []
        for index, (study, runs, config) in enumerate(plans, start=1):
            if len(studies) > 1:
                share_done = sum(work[:index - 1]) / sum(work)
                print(_progress(index, len(plans), study, runs, done, total, time.monotonic() - began, share_done),
                      flush=True)
            try:
                results = run_comparison(runs, config, folders[study.name], environment(),
                                         resuming=resumed, head=study_head(study))
            except KeyboardInterrupt:
                print(f"\npeftlab study: interrupted. What finished is in {out}; continue with: peftlab study "
                      f"{args.study} --resume {out} (and the same options)", file=sys.stderr)
                return EXIT_INTERRUPTED
            if study.work:
                results = study.work.measure(results, args)
                publish(results, folders[study.name], study_head(study))
            done += len(runs)
            study_verdicts = verdicts(study, results.runs)
            text = verdicts_markdown(study, study_verdicts)
            atomic_write_text(folders[study.name] / VERDICTS_FILE, text)
            print(text + f"\nreport: {folders[study.name] / 'report.html'}", flush=True)
            outcomes.append((study, results, study_verdicts))
        if len(studies) > 1:
            elapsed = time.monotonic() - began
            html_path = write_study_all_report(outcomes, out, folders, elapsed, left_out, resumed=resumed)
            atomic_write_text(out / VERDICTS_FILE, "\n".join(verdicts_markdown(s, v) for s, _, v in outcomes))
            print(f"\n{len(plans)} studies, {total} runs, in {elapsed / 60:.1f} min{' (this --resume)' if resumed else ''}; "
                  f"report: {html_path}")
        return 0 if all(run.ok for _, results, _ in outcomes for run in results.runs) else 1


def verdicts_markdown(study: Study, study_verdicts: Sequence[Verdict]) -> str:
    lines = "\n".join(f"- {verdict.text()}" for verdict in study_verdicts)
    return f"# Study {study.name}: {study.about}\n\n{lines}\n" + (f"\n{study.why_seeds}\n" if study.why_seeds else "")


def planned_examples(options: dict[str, Any]) -> int | None:
    """The training examples a run is planned to see: max_steps batches, else its epochs over
    max_train_samples; None when neither fixes it (the training set's own size)."""
    if options.get("max_steps"):
        return options["max_steps"] * options["batch_size"] * options["grad_accum"]
    if options.get("max_train_samples"):
        return options["epochs"] * options["max_train_samples"]
    return None


def run_weights(runs: Sequence[PlannedRun]) -> list[float]:
    """Each run's share of the work, for the time left: its planned training examples (3 epochs weigh
    three times 1, 10 steps next to nothing); every run alike when any run's examples are not known."""
    examples = [planned_examples(run.options) for run in runs]
    return [1.0] * len(runs) if None in examples else [float(count) for count in examples]


def _progress(index: int, count: int, study: Study, runs: list, done: int, total: int, elapsed: float,
              share_done: float) -> str:
    """The line before each study of several; ``share_done`` is the planned work finished (see :func:`run_weights`)."""
    left = f", about {elapsed / share_done * (1 - share_done) / 60:.0f} min left" if share_done else ""
    return (f"== study {index}/{count}: {study.name} ({len(runs)} runs; {done} of {total} runs done "
            f"in {elapsed / 60:.1f} min{left}) ==")


study = StudyCommand()
