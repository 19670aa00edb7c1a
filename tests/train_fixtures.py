"""Tiny model folders and datasets on disk for the training and CLI tests (no downloads).

    model_dir = save_tiny_model(tmp_path / "bert", tiny_tokenizer, "bert")   # config + weights + tokenizer
    data_dir = write_sentiment_data(tmp_path / "data")                       # train.tsv, validation.tsv
    data_dir = write_prompt_data(tmp_path / "lm")                            # train.jsonl, validation.jsonl
    options = tiny_options(bert_dir, sentiment_dir, tmp_path / "out", method="dora")

The session fixtures (``bert_dir``, ``gpt2_dir``, ``llama_dir``, ``sentiment_dir``, ``prompt_dir``)
are imported by the test modules that use them.

The sentences use only the words of conftest's ``tiny_tokenizer``; the label is whether a
positive word occurs, so a tiny model can learn it in a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tiny_models import BUILDERS

from peftlab.train import TrainOptions

POSITIVE = ("good", "great")
NEGATIVE = ("bad", "awful")
FILLERS = ("a", "the", "movie", "film", "is", "was", "review")


def save_tiny_model(folder: Path, tokenizer, kind: str = "bert", seed: int = 0) -> Path:
    model = BUILDERS[kind](seed=seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.choices(FILLERS, k=rng.randint(2, 5)) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_sentiment_data(folder: Path, n_train: int = 64, n_validation: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n_train), ("validation", n_validation)):
        labels = [i % 2 for i in range(count)]
        rows = [f"{_sentence(rng, label)}\t{label}" for label in labels]
        (folder / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return folder


def write_prompt_data(folder: Path, n_train: int = 32, n_validation: int = 8, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n_train), ("validation", n_validation)):
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(count):
                label = i % 2
                row = {"prompt": _sentence(rng, label) + " sentiment :", "response": "positive" if label else "negative"}
                f.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("bert"), tiny_tokenizer, "bert")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), tiny_tokenizer, "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), tiny_tokenizer, "llama")


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    return write_sentiment_data(tmp_path_factory.mktemp("sentiment"))


@pytest.fixture(scope="session")
def prompt_dir(tmp_path_factory) -> Path:
    return write_prompt_data(tmp_path_factory.mktemp("prompts"))


def tiny_options(model_dir: Path, data_dir: Path, out: Path, **changes) -> TrainOptions:
    """Options for a run of a few steps on a tiny model, with no dropout unless asked."""
    values = dict(model=str(model_dir), dataset=str(data_dir), out=str(out), batch_size=8, epochs=1,
                  max_length=16, eval_batch_size=16, log_every=1)
    if changes.get("method") != "full":  # full fine-tuning has no adapter dropout
        values["lora_dropout"] = 0.0
    return TrainOptions(**{**values, **changes})
