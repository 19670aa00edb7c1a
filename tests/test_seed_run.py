"""Issue 15 item 3: the compare report puts the published seed run (GPT-2 Large on SST-2) beside the measured
figures only when the setup matches, and otherwise says which settings differ."""

from __future__ import annotations

import dataclasses

from peftlab.lab.report import write_report
from peftlab.lab.results import Results
from peftlab.lab.seed_run import PUBLISHED, SEED_ADAPTER_SETUP, SEED_SETUP, comparison_rows, setup_differences
from test_report import ok_record

SEED_OPTIONS = {"model": "gpt2-large", **SEED_SETUP, "max_eval_samples": None}


def seed_like_results(**changed) -> Results:
    runs = [ok_record("full", "full", 1600.0, 0.902, 774_030_080),
            ok_record("lora", "lora", 960.0, 0.897, 1_474_560),
            ok_record("qlora", "qlora", 1200.0, 0.861, 1_474_560, model_bytes=493_921_280)]
    for run in runs:
        adapter = {} if run.method == "full" else SEED_ADAPTER_SETUP
        run.options = {**SEED_OPTIONS, **adapter, **changed}
        run.eval_examples = 872
    return Results(runs=runs, config={"model": "gpt2-large"})


def test_a_matching_setup_is_shown_beside_the_published_figures(tmp_path) -> None:
    results = seed_like_results()
    assert setup_differences(results.runs) == []
    assert comparison_rows(results) == [
        ["full", "0.902 / 0.89", "100% / 100%", "2.88 / 2.88"],
        ["lora", "0.897 / 0.90", "60% / 63%", "2.88 / not published"],
        ["qlora", "0.861 / 0.86", "75% / not published", "0.46 / 0.46"],
    ]
    md = write_report(results, tmp_path)[0].read_text(encoding="utf-8")
    assert "## Against the published seed run\n\nSame setup as the published seed run" in md
    assert "| lora | 0.897 / 0.90 | 60% / 63% | 2.88 / not published |" in md


def test_a_different_setup_is_not_compared_and_the_report_says_why(tmp_path) -> None:
    results = seed_like_results(model="minilm-l6", max_train_samples=2000, lr=None)
    results.runs[1].options["r"] = 8
    assert comparison_rows(results) is None
    assert setup_differences(results.runs) == [
        "model minilm-l6 (published: gpt2-large)", "max_train_samples 2000 (published: 10000)",
        "lr the method's default (published: 5e-05)", "r 8 (published: 4)"]
    md = write_report(results, tmp_path)[0].read_text(encoding="utf-8")
    assert ("Not compared with the published seed run (GPT-2 Large on SST-2: full 0.89 in 1,613.6 s; lora 0.90 in "
            "63% of full's time;") in md
    assert "differs in model minilm-l6 (published: gpt2-large); max\\_train\\_samples 2000" in md
    assert "| lora | 0.897 / 0.90" not in md


def test_swept_runs_and_a_smaller_evaluation_set_are_not_the_published_setup() -> None:
    results = seed_like_results()
    swept = Results(runs=[dataclasses.replace(run, run_name=f"{run.method}[r=4]", sweep={"r": 4}) for run in results.runs])
    assert setup_differences([]) == [f"no successful unswept run of {', '.join(PUBLISHED)}"]
    assert comparison_rows(swept) is None
    results.runs[0].eval_examples = 200
    assert setup_differences(results.runs) == ["evaluated on 200 examples (published: all 872)"]
