"""`peftlab train`, `eval` and `merge --method NAME` for every method of the table (method_table.py),
on a tiny BERT and a tiny sentiment dataset."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import bert_dir, sentiment_dir  # noqa: F401
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from method_table import METHOD_TABLE
from peftlab import PeftModel
from peftlab.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method", [case.name for case in METHOD_TABLE])
def test_train_eval_merge(bert_dir, sentiment_dir, tmp_path, capsys, method):
    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    code, out, err = run_cli(capsys, "train", "--method", method, "--model", str(bert_dir), "--dataset", str(sentiment_dir),
                             "--out", str(adapter), "--batch-size", "8", "--max-length", "16", "--max-steps", "2")
    assert code == 0, err
    trained = json.loads(out)
    assert trained["steps"] == 2

    code, out, err = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(sentiment_dir), "--max-length", "16")
    assert code == 0, err
    assert json.loads(out)["eval_accuracy"] == trained["eval_accuracy"]

    code, _, err = run_cli(capsys, "merge", "--adapter", str(adapter), "--out", str(merged_dir))
    assert code == 0, err
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert_dir), adapter).eval()
    batch = AutoTokenizer.from_pretrained(merged_dir)(["the movie was good", "a bad film"], return_tensors="pt",
                                                      padding=True, return_token_type_ids=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
