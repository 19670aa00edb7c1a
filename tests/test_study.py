"""Issue 15 items 2-3: `peftlab study NAME` and `peftlab study all` -- each study's grid, the verdicts and
findings from the records, the flags a study refuses, and the one report of every study. The child
process is replaced by records with given numbers (no training)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
from transformers import AlbertConfig, BertConfig

from peftlab.lab import runner
from peftlab.lab.results import RunRecord, load_results
from peftlab.lab.study import LARGE_RANK, SGD_LR, SMALL_RANK, STUDIES
from peftlab.lab.study_command import _progress, plan_study, planned_examples, run_weights
from test_compare import run_cli

#: The numbers a stand-in run reports, from its sweep: each study's claim made to hold, fail or tie.
ACCURACY_BY_SETTING = {
    ("lora_alpha", "r"): 0.80, ("lora_alpha", "2r"): 0.86,
    ("r", 2): 0.845, ("r", 8): 0.85, ("r", 32): 0.80,
    ("target_modules", "attn"): 0.84, ("target_modules", "all-linear"): 0.845,
    ("epochs", 1): 0.85, ("epochs", 3): 0.88,
}
SEED_NOISE = {0: 0.0, 1: 0.01, 2: 0.004, 3: 0.006, 4: 0.002}  # a spread of 1 point between seeds 0 and 1
#: Evaluation examples of the stand-in runs: SST-2's 872 for the consistency study (its verdict weighs the
#: seeds against their sampling error), else enough that the sampling error (~0.1 points) stays below that
#: seed spread, so those verdicts weigh the seed spread (the sampling-error bar is tested in test_verdict.py).
SST2_EVAL_SET, LARGE_EVAL_SET = 872, 100_000


def stand_in_record(run) -> RunRecord:
    sweep = run.sweep
    accuracy = next((value for (option, setting), value in ACCURACY_BY_SETTING.items()
                     if sweep.get(option) == setting), 0.85)
    if "scheduler" in sweep:  # cosine: +6 points for SGD, +0.5 for AdamW
        accuracy = {"sgd": 0.78, "adamw": 0.85}[sweep["optimizer"]] + (
            {"sgd": 0.06, "adamw": 0.005}[sweep["optimizer"]] if sweep["scheduler"] == "cosine" else 0)
    memory = 900.0 + 40 * sweep["seed"]  # a seed's batches move memory by 40 MB, for both optimizers alike
    if sweep.get("optimizer") == "adamw" and "r" in sweep:  # AdamW's second state: ~0 MB at r=8, ~40 MB at r=256
        memory += (0 if sweep["r"] == SMALL_RANK else 40) + (1 if sweep["seed"] == 0 else -1)
    epochs = sweep.get("epochs", 1)
    return RunRecord(method=run.method, run_name=run.run_name, status="ok", sweep=sweep, options=run.options,
                     val_accuracy=accuracy + SEED_NOISE[sweep["seed"]], peak_memory_mb=memory, eval_examples=SST2_EVAL_SET if set(sweep) == {"seed"} else LARGE_EVAL_SET,
                     train_time_s=30.0 * epochs, trainable_params=1000 * (sweep.get("r") or 8),
                     train_accuracy=[{"epoch": epoch, "accuracy": 0.8 + 0.05 * epoch} for epoch in range(1, epochs + 1)])


@pytest.fixture
def launched(monkeypatch) -> list:
    runs = []

    def launch(run, folder, log):
        runs.append(run)
        folder.mkdir(parents=True, exist_ok=True)  # what the child leaves: its run folder
        return stand_in_record(run)

    monkeypatch.setattr(runner, "launch", launch)
    return runs


@pytest.fixture
def quick_reports(monkeypatch) -> None:
    """Results after each run without redrawing the whole comparison report: the study's own parts are checked."""
    monkeypatch.setattr(runner, "publish", lambda results, out, head=None: runner.save_results(out / "results.json", results))


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory) -> str:
    """A model folder with only a config: enough to plan the targets study (attn resolves per model family)."""
    folder = tmp_path_factory.mktemp("bert")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    return str(folder)


def verdict_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("- Claim")]


