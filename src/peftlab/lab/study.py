"""``peftlab study NAME``: a rule of thumb put to the test as a preset sweep that ends in verdicts.

    peftlab study alpha                     # lora_alpha = r vs 2r, two seeds each, on the default model
    peftlab study rank --model my-model --dataset my.csv --out runs/rank

A study is a comparison (the same runner, results.json and report as ``peftlab compare``) whose
grid is fixed by the study, always with at least two seeds so every verdict can be weighed against
the seed-to-seed spread (see :mod:`peftlab.lab.verdict`). The verdicts are printed and written to
``verdicts.md`` beside the report.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from peftlab.io import atomic_write_text
from peftlab.lab.cli import SHARED_OPTIONS, plan_from_args
from peftlab.lab.verdict import Verdict, judge_records
from peftlab.train.options import OptionsError, add_train_arguments

#: Seeds every study runs: two, the fewest that give a spread.
STUDY_SEEDS = "seed=0,1"


@dataclass(frozen=True)
class Question:
    """One verdict of a study: does ``treatment`` beat (or, ``treatment_better=False``, lose to) ``control``?"""

    claim: str
    option: str
    control: object
    treatment: object
    treatment_better: bool = True


@dataclass(frozen=True)
class Study:
    name: str
    about: str
    methods: str
    sweeps: tuple[str, ...]
    questions: tuple[Question, ...]


STUDIES: dict[str, Study] = {study.name: study for study in (
    Study("alpha", "LoRA's scale: lora_alpha = 2r against lora_alpha = r", "lora", ("lora_alpha=r,2r", STUDY_SEEDS),
          (Question("alpha = 2r is more accurate than alpha = r", "lora_alpha", "r", "2r"),)),
    Study("rank", "LoRA's rank: r = 2, 8, 32", "lora", ("r=2,8,32", STUDY_SEEDS),
          (Question("a rank too small underfits: r = 8 is more accurate than r = 2", "r", 2, 8),
           Question("a rank too large overfits: r = 32 is less accurate than r = 8", "r", 8, 32,
                    treatment_better=False))),
)}


def study_named(name: str) -> Study:
    if name not in STUDIES:
        raise OptionsError(f"unknown study {name!r}; the studies are: {', '.join(STUDIES)}.")
    return STUDIES[name]


def verdicts(study: Study, runs) -> list[Verdict]:
    return [judge_records(runs, q.claim, q.option, q.control, q.treatment, q.treatment_better)
            for q in study.questions]


class StudyCommand:
    help = "test a fine-tuning rule of thumb on your model and data: a preset sweep over seeds that ends in verdicts"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.description = __doc__.split("\n\n")[0]
        parser.add_argument("study", metavar="NAME", help=f"the study: {', '.join(STUDIES)}")
        parser.add_argument("--out", dest="compare_out", type=Path, metavar="DIR",
                            help="output folder (default: runs/study-NAME-DATE-TIME)")
        add_train_arguments(parser.add_argument_group("training options shared by every run (as in peftlab train)"),
                            only=SHARED_OPTIONS)

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.lab.measure import environment
        from peftlab.lab.runner import run_comparison

        study = study_named(args.study)
        out = args.compare_out or Path("runs") / f"study-{study.name}-{datetime.now():%Y%m%d-%H%M%S}"
        plan_args = argparse.Namespace(**vars(args), methods=study.methods, overrides=[], sweeps=list(study.sweeps),
                                       config=None, eval_datasets=[])
        runs, config = plan_from_args(plan_args)
        results = run_comparison(runs, {**config, "study": study.name}, out, environment())
        try:
            lines = [verdict.text() for verdict in verdicts(study, results.runs)]
        except ValueError as error:
            raise OptionsError(f"study {study.name}: {error}; see {out / 'report.html'} for what failed.") from None
        text = f"# Study {study.name}: {study.about}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
        atomic_write_text(out / "verdicts.md", text)
        print(text + f"\nreport: {out / 'report.html'} (verdicts in {out / 'verdicts.md'})")
        return 0 if all(run.ok for run in results.runs) else 1


study = StudyCommand()
