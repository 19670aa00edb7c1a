"""The lab on instruction data: a comparison of causal LMs ranked by what they answer (exact match), the
untrained base model's score beside the runs, and each metric shown under its own name."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from train_fixtures import llama_dir, prompt_dir  # noqa: F401

from peftlab.train.generation_metrics import generation_scores
from peftlab.lab.findings import findings
from peftlab.lab.metric import ACCURACY, EXACT_MATCH, TOKEN_ACCURACY, metric_for
from peftlab.lab.report import format_table, write_report
from peftlab.lab.results import Results, load_results
from peftlab.train.options import TrainOptions

sys.path.insert(0, str(Path(__file__).parent))
from test_report import synthetic_results  # noqa: E402


def test_the_metric_follows_the_task_and_the_data(tmp_path):
    assert metric_for(TrainOptions()) is ACCURACY
    assert metric_for(TrainOptions(task="causal-lm", dataset="number-words")) is EXACT_MATCH
    assert metric_for(TrainOptions(task="causal-lm", dataset=str(tmp_path / "rows.jsonl"))) is EXACT_MATCH
    assert metric_for(TrainOptions(task="causal-lm", dataset="notes.txt")) is TOKEN_ACCURACY


def generation_results() -> Results:
    results = synthetic_results()
    results.config.update(metric=EXACT_MATCH, model="smollm2-135m",
                          base_scores={"exact_match": 0.02, "contains_answer": 0.1, "examples": 50})
    for run in results.ok_runs:
        run.scores = {"contains_answer": run.val_accuracy, "token_accuracy": 0.97}
    return results


def test_a_generation_report_names_its_metric_and_the_base_model(tmp_path):
    results = generation_results()
    sentences = findings(results)
    assert sentences[0] == ("The base model, untrained, scored 0.020 exact match (contains the answer: 0.100) on the "
                            "same 50 held-out questions; each run's change in points: full +87.0, lora +88.0, "
                            "dora +88.0, qlora +84.0.")
    assert "lora reached the highest validation exact match, 0.900" in sentences[1]
    md_path, _ = write_report(results, tmp_path)
    text = md_path.read_text()
    assert "val exact match" in text and "contains answer" in text and "token accuracy" in text
    assert "val accuracy" not in text and "smollm2-135m before any training" in text
    assert "val EM" in format_table(results)


def test_compare_on_prompt_rows_ranks_by_exact_match(llama_dir, prompt_dir, tmp_path, monkeypatch):
    from test_compare import run_cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    code, stdout, stderr = run_cli("compare", "--model", str(llama_dir), "--task", "causal-lm", "--dataset",
                                   str(prompt_dir), "--methods", "lora", "--max-steps", "2", "--batch-size", "8",
                                   "--max-length", "24", "--lr", "1e-2", "--out", str(out),
                                   "--eval-dataset", str(prompt_dir / "validation.jsonl"))
    assert code == 0, stderr
    results = load_results(out / "results.json")
    run = results.runs[0]
    answers = [json.loads(line) for line in (out / "runs/lora/generations.jsonl").read_text().splitlines()]
    scores = generation_scores([a["generation"] for a in answers], [a["reference"] for a in answers])
    assert results.config["metric"] == EXACT_MATCH and len(answers) == 8
    assert run.val_accuracy == scores["exact_match"] and run.scores["contains_answer"] == scores["contains_answer"]
    assert 0 <= run.scores["token_accuracy"] <= 1 and run.scores["eval_loss"] > 0
    base = results.config["base_scores"]
    assert base["examples"] == 8 and set(base) == {"exact_match", "contains_answer", "examples"}
    assert f"ok, val exact match {run.val_accuracy:.3f}" in stderr
    # an extra set is scored by the comparison's metric: here the validation rows again, the same answers
    # (its token accuracy, the score before, differs: 0.0625 where exact match is 0 after 2 steps)
    assert run.eval_datasets == {str(prompt_dir / "validation.jsonl"): run.val_accuracy}


def test_compare_tells_the_task_from_the_data_as_train_does(prompt_dir, sst2_dir):
    """Prompt rows without --task: causal-lm and exact match (they failed every run as classification data)."""
    from peftlab.cli import build_parser
    from peftlab.lab.cli import plan_from_args

    def planned(*flags):
        return plan_from_args(build_parser("compare").parse_args(["compare", "--methods", "lora", *flags]))

    runs, config = planned("--dataset", str(prompt_dir))
    assert runs[0].options["task"] == "causal-lm" and config["metric"] == EXACT_MATCH
    assert runs[0].options["max_steps"] == 30  # the causal-LM budget, as with --task causal-lm
    runs, config = planned("--dataset", str(sst2_dir))
    assert runs[0].options["task"] == "seq-cls" and config["metric"] == ACCURACY
    runs, _ = planned("--dataset", str(prompt_dir), "--task", "causal-lm")
    assert runs[0].options["task"] == "causal-lm"
