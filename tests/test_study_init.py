"""Issue 24 item 5: `peftlab study init` -- LoRA's default start against PiSSA, OLoRA and EVA, and QLoRA's
against LoftQ: the plan (a config field swept through method_options, an arm with its own method), the
early-loss metric from the recorded loss curve, the verdicts on records whose answers are known, and the
loss-against-steps plot. The child process is replaced by records with given numbers (no training)."""

from __future__ import annotations

import argparse

import pytest

from peftlab.lab import runner
from peftlab.lab.results import Results, RunRecord
from peftlab.lab.study import STUDIES
from peftlab.lab.study_command import plan_study
from peftlab.lab.study_plots import plot_loss_by_setting
from peftlab.lab.sweep import SweepAxis, parse_sweep, plan_runs
from peftlab.lab.verdict import EARLY_LOSS, early_loss
from peftlab.train.options import OptionsError
from test_compare import run_cli
from test_study import quick_reports, verdict_lines  # noqa: F401 (a fixture)

STEPS = 30  # 10% of them: steps 1 to 3
SEED_LOSS = {0: 0.0, 1: 0.01}  # what a seed's batches add to every start's loss alike
#: Each start's loss over steps 1-3 below (-) or above (+) the default's, and its validation accuracy.
EARLY_SHIFT = {("lora", True): 0.0, ("lora", "pissa"): -0.05, ("lora", "olora"): 0.0, ("lora", "eva"): +0.05,
               ("qlora", True): 0.0, ("qlora", "loftq"): 0.0}
ACCURACY = {("lora", True): 0.85, ("lora", "pissa"): 0.852, ("lora", "olora"): 0.85, ("lora", "eva"): 0.85,
            ("qlora", True): 0.80, ("qlora", "loftq"): 0.84}


