"""The engine on chat data: the template applied, --max-length chosen from the data, truncation
counted in metrics, packing training exactly as padding does, and the command-line errors."""

from __future__ import annotations

import json

import pytest
from chat_fixtures import CHATML, chat_tokenizer, write_chat_rows
from train_fixtures import save_tiny_model, tiny_options, write_sentiment_data

from peftlab.cli import main
from peftlab.train.generation import encode_prompt, load_for_generation
from peftlab.train.loop import run_training
from peftlab.train.options import OptionsError


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("chat-llama"), chat_tokenizer(), "llama")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-data")
    write_chat_rows(folder / "train.jsonl", 24)
    write_chat_rows(folder / "validation.jsonl", 6, seed=1)
    return folder


def test_chat_training_packed_follows_the_padded_loss_curve(chat_llama_dir, chat_data, tmp_path, capsys) -> None:
    # Each step takes the whole set (24 rows padded; all its sequences packed), so both runs see the
    # same examples every step, and the loss, a mean over label tokens, must not depend on the layout.
    runs = {}
    for packing, max_length in ((False, None), (True, 32)):  # packed: sequences of 32 hold up to two rows
        options = tiny_options(chat_llama_dir, chat_data, tmp_path / str(packing), task="causal-lm", batch_size=24,
                               max_length=max_length, packing=packing, max_steps=3, lr=1e-2)
        runs[packing] = run_training(options)
    padded, packed = runs[False], runs[True]
    log = capsys.readouterr().err  # the log counts rows, and under --packing also what a batch counts
    assert "trainable; 24 examples, 3 steps" in log
    assert f"trainable; 24 examples in {packed['packed_sequences']} packed sequences, 3 steps" in log
    assert padded["max_length"] == 23 and padded["max_length_from_data"] is True  # the longest row
    assert padded["train_rows"] == 24 and padded["train_rows_truncated"] == 0 and padded["eval_rows_truncated"] == 0
    assert packed["train_loss_curve"] == pytest.approx(padded["train_loss_curve"], abs=1e-5)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], abs=1e-5)
    assert packed["packed_sequences"] < 24 and "packed_sequences" not in padded
    assert packed["examples_per_s"] * packed["train_time_s"] == pytest.approx(3 * 24)  # rows, not sequences
    tokens = packed["packing_efficiency"] * packed["packed_sequences"] * 32
    assert 0 < packed["padding_share"] < padded["padding_share"] and packed["train_tokens_per_s"] > 0
    # the batch pads each sequence to the longest of the step, at most 32: less padding than 32-token slots
    assert packed["padding_share"] <= 1 - tokens / (packed["packed_sequences"] * 32) + 1e-9


def test_truncated_rows_are_counted(chat_llama_dir, chat_data, tmp_path) -> None:
    metrics = run_training(tiny_options(chat_llama_dir, chat_data, tmp_path / "cut", task="causal-lm", max_length=14, max_steps=1))
    assert metrics["max_length"] == 14 and metrics["max_length_from_data"] is False
    # rows are 11 + k tokens (k = 1 + i % 4 "yes"), 8 more with a second exchange (i % 3 == 0): over 14 are
    # the 6 with k = 4 and the 8 with two exchanges, 2 being both
    assert metrics["train_rows_truncated"] == 12 and metrics["train_longest_row_tokens"] == 23


def test_the_cli_tells_the_task_from_the_data_and_asks_for_a_template(chat_llama_dir, chat_data, tmp_path, capsys) -> None:
    bare = tmp_path / "no-template"
    tokenizer = chat_tokenizer(template=None)
    save_tiny_model(bare, tokenizer, "llama")
    flags = ["train", "--dataset", str(chat_data), "--method", "lora", "--max-steps", "1", "--batch-size", "8"]
    code, _, err = run_cli(capsys, *flags, "--model", str(bare), "--out", str(tmp_path / "a"))
    assert code == 2 and "conversations need a chat template, and the model's tokenizer has none; pass --chat-template FILE.jinja" in err
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    code, out, err = run_cli(capsys, *flags, "--model", str(bare), "--chat-template", str(template), "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert "train data: 0 of 24 rows (0%) cut at --max-length 23" in err
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["options"]["task"] == "causal-lm" and saved["options"]["chat_template"] == str(template)
    code, out, err = run_cli(capsys, "eval", "--adapter", str(tmp_path / "b"))
    assert code == 0, err
    assert f"chat_template={template}" in err  # the run's template, taken from its metrics.json
    scores = json.loads(out)
    assert scores["max_length"] == 23 and scores["eval_rows"] == 6 and scores["eval_rows_truncated"] == 0
    # what generates from the run renders its prompts with the run's template, saved with its tokenizer
    template.unlink()
    _, tokenizer = load_for_generation(None, str(tmp_path / "b"))
    assert tokenizer.chat_template == CHATML
    assert encode_prompt(tokenizer, "hi") == tokenizer(
        "<|im_start|>user hi<|im_end|> <|im_start|>assistant ", add_special_tokens=False)["input_ids"]
    code, out, err = run_cli(capsys, "generate", "--adapter", str(tmp_path / "b"), "--max-new-tokens", "2", "hi")
    assert code == 0, err


def test_packing_is_refused_for_classification(tmp_path) -> None:
    data = write_sentiment_data(tmp_path / "sentiment", n_train=8, n_validation=2)
    bert = save_tiny_model(tmp_path / "bert", chat_tokenizer(), "bert")
    with pytest.raises(OptionsError, match="--packing lays causal-LM rows end to end; it does not apply to seq-cls data"):
        run_training(tiny_options(bert, data, tmp_path / "out", packing=True, max_steps=1))


def test_packing_that_joins_no_rows_says_how_to_pack(chat_llama_dir, chat_data, tmp_path, capsys) -> None:
    # --max-length left to the longest row (23 tokens): no two rows (12-23 tokens) fit one sequence; the
    # advice stays within the model's 32 positions.
    metrics = run_training(tiny_options(chat_llama_dir, chat_data, tmp_path / "auto", task="causal-lm", batch_size=8,
                                        max_length=None, packing=True, max_steps=1))
    log = capsys.readouterr().err
    assert metrics["packed_sequences"] == 24
    assert ("--packing joins few rows: sequences of --max-length 23 (the longest row, as no --max-length was given) "
            "hold about one row each; give a larger --max-length (e.g. 32) to pack several rows") in log
    metrics = run_training(tiny_options(chat_llama_dir, chat_data, tmp_path / "wide", task="causal-lm", batch_size=2,
                                        max_length=32, packing=True, max_steps=1))
    assert metrics["packed_sequences"] <= 0.9 * 24 and "joins few rows" not in capsys.readouterr().err


def test_packing_advice_stays_within_the_models_positions() -> None:
    from peftlab.train.build import _packing_advice

    assert "(e.g. 512)" in _packing_advice(100, False, 2048) and "(e.g. 256)" in _packing_advice(100, False, 256)
    assert "the model has no more positions (256); packing saves little" in _packing_advice(256, True, 256)
