"""Issue 15, the forgetting study: fine-tune a causal LM with full fine-tuning and adapters, measure
perplexity on held-out general text before and after, and judge "LoRA learns less and forgets less".

The perplexities are checked against an oracle (the transformers model's own loss, the adapter
loaded by HF peft); the study's flow and verdicts run on stand-in records, as in test_study.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel as HFPeftModel
from train_fixtures import bert_dir, gpt2_dir, llama_dir, prompt_dir, tiny_options  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.lab import forgetting, runner
from peftlab.lab.forgetting import GeneralText, causal_lm_config, general_text_for, measure_forgetting
from peftlab.lab.results import Results, RunRecord, load_results
from peftlab.train.loop import run_training
from peftlab.train.options import OptionsError
from test_compare import run_cli
from test_text_perplexity import write_words


def oracle(model, tokenizer, text: str, length: int, windows: int) -> float:
    """exp(mean NLL) from the model's own loss over the first ``windows`` windows (all the text has here)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll = 0.0
    for start in range(0, windows * length, length):
        window = torch.tensor([ids[start : start + length]])
        with torch.no_grad():
            nll += float(model(input_ids=window, labels=window).loss) * (length - 1)
    return math.exp(nll / (windows * (length - 1)))


# -- a causal LM or a clear error ----------------------------------------------------------------------


def test_a_classifier_or_an_encoder_is_refused(bert_dir: Path) -> None:
    with pytest.raises(OptionsError, match=re.escape(
            f"study forgetting needs a causal LM, a model that predicts the next token (e.g. smollm2-135m), to "
            f"measure perplexity on general text; {bert_dir} is BertForSequenceClassification, a classifier")):
        causal_lm_config(str(bert_dir), "causal-lm")
    with pytest.raises(OptionsError, match="fine-tunes a causal LM \\(--task causal-lm\\).*drop --task seq-cls"):
        causal_lm_config(str(bert_dir), "seq-cls")


def test_decoders_are_causal_lms_and_the_window_fits_the_model(llama_dir: Path, gpt2_dir: Path) -> None:
    assert general_text_for("x.txt", causal_lm_config(str(llama_dir), "causal-lm")).context_length == 32
    assert causal_lm_config(str(gpt2_dir), "causal-lm").architectures == ["GPT2LMHeadModel"]


def test_study_forgetting_with_a_classifier_fails_before_any_run(bert_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "launch", lambda *args: pytest.fail("a run was started"))
    code, _, stderr = run_cli("study", "forgetting", "--model", str(bert_dir), "--out", str(tmp_path / "out"))
    assert code == 2
    assert stderr.startswith("peftlab study: error: study forgetting needs a causal LM") and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_general_text_is_refused_by_the_other_studies(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "launch", lambda *args: pytest.fail("a run was started"))
    code, _, stderr = run_cli("study", "alpha", "--general-text", "shakespeare", "--out", str(tmp_path / "out"))
    assert code == 2 and "--general-text is the held-out text of study forgetting; study alpha has none." in stderr


def test_a_general_text_too_short_fails_before_any_run(llama_dir, prompt_dir, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner, "launch", lambda *args: pytest.fail("a run was started"))
    short = write_words(tmp_path / "short.txt", 100)  # 3 windows of 32 tokens; the study scores 8
    code, _, stderr = run_cli("study", "forgetting", "--model", str(llama_dir), "--dataset", str(prompt_dir),
                              "--general-text", str(short), "--out", str(tmp_path / "out"))
    assert code == 2 and "has 3 windows of 32 tokens; study forgetting scores 8: give a longer text" in stderr


# -- the measurement, against the oracle ----------------------------------------------------------------


def test_perplexity_before_and_after_equals_the_models_own_loss(llama_dir, prompt_dir, tmp_path: Path) -> None:
    general = GeneralText(str(write_words(tmp_path / "general.txt", 24 * 16)), context_length=16, windows=24)
    text = Path(general.name).read_text()
    records = []
    for method in ("full", "lora"):
        options = tiny_options(llama_dir, prompt_dir, tmp_path / method, method=method, task="causal-lm",
                               max_steps=4, lr=5e-2 if method == "full" else 1e-1)
        metrics = run_training(options)
        records.append(RunRecord(method=method, run_name=method, status="ok", options=metrics["options"]))
    records.append(RunRecord(method="dora", run_name="dora", status="failed", error="killed"))
    results = measure_forgetting(Results(records, config={"model": str(llama_dir), "task": "causal-lm"}), general,
                                 log=lambda line: None)

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    facts = results.config["forgetting"]
    assert facts == {"general_text": general.name, "context_length": 16, "windows": 24, "tokens_scored": 24 * 15,
                     "base_perplexity": pytest.approx(oracle(base, tokenizer, text, 16, 24), rel=1e-5)}
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    lora = HFPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "lora").eval()
    expected = {"full": oracle(full, tokenizer, text, 16, 24), "lora": oracle(lora, tokenizer, text, 16, 24)}
    measured = {run.method: run.general_perplexity for run in results.runs}
    assert measured["full"] == pytest.approx(expected["full"], rel=1e-5)
    assert measured["lora"] == pytest.approx(expected["lora"], rel=1e-5)
    assert measured["dora"] is None  # a failed run is left as it was
    assert all(abs(value / facts["base_perplexity"] - 1) > 1e-3 for value in expected.values())  # training moved it
    assert forgetting.forgetting_findings(results) == [
        f"Perplexity on {general.name} (360 tokens in windows of 16) was {facts['base_perplexity']:.3f} before "
        f"training; after it (mean over seeds): full {measured['full']:.3f} "
        f"({measured['full'] / facts['base_perplexity'] - 1:+.1%}), lora {measured['lora']:.3f} "
        f"({measured['lora'] / facts['base_perplexity'] - 1:+.1%})."]