def loss_curve(shift: float, seed: int) -> list[dict]:
    """A falling loss; ``shift`` moves only the first 10% of the steps (after them every start is alike)."""
    return [{"step": step, "loss": 0.7 - 0.01 * step + SEED_LOSS[seed] + (shift if step <= STEPS // 10 else 0.0)}
            for step in range(1, STEPS + 1)]


def stand_in_record(run) -> RunRecord:
    setting = (run.method, run.sweep["init_lora_weights"])
    seed = run.sweep["seed"]
    return RunRecord(method=run.method, run_name=run.run_name, status="ok", sweep=run.sweep, options=run.options,
                     val_accuracy=ACCURACY[setting] + 0.01 * (seed == 1), eval_examples=100_000, steps=STEPS,
                     train_loss_curve=loss_curve(EARLY_SHIFT[setting], seed), train_time_s=30.0)


@pytest.fixture
def launched(monkeypatch) -> list:
    runs = []

    def launch(run, folder, log):
        runs.append(run)
        folder.mkdir(parents=True, exist_ok=True)
        return stand_in_record(run)

    monkeypatch.setattr(runner, "launch", launch)
    return runs


def test_the_init_study_plans_lora_starts_and_qloras_own_arm_over_two_seeds() -> None:
    runs, config = plan_study(STUDIES["init"], argparse.Namespace())
    planned = [(run.method, run.options["method_options"]["init_lora_weights"], run.options["seed"]) for run in runs]
    assert planned == [("lora", init, seed) for init in (True, "pissa", "olora", "eva") for seed in (0, 1)] + [
        ("qlora", init, seed) for init in (True, "loftq") for seed in (0, 1)]
    assert runs[2].run_name == "lora[init_lora_weights=pissa,seed=0]"
    assert {run.options["model"] for run in runs} == {"minilm-l6"}  # the lab's default model and budget
    assert {run.options["max_train_samples"] for run in runs} == {2000}
    assert config["methods"] == ["lora", "qlora"]


def test_a_method_config_field_without_a_flag_is_swept_through_method_options() -> None:
    axis = parse_sweep("init_lora_weights=true,pissa")
    assert axis == SweepAxis("init_lora_weights", (True, "pissa"))
    runs = plan_runs({"model": "minilm-l6", "method_options": {"use_rslora": True}}, ["full", "lora"], axes=[axis],
                     family_of=lambda model: "bert")
    assert [run.run_name for run in runs] == [
        "full", "lora[init_lora_weights=True]", "lora[init_lora_weights=pissa]"]  # full fine-tuning has no adapter
    assert runs[2].options["method_options"] == {"use_rslora": True, "init_lora_weights": "pissa"}
    with pytest.raises(OptionsError, match="method 'vera' has no option 'init_lora_weights'"):
        plan_runs({"model": "minilm-l6"}, ["vera"], axes=[axis], family_of=lambda model: "bert")


@pytest.mark.parametrize("steps, averaged", [(30, 3), (63, 7), (10, 1), (5, 1)])
def test_early_loss_is_the_mean_training_loss_over_the_first_tenth_of_the_steps(steps, averaged) -> None:
    curve = [{"step": step, "loss": float(step)} for step in range(1, steps + 1)]
    record = RunRecord(method="lora", run_name="lora", status="ok", steps=steps, train_loss_curve=curve)
    assert early_loss(record) == pytest.approx(sum(range(1, averaged + 1)) / averaged)  # steps 1..ceil(steps / 10)
    assert EARLY_LOSS.of(RunRecord(method="lora", run_name="lora", status="ok")) is None  # no curve recorded


def test_init_study_verdicts_on_known_records(tmp_path, launched, quick_reports) -> None:
    code, stdout, stderr = run_cli("study", "init", "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    assert len(launched) == 12
    pissa_loss, pissa_accuracy, olora_loss, eva_loss, loftq = verdict_lines(stdout)
    # steps 1-3 average 0.68 and 0.69 at seeds 0 and 1 for the default start; PiSSA 0.05 below it at every seed
    assert pissa_loss == (
        "- Claim: PiSSA converges faster: its training loss over the first 10% of the steps is lower than the default "
        "start's. Measured: method=lora,init_lora_weights=pissa 0.6350 vs method=lora,init_lora_weights=True 0.6850, "
        "an effect of -0.0500 loss (mean of the differences at 2 seeds, each seed's runs sharing its batches); "
        "seed-to-seed spread of the differences 0.0000 loss. Verdict: holds.")
    assert pissa_accuracy.endswith("an effect of +0.2 points (mean of 2 seeds); seed-to-seed spread 1.0 points. "
                                   "Verdict: no effect beyond noise.")
    assert olora_loss.endswith("an effect of +0.0000 loss (mean of the differences at 2 seeds, each seed's runs "
                               "sharing its batches); seed-to-seed spread of the differences 0.0000 loss. "
                               "Verdict: no effect beyond noise.")
    assert eva_loss.endswith("Verdict: contradicted.")
    assert loftq == (
        "- Claim: LoftQ narrows QLoRA's gap to LoRA: QLoRA started by LoftQ is more accurate than QLoRA's default start. "
        "Measured: gap to method=lora,init_lora_weights=True (0.855): +5.0 points for method=qlora,init_lora_weights=True, "
        "+1.0 points for method=qlora,init_lora_weights=loftq; method=qlora,init_lora_weights=loftq 0.845 vs "
        "method=qlora,init_lora_weights=True 0.805, an effect of +4.0 points (mean of 2 seeds); seed-to-seed spread "
        "1.0 points. Verdict: holds.")
    assert "Training loss over the first 10% of the steps: the mean" in (tmp_path / "out" / "verdicts.md").read_text()


def test_loftq_is_not_judged_without_the_lora_reference(tmp_path) -> None:
    study = STUDIES["init"]
    runs, _ = plan_study(study, argparse.Namespace())
    records = [stand_in_record(run) for run in runs if run.method == "qlora"]
    assert study.questions[-1].judge(records).outcome == "not judged"


def test_the_loss_plot_draws_every_setting_with_its_seeds(tmp_path, launched, quick_reports) -> None:
    assert run_cli("study", "init", "--out", str(tmp_path / "out"))[0] == 0
    assert run_cli("report", str(tmp_path / "out"))[0] == 0  # the full report, as `peftlab report` rewrites it
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "(plots/study_loss.png)" in report and (tmp_path / "out" / "plots" / "study_loss.png").stat().st_size > 10_000
    failed = RunRecord(method="lora", run_name="lora[init_lora_weights=eva,seed=0]", status="failed",
                       sweep={"init_lora_weights": "eva", "seed": 0})
    assert plot_loss_by_setting(Results(config={}, environment={}, runs=[failed]), "t", tmp_path / "none.png") is None
