"""Shared fixtures: the SST-2 files (shared data, never in the repository) and a tiny tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

TINY_VOCAB = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + (
    "a the movie film is was good great bad awful review sentiment : positive negative".split()
)


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    """SST-2 in GLUE's layout: ``$PEFTLAB_DATA_DIR``, else ``shared/data/sst2`` beside the checkout."""
    configured = os.environ.get("PEFTLAB_DATA_DIR")
    folder = Path(configured) if configured else Path(__file__).resolve().parents[1].parent / "shared/data/sst2"
    if not (folder / "train.tsv").is_file() or not (folder / "validation.tsv").is_file():
        pytest.skip(f"SST-2 not found in {folder}; set PEFTLAB_DATA_DIR to a folder with train.tsv and validation.tsv")
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``TINY_VOCAB`` that prepends [BOS]; pad [PAD] (id 0), eos [EOS] (id 3)."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