# -- the study: grid, verdicts, report (stand-in runs) -----------------------------------------------------

#: (task accuracy, perplexity after) per method, and a seed-to-seed spread: full learns and forgets most,
#: lora less of both beyond the spread, dora ties full on accuracy and forgets more.
STAND_IN = {"full": (0.90, 30.0), "lora": (0.80, 21.0), "dora": (0.905, 33.0)}
BASE_PERPLEXITY = 20.0


def test_forgetting_study_grid_verdicts_and_report(llama_dir, prompt_dir, tmp_path: Path, monkeypatch) -> None:
    launched = []

    def launch(run, folder, log):
        launched.append(run)
        accuracy, _ = STAND_IN[run.method]
        return RunRecord(method=run.method, run_name=run.run_name, status="ok", sweep=run.sweep, options=run.options,
                         val_accuracy=accuracy + 0.01 * run.sweep["seed"],
                         eval_examples=100_000)  # sampling error ~0.1 points: the seed spread is the bar

    def perplexity_after(options, model, general):
        if options is None:
            return BASE_PERPLEXITY, 2040
        return STAND_IN[options.method][1] + 0.5 * options.seed, 2040

    monkeypatch.setattr(runner, "launch", launch)
    monkeypatch.setattr(forgetting, "general_perplexity", perplexity_after)
    general = write_words(tmp_path / "general.txt", 400)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("study", "forgetting", "--model", str(llama_dir), "--dataset", str(prompt_dir),
                                   "--general-text", str(general), "--out", str(out))
    assert code == 0, stderr
    assert [run.run_name for run in launched] == [f"{method}[seed={seed}]" for method in ("full", "lora", "dora")
                                                  for seed in (0, 1)]
    assert {run.options["task"] for run in launched} == {"causal-lm"}
    assert {run.options["model"] for run in launched} == {str(llama_dir)}
    assert launched[0].options["max_train_samples"] == forgetting.BUDGET["max_train_samples"]
    lines = [line for line in stdout.splitlines() if line.startswith("- Claim")]
    assert lines == [
        "- Claim: lora learns less than full fine-tuning: its task accuracy is lower. Measured: method=lora 0.805 vs "
        "method=full 0.905, an effect of -10.0 points (mean of 2 seeds); seed-to-seed spread 1.0 points. "
        "Verdict: holds.",
        "- Claim: lora forgets less than full fine-tuning: its perplexity on held-out general text rises less. "
        "Measured: method=lora 21.250 vs method=full 30.250, an effect of -9.000 perplexity (mean of 2 seeds); "
        "seed-to-seed spread 0.500 perplexity. Verdict: holds.",
        "- Claim: dora learns less than full fine-tuning: its task accuracy is lower. Measured: method=dora 0.910 vs "
        "method=full 0.905, an effect of +0.5 points (mean of 2 seeds); seed-to-seed spread 1.0 points. "
        "Verdict: no effect beyond noise.",
        "- Claim: dora forgets less than full fine-tuning: its perplexity on held-out general text rises less. "
        "Measured: method=dora 33.250 vs method=full 30.250, an effect of +3.000 perplexity (mean of 2 seeds); "
        "seed-to-seed spread 0.500 perplexity. Verdict: contradicted.",
    ]
    results = load_results(out / "results.json")
    assert [run.general_perplexity for run in results.runs] == [30.0, 30.5, 21.0, 21.5, 33.0, 33.5]
    assert results.config["forgetting"]["base_perplexity"] == BASE_PERPLEXITY
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# peftlab study forgetting")
    assert (f"was {BASE_PERPLEXITY:.3f} before training; after it (mean over seeds): full 30.250 (+51.2%), "
            "lora 21.250 (+6.2%), dora 33.250 (+66.3%).") in report
    assert (out / "plots" / "study.png").stat().st_size > 10_000
