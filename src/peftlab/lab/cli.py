"""The ``peftlab compare`` and ``peftlab report`` subcommands.

    peftlab compare                                   # full, lora, dora, qlora on minilm-l6 + SST-2
    peftlab compare --methods lora,dora --sweep r=2,4,8,16 --sweep lora_alpha=r,2r
    peftlab compare --methods all --set full.lr=3e-5 --set lora.lr=1e-3 --out runs/cmp
    peftlab compare --resume runs/cmp                 # rerun what failed or did not finish
    peftlab compare --model smollm2-135m --task causal-lm   # full, lora, dora, qlora on number-words: exact match
    peftlab report runs/cmp                           # rewrite report.md / report.html from results.json

The training flags are those of `peftlab train`, shared by every run, but --method, --out and
--resume, which mean the comparison's own things here. Without flags, a compare runs a budget
that fits in 15 minutes on 2 CPU cores (the default budget below); --model smollm2-135m gives
the decoder-LM version. The seed experiment (GPT-2 Large on SST-2), on a GPU with hub access:

    peftlab compare --model gpt2-large --dataset sst2 --max-train-samples 10000 --max-length 32 \\
        --batch-size 32 --epochs 5 --lr 5e-5 --r 4 --lora-alpha 4 --target-modules c_attn \\
        --max-eval-samples 872 --methods full,lora,dora,qlora --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

from peftlab.lab.extra_eval import check_eval_datasets
from peftlab.lab.metric import EXACT_MATCH, metric_for
from peftlab.lab.results import load_results
from peftlab.methods import METHODS
from peftlab.methods.method import adapter_dropout_option
from peftlab.lab.sweep import (
    DEFAULT_METHODS,
    PER_RUN_OPTIONS,
    PlannedRun,
    collect_overrides,
    expand_methods,
    methods_for_model,
    option_names,
    parse_sweep,
    plan_runs,
    sweepable_options,
)
from peftlab.train.options import OptionsError, TrainOptions, add_train_arguments, read_config_file

#: The default budget, under the config file and the flags: 63 steps of batch 32 per run, evaluated
#: on all 872 SST-2 validation sentences. The four default runs on minilm-l6 took 2 min 56 s on 2
#: CPU cores with nothing else running (models cached).
COMPARE_DEFAULTS: dict[str, Any] = {"max_train_samples": 2000, "max_length": 64, "epochs": 1}
#: The default budget with --task causal-lm: the built-in instruction set (number-words, chat rows), 30 steps
#: of 8 questions, ranked by exact match on 50 held-out ones (a LoRA at this budget: 0.80 on 30, the base
#: 0.00). See the README's "Generation" section for its timing.
LLM_COMPARE_DEFAULTS: dict[str, Any] = {"dataset": "number-words", "max_train_samples": 240, "max_steps": 30,
                                        "batch_size": 8, "max_length": 64, "max_eval_samples": 50}
#: Every compared method's adapter dropout (lora_dropout, vera_dropout, mora_dropout), unless flags, the config
#: file or --set say otherwise: none, as the seed experiment's hand-written LoRA and DoRA (whose times the
#: report quotes); `peftlab train` keeps the LoRA family's 0.05.
COMPARE_ADAPTER_DROPOUT = 0.0
SHARED_OPTIONS = tuple(name for name in option_names() if name not in PER_RUN_OPTIONS)
EXIT_RUN_FAILED, EXIT_INTERRUPTED = 1, 130


def default_out_dir() -> Path:
    return Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"


class CompareCommand:
    help = "fine-tune with several methods on the same model, data and seed; report accuracy, time, memory, size"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.description = ("Fine-tune several methods on the same model, data and seed, each run in its own "
                              "process; write results.json, results.csv, report.md and report.html.")
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = (
            "examples:\n" + textwrap.dedent(__doc__[__doc__.index("    peftlab compare"):])
            + f"\nsweepable options: {', '.join(sweepable_options())}"
            + f"\ndefault budget: {' '.join(_as_flags(COMPARE_DEFAULTS))}; with --task causal-lm: "
            + f"{' '.join(_as_flags(LLM_COMPARE_DEFAULTS))} (ranked by exact match of the greedy answers); adapters: "
            + f"no dropout (--lora-dropout {COMPARE_ADAPTER_DROPOUT:g} and its twins)"
        )
        plan = parser.add_argument_group("the comparison")
        plan.add_argument("--methods", metavar="NAME,NAME",
                          help=f"methods to compare: full, qlora, any registered method, or all "
                               f"(default: {','.join(DEFAULT_METHODS)})")
        plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                          help="an option for one method only, e.g. --set lora.lr=1e-3 (repeatable)")
        plan.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="OPTION=V1,V2",
                          help="run every value; several --sweep give their grid. lora_alpha takes r, 2r; "
                               "target_modules takes attn, all-linear, or names joined by +")
        plan.add_argument("--out", dest="compare_out", type=Path, metavar="DIR",
                          help="output folder (default: runs/compare-DATE-TIME)")
        plan.add_argument("--resume", dest="compare_resume", type=Path, metavar="DIR",
                          help="continue the comparison in DIR: skip runs that finished, rerun failed and missing "
                               "ones (with no other flags, as first planned)")
        plan.add_argument("--eval-dataset", dest="eval_datasets", action="append", default=[], metavar="FILE",
                          help="after training, also score every run on this labelled file, folder or named dataset "
                               "(out-of-domain accuracy; repeatable); its labels must be among the trained classes")
        plan.add_argument("--config", metavar="FILE.yaml",
                          help="shared training options from a YAML file (its method, out and resume are ignored)")
        add_train_arguments(parser.add_argument_group("training options shared by every run (as in peftlab train)"),
                            only=SHARED_OPTIONS)

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.lab.measure import environment
        from peftlab.lab.report import format_table
        from peftlab.lab.runner import check_before_runs, check_resumable, load_plan, run_comparison

        out = args.compare_resume or args.compare_out or default_out_dir()
        if args.compare_resume and args.compare_out and args.compare_out != args.compare_resume:
            raise OptionsError("--resume DIR continues in DIR; drop --out, or give the same folder.")
        if args.compare_resume:
            check_resumable(out)
        if args.compare_resume and not _plan_flags_given(args):
            runs, config = load_plan(out)
        else:
            runs, config = plan_from_args(args)
        check_before_runs(runs, out, bool(args.compare_resume))  # before the base model's answers
        config = with_base_scores(runs, config)
        try:
            results = run_comparison(runs, config, out, environment(), resuming=bool(args.compare_resume))
        except KeyboardInterrupt:
            print(f"\npeftlab compare: interrupted. What finished is in {out} (results.json, report.html); "
                  f"continue with: peftlab compare --resume {out}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(format_table(results))
        print(f"\nreport: {out / 'report.html'} (also report.md, results.json, results.csv)")
        return 0 if all(run.ok for run in results.runs) else EXIT_RUN_FAILED


def _as_flags(options: dict[str, Any]) -> list[str]:
    return [f"--{name.replace('_', '-')} {value}" for name, value in options.items()]


def _plan_flags_given(args: argparse.Namespace) -> bool:
    return bool(args.methods is not None or args.overrides or args.sweeps or args.config
                or args.eval_datasets or any(hasattr(args, name) for name in SHARED_OPTIONS))


def plan_from_args(args: argparse.Namespace) -> tuple[list[PlannedRun], dict[str, Any]]:
    """The planned runs and the config shared by all of them, from the compare flags."""
    from_file = read_config_file(args.config) if args.config else {}
    given = {name: getattr(args, name) for name in SHARED_OPTIONS if hasattr(args, name)}
    chosen = {**{k: v for k, v in from_file.items() if k not in PER_RUN_OPTIONS}, **given}
    if "task" not in chosen and "dataset" in chosen:  # as `peftlab train`: the data's format says which
        from peftlab.data.datasets import task_of_dataset

        chosen["task"] = task_of_dataset(chosen["dataset"], chosen.get("data_dir"))
    defaults = LLM_COMPARE_DEFAULTS if chosen.get("task") == "causal-lm" else COMPARE_DEFAULTS
    values = {**defaults, **chosen}
    shared = {k: v for k, v in TrainOptions(**values).to_dict().items() if k not in PER_RUN_OPTIONS}
    methods = expand_methods(args.methods) if args.methods is not None else list(DEFAULT_METHODS)
    left_out: dict[str, str] = {}
    if args.methods is not None and args.methods.strip() == "all":
        methods, left_out = methods_for_model(methods, shared["model"])
        for name, reason in left_out.items():
            print(f"peftlab compare: --methods all leaves out {name}: {reason}", file=sys.stderr)
    overrides = collect_overrides(args.overrides, methods)
    for method in methods:
        dropout = adapter_dropout_option(METHODS.get(method))  # full fine-tuning has none
        if dropout is not None and shared.get(dropout) is None:
            overrides.setdefault(method, {}).setdefault(dropout, COMPARE_ADAPTER_DROPOUT)
    axes = [parse_sweep(text) for text in args.sweeps]
    runs = plan_runs(shared, methods, overrides, axes)
    if args.eval_datasets:
        check_eval_datasets(TrainOptions(**runs[0].options), args.eval_datasets)
        runs = [dataclasses.replace(run, eval_datasets=tuple(args.eval_datasets)) for run in runs]
    config = {**shared, "methods": methods, "set": args.overrides or None, "sweep": args.sweeps or None,
              "eval_datasets": args.eval_datasets or None, "methods_left_out": left_out or None,
              "metric": metric_for(TrainOptions(**runs[0].options))}
    return runs, config


def with_base_scores(runs: list[PlannedRun], config: dict[str, Any]) -> dict[str, Any]:
    """The config with the untrained base model's exact match and contains-answer on the held-out
    questions (``base_scores``), when the comparison ranks by what the models answer; measured once."""
    from peftlab.lab.runner import answer_held_out
    from peftlab.train.build import load_datasets

    if config.get("metric") != EXACT_MATCH or config.get("base_scores"):
        return config
    options = TrainOptions(**runs[0].options)
    print(f"peftlab compare: the base model {options.model} answers the held-out questions", file=sys.stderr)
    _, eval_data = load_datasets(options)
    scores = answer_held_out(options, eval_data, None, trained=False)
    return {**config, "base_scores": {**scores, "examples": len(eval_data)}}


class ReportCommand:
    help = "rewrite a comparison's report (report.md, report.html, plots) from its results.json"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("results", type=Path, metavar="DIR_OR_FILE",
                            help="a folder written by peftlab compare, or its results.json")
        parser.add_argument("--out", dest="report_out", type=Path, metavar="DIR",
                            help="where to write the report (default: beside results.json)")

    def run(self, args: argparse.Namespace) -> int:
        from peftlab.lab.report import format_table, write_report
        from peftlab.lab.study_report import head_for

        path = args.results / "results.json" if args.results.is_dir() else args.results
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass a folder written by peftlab compare, or its results.json.")
        results = load_results(path)
        md_path, html_path = write_report(results, args.report_out or path.parent, head_for(results))
        print(format_table(results))
        print(f"\nreport: {html_path} (also {md_path.name})")
        return 0


compare = CompareCommand()
report = ReportCommand()