def test_alpha_study_grid_verdict_report_and_plot(tmp_path, launched, quick_reports) -> None:
    code, stdout, stderr = run_cli("study", "alpha", "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    assert run_cli("report", str(tmp_path / "out"))[0] == 0  # the study's report, as `peftlab report` rewrites it
    assert [run.run_name for run in launched] == [
        "lora[lora_alpha=r,seed=0]", "lora[lora_alpha=r,seed=1]", "lora[lora_alpha=2r,seed=0]", "lora[lora_alpha=2r,seed=1]"]
    assert [run.options["lora_alpha"] for run in launched] == [8, 8, 16, 16]  # lora's default r is 8
    assert [run.options["seed"] for run in launched] == [0, 1, 0, 1]
    verdict = "+6.0 points (mean of 2 seeds); seed-to-seed spread 1.0 points. Verdict: holds."
    assert verdict in stdout and verdict in (tmp_path / "out" / "verdicts.md").read_text(encoding="utf-8")
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# peftlab study alpha")
    assert report.index("## Verdicts") < report.index("## What the runs show") < report.index("## Findings")
    assert "Validation accuracy ranged from 0.805 (lora\\_alpha=r) to 0.865 (lora\\_alpha=2r), 6.0 points apart" in report
    assert "(plots/study.png)" in report and (tmp_path / "out" / "plots" / "study.png").stat().st_size > 10_000
    assert "<title>peftlab study alpha</title>" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_rank_study_gives_no_effect_and_a_confirmed_overfit(tmp_path, launched, quick_reports) -> None:
    code, stdout, _ = run_cli("study", "rank", "--out", str(tmp_path / "out"))
    assert code == 0
    assert sorted({run.options["r"] for run in launched}) == [2, 8, 32] and len(launched) == 6
    lines = verdict_lines(stdout)
    assert lines[0].endswith("Verdict: no effect beyond noise.")  # +0.5 points, spread 1.0
    assert lines[1].endswith("Verdict: holds.")  # r=32 is 5 points less accurate


def test_targets_study_adapts_query_value_against_every_linear_layer(tmp_path, launched, quick_reports,
                                                                     bert_model) -> None:
    code, stdout, _ = run_cli("study", "targets", "--model", bert_model, "--out", str(tmp_path / "out"))
    assert code == 0
    assert [run.options["target_modules"] for run in launched] == [["query", "value"]] * 2 + ["all-linear"] * 2
    assert verdict_lines(stdout) == [
        "- Claim: adapting every linear layer is more accurate than adapting only the query and value projections. "
        "Measured: target_modules=all-linear 0.850 vs target_modules=attn 0.845, an effect of +0.5 points "
        "(mean of 2 seeds); seed-to-seed spread 1.0 points. Verdict: no effect beyond noise."]


def test_scheduler_study_runs_each_optimizer_with_its_own_lr_and_weighs_the_interaction(tmp_path, launched,
                                                                                      quick_reports) -> None:
    code, stdout, _ = run_cli("study", "scheduler", "--out", str(tmp_path / "out"))
    assert code == 0
    grid = [(run.options["optimizer"], run.options["lr"], run.options["scheduler"], run.options["seed"])
            for run in launched]
    assert grid == [("sgd", SGD_LR, schedule, seed) for schedule in ("constant", "cosine") for seed in (0, 1)] + [
        ("adamw", None, schedule, seed) for schedule in ("constant", "cosine") for seed in (0, 1)]  # None: lora's lr
    sgd, adamw, interaction = verdict_lines(stdout)
    assert sgd.endswith("an effect of +6.0 points (mean of 2 seeds); seed-to-seed spread 1.0 points. Verdict: holds.")
    assert adamw.endswith("an effect of +0.5 points (mean of 2 seeds); seed-to-seed spread 1.0 points. "
                          "Verdict: holds (no effect beyond noise).")
    assert interaction == (
        "- Claim: a cosine schedule helps SGD more than AdamW. Measured: scheduler=cosine's effect is +6.0 points with "
        "optimizer=sgd and +0.5 points with optimizer=adamw, a difference of +5.5 points (mean of 2 seeds); the two "
        "effects' seed-to-seed spreads add up to 2.0 points. Verdict: holds.")


def test_optimizer_memory_study_judges_peak_memory_in_a_short_run(tmp_path, launched, quick_reports) -> None:
    code, stdout, _ = run_cli("study", "optimizer-memory", "--out", str(tmp_path / "out"))
    assert code == 0
    assert {(run.options["optimizer"], run.options["r"]) for run in launched} == {
        (optimizer, r) for optimizer in ("adamw", "sgd") for r in (SMALL_RANK, LARGE_RANK)}
    assert {(run.options["max_steps"], run.options["max_eval_samples"]) for run in launched} == {(10, 64)}
    assert len(launched) == 8
    small, large = verdict_lines(stdout)
    # seed by seed: the differences are -1 and +1 MB at r=8, -41 and -39 MB at r=256; the seeds' 40 MB cancels
    assert small == (
        f"- Claim: at a small rank (r = {SMALL_RANK}) SGD saves no memory over AdamW. Measured: optimizer=sgd,r=8 "
        "920 MB vs optimizer=adamw,r=8 920 MB, an effect of +0 MB (mean of the differences at 2 seeds, each seed's "
        "runs sharing its batches); seed-to-seed spread of the differences 2 MB. "
        "Verdict: holds (no effect beyond noise).")
    assert large.endswith("an effect of -40 MB (mean of the differences at 2 seeds, each seed's runs sharing its "
                          "batches); seed-to-seed spread of the differences 2 MB. Verdict: holds.")
    assert "Two seeds even for memory" in (tmp_path / "out" / "verdicts.md").read_text(encoding="utf-8")


def test_epochs_study_contradicted_and_the_overfitting_gap_reported(tmp_path, launched, quick_reports) -> None:
    code, stdout, _ = run_cli("study", "epochs", "--out", str(tmp_path / "out"))
    assert code == 0 and run_cli("report", str(tmp_path / "out"))[0] == 0
    assert [run.options["epochs"] for run in launched] == [1, 1, 3, 3]
    assert verdict_lines(stdout)[0].endswith("an effect of +3.0 points (mean of 2 seeds); seed-to-seed spread "
                                             "1.0 points. Verdict: contradicted.")
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    # last-epoch training accuracy 0.95 with 3 epochs, 0.85 with 1; validation 0.885 and 0.855
    assert ("the overfitting gap: +6.5 points with epochs=3 (training 0.950, validation 0.885), against "
            "-0.5 points with epochs=1 (training 0.850, validation 0.855)") in report
    assert "The slowest setting, epochs=3, trained in 90.0 s per run, 300% of the fastest, epochs=1 (30.0 s)" in report


def test_consistency_study_weighs_five_seeds_against_the_sampling_error(tmp_path, launched, quick_reports) -> None:
    code, stdout, _ = run_cli("study", "consistency", "--out", str(tmp_path / "out"))
    assert code == 0
    assert [run.run_name for run in launched] == [f"lora[seed={seed}]" for seed in range(5)]
    # accuracies 0.850 0.860 0.854 0.856 0.852: sd 0.38 points; sqrt(.8544 * .1456 / 872) = 1.19 points
    assert verdict_lines(stdout) == [
        "- Claim: results are consistent across runs: the seed moves accuracy no more than the evaluation set's "
        "sampling error. Measured: lora over 5 seeds: mean 0.854, from 0.850 to 0.860 (range 1.0 points), standard "
        "deviation 0.38 points, against the evaluation set's sampling error of 1.19 points (872 examples). "
        "Verdict: holds."]


@pytest.mark.parametrize("flags, message", [
    (["rank", "--r", "4"], "--r is set by the study rank itself (study rank runs r=2,8,32); drop --r."),
    (["alpha", "--seed", "3"], "--seed is set by the study alpha itself (study alpha runs seed=0,1); drop --seed."),
    (["scheduler", "--lr", "0.001"], "--lr is set by the study scheduler itself (study scheduler runs lr=0.1); drop --lr."),
    (["all", "--optimizer", "sgd"], "--optimizer is set by the studies scheduler, optimizer-memory itself"),
    (["alfa"], f"unknown study 'alfa'; the studies are: {', '.join(STUDIES)} (or all)."),
])
def test_bad_study_flags_are_refused_before_any_run(tmp_path, launched, flags, message) -> None:
    code, _, stderr = run_cli("study", *flags, "--out", str(tmp_path / "out"))
    assert code == 2 and message in stderr, stderr
    assert launched == [] and not (tmp_path / "out").exists()


def test_a_budget_option_of_a_study_is_the_users_to_change(tmp_path, launched, quick_reports) -> None:
    code, _, _ = run_cli("study", "optimizer-memory", "--max-steps", "3", "--out", str(tmp_path / "out"))
    assert code == 0 and {run.options["max_steps"] for run in launched} == {3}


def test_a_study_resumes_in_its_folder_and_is_not_started_over_it(tmp_path, launched, quick_reports) -> None:
    out = str(tmp_path / "out")
    assert run_cli("study", "alpha", "--out", out)[0] == 0 and len(launched) == 4
    code, _, stderr = run_cli("study", "alpha", "--out", out)
    assert code == 2 and f"{out} already holds a study; continue it with --resume {out}" in stderr
    code, stdout, _ = run_cli("study", "alpha", "--resume", out)
    assert code == 0 and len(launched) == 4  # every run done with the same options: none rerun
    assert verdict_lines(stdout)[0].endswith("Verdict: holds.")
    assert run_cli("study", "alpha", "--resume", out, "--lora-dropout", "0.1")[0] == 0 and len(launched) == 8


def test_changing_only_the_trackers_on_resume_keeps_the_finished_runs(tmp_path, launched, quick_reports) -> None:
    out = str(tmp_path / "out")
    assert run_cli("study", "alpha", "--out", out)[0] == 0 and len(launched) == 4
    code, _, stderr = run_cli("study", "alpha", "--resume", out, "--report-to", "tensorboard", "--run-group", "mine")
    assert code == 0 and len(launched) == 4, stderr  # a tracker changes where numbers go, not the numbers
    assert "the trackers changed (report_to, run_group); they log the runs still to do" in stderr


def test_study_all_runs_every_study_and_writes_one_report_verdicts_first(tmp_path, launched, quick_reports,
                                                                         bert_model) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("study", "all", "--model", bert_model, "--out", str(out))
    assert code == 0, stderr
    assert "peftlab study: forgetting left out: study forgetting needs a causal LM" in stderr  # a BERT
    names = [name for name in STUDIES if name != "forgetting"]
    progress = [line for line in stdout.splitlines() if line.startswith("== study")]
    assert [re.match(r"== study (\d+)/(\d+): (\S+)", line).groups() for line in progress] == [
        (str(i), str(len(names)), name) for i, name in enumerate(names, start=1)]
    assert all((out / name / "results.json").is_file() for name in names)
    assert sum(len(load_results(out / name / "results.json").runs) for name in names) == len(launched)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# peftlab study all")
    verdicts = report.index("## Verdicts")
    assert verdicts < min(report.index(f"## Study {name}") for name in names)
    total = sum(len(STUDIES[name].questions) for name in names)
    assert f"Of {total} claims tested, " in report
    assert report.count("![Study ") == len(names)  # a plot per study, linked from its own folder
    assert all(f"]({name}/plots/study.png)" in report for name in names)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('<img src="data:image/png;base64,') == len(names)
    assert (out / "verdicts.md").read_text(encoding="utf-8").count("- Claim") == total


def test_a_resumed_study_all_says_its_time_leaves_out_the_runs_it_found_finished(tmp_path, launched, quick_reports,
                                                                                  bert_model) -> None:
    out = tmp_path / "out"
    assert run_cli("study", "all", "--model", bert_model, "--out", str(out))[0] == 0
    training_min = sum(run.train_time_s for name in STUDIES if (out / name / "results.json").is_file()
                       for run in load_results(out / name / "results.json").runs) / 60
    header = (out / "report.md").read_text(encoding="utf-8").split("\n\n")[1]
    assert re.search(r", in \d+\.\d min; ", header) and f"; {training_min:.1f} min of training in all runs." in header
    code, stdout, _ = run_cli("study", "all", "--model", bert_model, "--resume", str(out))
    assert code == 0 and "(this --resume); report:" in stdout
    header = (out / "report.md").read_text(encoding="utf-8").split("\n\n")[1]
    assert "this --resume took" in header and "(the runs it found finished are not in that figure)" in header
    assert f"; {training_min:.1f} min of training in all runs." in header  # the finished runs' training still counts


def test_study_all_leaves_out_a_study_that_cannot_apply_and_says_why(tmp_path, launched, quick_reports) -> None:
    folder = tmp_path / "albert"  # a family with no known query/value layers: the targets study cannot plan
    AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 embedding_size=16).save_pretrained(folder)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("study", "all", "--model", str(folder), "--out", str(out))
    assert code == 0
    assert "peftlab study: targets left out: run lora[target_modules=attn,seed=0]: target_modules=attn: no attention " \
           "layers known for model family 'albert'" in stderr
    assert not (out / "targets").exists() and (out / "rank" / "results.json").is_file()
    assert f"== study 1/{len(STUDIES) - 2}: alpha" in stdout  # forgetting is left out too: ALBERT is no causal LM
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Studies left out\n\n- targets (which layers LoRA adapts" in report
    code, _, stderr = run_cli("study", "targets", "--model", str(folder), "--out", str(tmp_path / "alone"))
    assert code == 2 and "no attention layers known for model family 'albert'" in stderr


def test_study_all_time_left_weighs_each_run_by_its_planned_training_examples() -> None:
    epochs, _ = plan_study(STUDIES["epochs"], argparse.Namespace())
    memory, _ = plan_study(STUDIES["optimizer-memory"], argparse.Namespace())
    # epochs=1 and epochs=3 over 2,000 examples; 10 steps of 32
    assert [planned_examples(run.options) for run in epochs] == [2000, 2000, 6000, 6000]
    assert {planned_examples(run.options) for run in memory} == {320}
    weights = run_weights([*epochs, *memory])
    assert sum(weights[:4]) == 16000 and sum(weights[4:]) == 8 * 320
    # 16,000 of 18,560 planned examples took 10 min: the 8 short runs left take 1.6 min, not 10 min as run counts say
    line = _progress(2, 2, STUDIES["optimizer-memory"], memory, 4, 12, 600.0, 16000 / 18560)
    assert line.endswith("(8 runs; 4 of 12 runs done in 10.0 min, about 2 min left) ==")
    unknown = [dataclasses.replace(epochs[0], options={**epochs[0].options, "max_train_samples": None}), memory[0]]
    assert run_weights(unknown) == [1.0, 1.0]  # a training set of unknown size: every run alike


def test_a_study_is_not_written_over_a_study_all_folder(tmp_path, launched, quick_reports) -> None:
    out = tmp_path / "out"
    (out / "rank").mkdir(parents=True)
    (out / "verdicts.md").write_text("# every study's verdicts\n")  # what `study all` leaves: no results.json of its own
    (out / "rank" / "compare.json").write_text("{}")
    code, _, stderr = run_cli("study", "alpha", "--out", str(out))
    assert code == 2 and f"{out} already holds a study; continue it with --resume {out}" in stderr
    code, _, stderr = run_cli("study", "alpha", "--resume", str(out))
    assert code == 2 and f"{out} holds several studies (study all), not what study alpha writes there" in stderr
    assert not launched and (out / "verdicts.md").read_text() == "# every study's verdicts\n"


def test_study_findings_and_plot_leave_out_a_diverged_value_and_say_so(tmp_path) -> None:
    from peftlab.lab.results import Results
    from peftlab.lab.study_findings import study_findings
    from peftlab.lab.study_plots import plot_study
    from peftlab.lab.verdict import GENERAL_PERPLEXITY

    runs = [RunRecord(method=method, run_name=f"{method}[seed={seed}]", status="ok", sweep={"seed": seed},
                      general_perplexity=value)
            for method, values in (("full", (30.0, float("inf"))), ("lora", (21.0, 21.0))) for seed, value in
            enumerate(values)]
    text = study_findings(runs, GENERAL_PERPLEXITY)
    assert text[0].startswith("Perplexity on held-out general text ranged from 21.000 (method=lora) to 30.000 "
                              "(method=full), 9.000 perplexity apart")
    assert text[-1] == ("Perplexity on held-out general text was not finite, a run that diverged, and is left out of "
                        "the numbers above for: full[seed=1] (inf).")
    # drawn without it (an inf on the axis stopped the whole report), named under the plot
    assert plot_study(Results(runs=runs), GENERAL_PERPLEXITY, "forgetting", tmp_path / "study.png").is_file()
    equal = [RunRecord(method="lora", run_name=f"lora[r={r},seed={seed}]", status="ok", sweep={"r": r, "seed": seed},
                       val_accuracy=0.8 + seed / 100) for r in (2, 8) for seed in (0, 1)]
    assert study_findings(equal, STUDIES["rank"].metric)[0] == (
        "Validation accuracy was 0.805 in every setting (the mean over seeds); within a setting the seeds differed by "
        "1.0 points.")
