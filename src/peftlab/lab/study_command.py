"""The ``peftlab study`` command: plans each study's runs on the shared options, runs them as one
comparison (resumable), judges the claims and writes the report. The studies themselves -- their grids,
claims and budgets -- are declared in :mod:`peftlab.lab.study`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from peftlab.io import atomic_write_text
from peftlab.lab.cli import EXIT_INTERRUPTED, SHARED_OPTIONS, plan_from_args
from peftlab.lab.study import ALL, STUDIES, VERDICTS_FILE, Study, arm_sweeps, studies_named, verdicts
from peftlab.lab.sweep import PlannedRun, parse_sweep
from peftlab.lab.verdict import SEED_OPTION, Verdict
from peftlab.train.options import OptionsError, TrainOptions, add_train_arguments


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
    texts = [text for arm in study.grid for text in arm_sweeps(arm) if parse_sweep(text).option == option]
    return f"study {study.name} runs {' and '.join(texts)}"


def plan_study(study: Study, args: argparse.Namespace) -> tuple[list[PlannedRun], dict[str, Any]]:
    """The study's runs: each arm of its grid at every seed, on the shared options of ``args``."""
    check_flags([study], args)
    shared = {name: getattr(args, name) for name in SHARED_OPTIONS if hasattr(args, name)}
    base = {**study.budget, **shared, "overrides": [], "config": None, "eval_datasets": []}
    runs: list[PlannedRun] = []
    config: dict[str, Any] = {}
    for arm in study.grid:
        arm_runs, config = plan_from_args(argparse.Namespace(**base, methods=study.arm_methods(arm),
                                                             sweeps=[*arm_sweeps(arm), study.seed_sweep()]))
        runs += arm_runs
    if study.work:
        study.work.check(TrainOptions(**runs[0].options), args)
    grid = [" ".join([*arm, study.seed_sweep()]) for arm in study.grid]
    methods = list(dict.fromkeys(run.method for run in runs))  # every arm's, not only the last one's
    return runs, {**config, "methods": methods, "sweep": grid, "study": study.name}


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
    return f"# Study {study.name}: {study.about}\n\n{lines}\n" + (f"\n{study.note}\n" if study.note else "")


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
