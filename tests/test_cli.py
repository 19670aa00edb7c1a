"""The command line: train -> eval -> merge -> export on a tiny model, and errors a user can fix (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_fixtures import bert_dir, sentiment_dir  # noqa: F401
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from method_table import METHOD_TABLE
from peftlab import PeftModel
from peftlab.cli import SUBCOMMANDS, main
from peftlab.methods import METHODS, method_named


def tiny_flags(bert_dir, sentiment_dir, out) -> list[str]:
    return ["--model", str(bert_dir), "--dataset", str(sentiment_dir), "--out", str(out), "--batch-size", "8",
            "--max-length", "16", "--lora-dropout", "0", "--lr", "1e-2"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_eval_merge(bert_dir, sentiment_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    code, out, _ = run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, adapter), "--max-steps", "4")
    assert code == 0
    summary = json.loads(out)
    assert summary["steps"] == 4 and 0 <= summary["eval_accuracy"] <= 1

    # eval finds the base model and the task in adapter_config.json, and agrees with training's final eval.
    code, out, _ = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(sentiment_dir), "--max-length", "16")
    assert code == 0
    evaluated = json.loads(out)
    assert evaluated["eval_accuracy"] == summary["eval_accuracy"] and evaluated["examples"] == 16
    assert evaluated["eval_loss"] == pytest.approx(summary["eval_loss"], abs=1e-5)

    merged_dir = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", "--model", str(bert_dir), "--adapter", str(adapter), "--out", str(merged_dir))
    assert code == 0 and "wrote" in err
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()  # plain transformers
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(["the movie was good", "a bad film"], return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
        with adapted.disable_adapter():  # the two training steps moved the output: the merge did something
            assert (adapted(**batch).logits - merged(**batch).logits).abs().max() > 1e-6
    assert not any("lora" in name for name, _ in merged.named_parameters())

    # export --to lora: a plain LoRA folder HF peft loads with the adapter's logits; a bad --max-rank is refused.
    exported = tmp_path / "exported"
    code, _, err = run_cli(capsys, "export", "--to", "lora", "--adapter", str(adapter), "--out", str(exported), "--max-rank", "8")
    assert code == 0 and "exact" in err and (exported / "README.md").is_file()
    import peft

    served = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert_dir), str(exported))
    with torch.no_grad():
        torch.testing.assert_close(served.eval()(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
    code, _, err = run_cli(capsys, "export", "--adapter", str(adapter), "--out", str(tmp_path / "x"), "--max-rank", "24")
    assert code == 2 and "max_rank 24 is not a rank limit" in err and not (tmp_path / "x").exists()


def test_train_reads_a_yaml_config(bert_dir, sentiment_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {bert_dir}\ndataset: {sentiment_dir}\nmax-steps: 2\nbatch_size: 8\nmax_length: 16\n")
    code, out, _ = run_cli(capsys, "train", "--config", str(config), "--out", str(tmp_path / "out"), "--max-steps", "1")
    assert code == 0 and json.loads(out)["steps"] == 1


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("peftlab train: error:")
    for fragment in fragments:
        assert fragment in err


def test_unknown_model_alias_lists_the_aliases(sentiment_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(capsys, "train", "--model", "minilm-l7", "--dataset", str(sentiment_dir), "--out", str(tmp_path))
    assert_clean_error(code, err, "minilm-l7", "minilm-l6", "smollm2-135m")


def test_an_output_folder_that_cannot_be_written(bert_dir, sentiment_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, blocker / "out"))
    assert_clean_error(code, err, "cannot write to the output folder", "Choose another --out")


def test_config_errors(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: many\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert_clean_error(code, err, "option 'epochs' must be an integer, got 'many'")
    config.write_text("warmup_ration: 0.1\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert_clean_error(code, err, "unknown key 'warmup_ration'", "Did you mean 'warmup_ratio'?")


def test_unknown_method_lists_the_registered_ones(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--method", "dorra", "--out", str(tmp_path))
    registered = ", ".join(sorted([*METHODS, "full"]))  # every method file's names, whatever files there are
    assert_clean_error(code, err, "unknown method 'dorra'", registered, "Did you mean 'dora'?")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"text\tscore\nthe movie was good\t1\n", "match no data format; expected one of"),
        (b"sentence\tlabel\n", "has no train examples"),
        (b"sentence\tlabel\nthe movie \xff was good\t1\n", "is not valid UTF-8"),
    ],
)
def test_dataset_errors_reach_the_user_cleanly(bert_dir, sentiment_dir, tmp_path, capsys, content, message):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_bytes(content)
    (data / "validation.tsv").write_bytes((sentiment_dir / "validation.tsv").read_bytes())
    code, _, err = run_cli(capsys, "train", *tiny_flags(bert_dir, data, tmp_path / "out"))
    assert_clean_error(code, err, message)


def test_labels_out_of_range_for_the_adapter_in_eval(bert_dir, sentiment_dir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, adapter), "--max-steps", "1")[0] == 0
    data = tmp_path / "data"
    data.mkdir()
    (data / "validation.tsv").write_text("sentence\tlabel\nthe movie was good\t7\n")
    code, _, err = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(data))
    assert code == 2 and "Traceback" not in err
    assert "label 7 is outside the classes 0..1" in err.strip().splitlines()[-1]


def test_python_dash_m_and_the_subcommand_table():
    assert {"train", "eval", "merge"} <= set(SUBCOMMANDS)
    result = subprocess.run([sys.executable, "-m", "peftlab", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "train" in result.stdout and "merge" in result.stdout


def test_eval_of_a_qlora_adapter_on_the_4bit_base(bert_dir, sentiment_dir, tmp_path, capsys):
    adapter = tmp_path / "qlora"
    code, out, _ = run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, adapter), "--method", "qlora", "--max-steps", "2")
    assert code == 0
    trained = json.loads(out)
    code, out, _ = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(sentiment_dir), "--max-length", "16",
                           "--quantize", "nf4")
    assert code == 0 and json.loads(out)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)


@pytest.mark.parametrize("case", METHOD_TABLE, ids=str)
def test_every_method_trains_evaluates_and_merges(bert_dir, sentiment_dir, tmp_path, capsys, case):
    """``peftlab train/eval/merge --method NAME`` for every method of the table, with its own defaults."""
    adapter = tmp_path / "adapter"
    flags = ["--model", str(bert_dir), "--dataset", str(sentiment_dir), "--batch-size", "8", "--max-length", "16"]
    code, out, err = run_cli(capsys, "train", *flags, "--out", str(adapter), "--method", case.name, "--max-steps", "2")
    assert code == 0, err
    trained = json.loads(out)
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == method_named(case.name).peft_type
    code, out, _ = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(sentiment_dir), "--max-length", "16")
    assert code == 0 and json.loads(out)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-5)
    code, _, _ = run_cli(capsys, "merge", "--model", str(bert_dir), "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    assert code == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert_dir), adapter).eval()
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(["the movie was good", "a bad film"], return_tensors="pt",
                                                              padding=True, return_token_type_ids=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
        with adapted.disable_adapter():  # the two training steps moved the output: the merge did something
            assert (adapted(**batch).logits - merged(**batch).logits).abs().max() > 1e-6
