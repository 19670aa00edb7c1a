"""Datasets (SST-2 and its sources, generic files, subsets, errors) and batch collation.

Nothing here downloads: the offline SST-2 stand-in is exercised with a fake sdist built in tmp_path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from peftlab import assets
from peftlab.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    CausalLMDataset,
    ClassificationCollator,
    ClassificationDataset,
    DataError,
    load_dataset_spec,
)
from peftlab.data import sst2
from peftlab.data.files import Row, Table


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- SST-2 and its sources -------------------------------------------------------------------


def test_sst2_from_the_shared_glue_files(sst2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    train = load_dataset_spec("sst2", "train", data_dir=sst2_dir)
    assert len(train) == 67349 and Counter(train.labels) == {0: 29780, 1: 37569}
    validation = load_dataset_spec("sst2", "validation", data_dir=sst2_dir)
    assert len(validation) == 872 and Counter(validation.labels) == {0: 428, 1: 444}
    assert validation.num_labels == 2 and validation.label_names == ("negative", "positive")
    assert validation.majority_share() == 444 / 872  # chance level: always "positive"
    assert validation.select([]).majority_share() is None
    assert validation[0] == {"text": "it 's a charming and often affecting journey . ", "label": 1}
    assert f"SST-2 validation: GLUE files in {sst2_dir}" in capsys.readouterr().err


def test_sst2_subset_is_the_same_for_the_same_seed(sst2_dir: Path) -> None:
    first = load_dataset_spec("sst2", "validation", data_dir=sst2_dir, max_samples=50, seed=3)
    again = load_dataset_spec("sst2", "validation", data_dir=sst2_dir, max_samples=50, seed=3)
    larger = load_dataset_spec("sst2", "validation", data_dir=sst2_dir, max_samples=80, seed=3)
    other = load_dataset_spec("sst2", "validation", data_dir=sst2_dir, max_samples=50, seed=4)
    assert len(first) == 50 and first.texts == again.texts and first.labels == again.labels
    assert set(first.texts) <= set(larger.texts)
    assert first.texts != other.texts


def test_sst2_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood film \t1\n")
    write(tmp_path / "validation.tsv", "sentence\tlabel\nbad film \t0\n")
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(tmp_path))
    assert load_dataset_spec("sst2", "validation").texts == ["bad film "]


def test_sst2_data_dir_without_glue_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not hold SST-2 in GLUE's layout: expected train.tsv"):
        load_dataset_spec("sst2", "train", data_dir=tmp_path)


SNIPPETS = [
    ("1", "2.5", "A gem of a movie."),
    ("2", "-1.2", "Tedious and long."),
    ("3", "0.0", "It is a movie."),  # neutral: dropped
    ("4", "-3.0", "Tedious and long."),  # repeated sentence: kept once
    ("5", "1.1", "Clich\u00e9s, but charming."),
] + [(str(i), "1.5" if i % 2 else "-1.5", f"Snippet number {i}.") for i in range(6, 26)]


@pytest.fixture
def fake_vader_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Serve a fake vaderSentiment sdist (with the nested tarball) instead of PyPI's; cache in tmp_path."""
    text = "\r\n".join("\t".join(fields) for fields in SNIPPETS).encode()

    def tar_bytes(name: str, data: bytes) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
        return buffer.getvalue()

    inner = tar_bytes("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", text)
    sdist = write(tmp_path / "vaderSentiment-3.3.2.tar.gz", tar_bytes(sst2._RT_INNER_ARCHIVE, inner))
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    monkeypatch.setattr(sst2, "RT_SNIPPETS_PACKAGE", replace(sst2.RT_SNIPPETS_PACKAGE, sha256=sha))
    monkeypatch.setattr(assets, "download_package", lambda package, dest: write(dest / sdist.name, sdist.read_bytes()))
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return sdist


@pytest.fixture
def no_sst2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No local GLUE files and no hub: SST-2 must come from the offline fallback."""
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    monkeypatch.setattr(sst2, "SHARED_SST2_DIR", tmp_path / "absent")
    monkeypatch.setattr(sst2, "load_from_hub", lambda split: None)


def test_sst2_falls_back_to_rotten_tomatoes_snippets(no_sst2, fake_vader_sdist, capsys) -> None:
    train = load_dataset_spec("sst2", "train")
    validation = load_dataset_spec("sst2", "validation")
    assert "using the offline fallback, Rotten Tomatoes snippets" in capsys.readouterr().err
    assert (len(train), len(validation)) == (21, 2)  # 25 snippets - 1 neutral - 1 repeat; 10% held out
    assert not set(train.texts) & set(validation.texts)
    everything = dict(zip(train.texts + validation.texts, train.labels + validation.labels))
    assert everything["A gem of a movie."] == 1 and everything["Tedious and long."] == 0
    assert "It is a movie." not in everything
    assert "Clich\u00e9s, but charming." in everything  # decoded as UTF-8
    assert "vaderSentiment==3.3.2" in train.source
    assert load_dataset_spec("rt-snippets", "validation").texts == validation.texts


def test_hub_is_skipped_fast_when_unreachable(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "datasets" else find_spec(name, *a))
    monkeypatch.setattr(sst2, "hub_is_reachable", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert sst2.load_from_hub("train") is None
    assert "hub is unreachable" in capsys.readouterr().err


def test_hub_comes_before_the_fallback(no_sst2, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Table(["sentence", "label"], [Row({"sentence": "fine", "label": 1}, "hub row 0"),
                                        Row({"sentence": "dull", "label": 0}, "hub row 1")], "the hub")
    monkeypatch.setattr(sst2, "load_from_hub", lambda split: hub)
    assert load_dataset_spec("sst2", "train").source == "the hub"


def test_real_rt_snippets_if_cached() -> None:
    if not (assets.cache_root() / "datasets" / "rt-snippets").is_dir():
        pytest.skip("the Rotten Tomatoes snippets are not in the cache; `peftlab` fetches them on first use")
    train, validation = (load_dataset_spec("rt-snippets", split) for split in ("train", "validation"))
    assert (len(train), len(validation)) == (9509, 1057)
    assert Counter(train.labels + validation.labels) == {0: 5325, 1: 5241}


# --- generic files ---------------------------------------------------------------------------


def test_directory_with_string_labels_maps_them_alike_in_every_split(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", 'text,label\n"Good, really",pos\nawful,neg\nmeh,neutral\n')
    write(tmp_path / "dev.csv", "text,label\nsplendid,pos\n")
    train = load_dataset_spec(tmp_path, "train")
    validation = load_dataset_spec(tmp_path, "validation")
    assert train.label_names == validation.label_names == ("neg", "neutral", "pos")
    assert train.texts == ["Good, really", "awful", "meh"] and train.labels == [2, 0, 1]
    assert validation.labels == [2] and validation.num_labels == 3


def test_tsv_with_sentence_column_and_int_labels(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", 'sentence\tlabel\nhe said "wow\t1\nno\t0\n')
    write(tmp_path / "validation.tsv", "sentence\tlabel\nyes\t2\n")
    train = load_dataset_spec(tmp_path, "train")
    assert isinstance(train, ClassificationDataset)
    assert train.texts == ['he said "wow', "no"]  # quotes are text in TSV
    assert train.num_labels == 3 and train.label_names == ("0", "1", "2")  # classes seen in any split


def test_jsonl_prompt_response_is_causal_lm(tmp_path: Path) -> None:
    lines = [{"prompt": f"Q{i}:", "response": f" A{i}"} for i in range(10)]
    path = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n\n")
    train, validation = (load_dataset_spec(path, split) for split in ("train", "validation"))
    assert isinstance(train, CausalLMDataset)
    assert (len(train), len(validation)) == (9, 1)  # a single file: 10% held out, always the same
    assert sorted(train.prompts + validation.prompts) == sorted(line["prompt"] for line in lines)
    assert train[0] == {"prompt": train.prompts[0], "response": train.responses[0]}


def test_labelled_data_for_a_causal_lm_asks_for_the_label_name(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "sentence\tlabel\ngood film\tpos\nbad film\tneg\nfine\tpos\n")
    write(tmp_path / "validation.tsv", "sentence\tlabel\nawful\tneg\n")
    train = load_dataset_spec(tmp_path, "train", task="causal-lm")
    assert isinstance(train, CausalLMDataset)
    assert train.prompts == ["Text: good film\nLabel:", "Text: bad film\nLabel:", "Text: fine\nLabel:"]
    assert train.responses == [" pos", " neg", " pos"]
    assert "as prompt/response" in train.source
    # Class ids answer with the class names a trained classifier recorded, when given; else the ids.
    (tmp_path / "ids").mkdir()
    write(tmp_path / "ids" / "train.csv", "text,label\ngreat,1\npoor,0\n")
    write(tmp_path / "ids" / "validation.csv", "text,label\nok,1\n")
    assert load_dataset_spec(tmp_path / "ids", "train", task="causal-lm").responses == [" 1", " 0"]
    named = load_dataset_spec(tmp_path / "ids", "train", task="causal-lm", label_names=("negative", "positive"))
    assert named.responses == [" positive", " negative"]


# --- errors ----------------------------------------------------------------------------------


def test_missing_columns_name_the_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "review,stars\ngood,5\n")
    expected = "keys review, stars match no data format; expected one of .*prompt-response: prompt \\+ response.*labelled: text \\(or sentence\\) \\+ label"
    with pytest.raises(DataError, match=f"train.csv, line 2: {expected}"):
        load_dataset_spec(tmp_path, "train")
    with pytest.raises(DataError, match=f"train.csv, line 2: {expected}"):
        load_dataset_spec(path, "train", task="causal-lm")


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match="train.tsv has no train examples"):
        load_dataset_spec(tmp_path, "train")


def test_labels_outside_the_classes_are_errors(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", "text,label\na,0\nb,1\nc,2\n")
    with pytest.raises(DataError, match="train.csv, line 4: label 2 is outside the classes 0..1 \\(num_labels=2\\)"):
        load_dataset_spec(tmp_path, "train", num_labels=2)
    write(tmp_path / "train.csv", "text,label\na,-1\n")
    with pytest.raises(DataError, match="line 2: label -1 is not a class id; ids start at 0"):
        load_dataset_spec(tmp_path, "train")
    write(tmp_path / "train.csv", "text,label\na,x\nb,y\nc,z\n")
    with pytest.raises(DataError, match="3 classes \\(x, y, z\\) but num_labels=2"):
        load_dataset_spec(tmp_path, "train", num_labels=2)


def test_undecodable_bytes_name_the_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", b"sentence\tlabel\nfine\t1\ncaf\xe9\t0\n")
    with pytest.raises(DataError, match="train.tsv, line 3: byte 0xe9 is not valid UTF-8"):
        load_dataset_spec(tmp_path, "train")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train.csv", "text,label\na,1,extra\n", "line 2: 3 fields, but the header has 2"),
        ("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b",\n', "line 2: not valid JSON"),
        ("train.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2: a text row \\(no 'label' value\\)"),
        ("train.jsonl", '{"text": 7, "label": 1}\n', "line 1: 'text' should be a string"),
        ("train.xml", "<a/>\n", "unsupported file type '.xml'"),
    ],
)
def test_malformed_files_name_the_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        load_dataset_spec(tmp_path / name if name.endswith(".xml") else tmp_path, "train")


def test_unknown_dataset_split_or_missing_split_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Unknown dataset 'imdb': not a file or directory, nor one of sst2, rt-snippets"):
        load_dataset_spec("imdb", "train")
    with pytest.raises(DataError, match="Unknown split 'test'"):
        load_dataset_spec("sst2", "test")
    write(tmp_path / "train.csv", "text,label\na,1\n")
    with pytest.raises(DataError, match="has no validation file: looked for validation.csv"):
        load_dataset_spec(tmp_path, "validation")


def test_a_one_row_file_cannot_hold_out_validation(tmp_path: Path) -> None:
    path = write(tmp_path / "one.csv", "text,label\na,1\n")
    with pytest.raises(DataError, match="every training example has the class '1'"):  # and one class cannot train
        load_dataset_spec(path, "train")
    with pytest.raises(DataError, match="too few to hold out a validation split"):
        load_dataset_spec(path, "validation")


# --- collation -------------------------------------------------------------------------------


def test_classification_batches_pad_truncate_and_carry_labels(tiny_tokenizer) -> None:
    dataset = ClassificationDataset(["good movie", "a bad bad bad bad film"], [1, 0], 2, ("neg", "pos"), "test")
    batch = next(iter(DataLoader(dataset, batch_size=2, collate_fn=ClassificationCollator(tiny_tokenizer, max_length=4))))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[2, 10, 6, 0], [2, 4, 12, 12]]  # [BOS] ..., padded / truncated to 4
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


def test_causal_lm_loss_is_on_the_response_and_eos_only(tiny_tokenizer) -> None:
    collate = CausalLMCollator(tiny_tokenizer, max_length=16)
    batch = collate([{"prompt": "review : good", "response": "positive"}, {"prompt": "bad", "response": "negative"}])
    assert batch["input_ids"].tolist() == [[2, 14, 16, 10, 17, 3], [2, 12, 18, 3, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, -100, 17, 3], [-100, -100, 18, 3, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert IGNORE_INDEX == -100


def test_causal_lm_truncation_keeps_tokens_to_learn_from(tiny_tokenizer) -> None:
    collate = CausalLMCollator(tiny_tokenizer, max_length=6)
    long_prompt = collate.encode("a " * 20, "good")
    assert long_prompt == ([2, 4, 4, 4, 10, 3], 4)  # the whole response + EOS fits; the prompt is cut
    long_both = collate.encode("a " * 20, "good " * 20)
    assert long_both == ([2, 4, 4, 10, 10, 10], 3)  # half each; the cut response has no EOS


def test_pad_equal_to_eos_still_learns_eos() -> None:
    backend = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "hi": 2, "there": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(ValueError, match="no pad token; load it with peftlab.assets.load_model_and_tokenizer"):
        ClassificationCollator(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    batch = CausalLMCollator(tokenizer)([{"prompt": "hi", "response": "there"}, {"prompt": "hi hi hi", "response": "there"}])
    assert batch["labels"].tolist() == [[-100, 3, 0, -100, -100], [-100, -100, -100, 3, 0]]


def test_training_on_one_file_says_which_rows_are_held_out(tmp_path, tiny_tokenizer, capsys) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"the movie {i}", "response": " good"}) + "\n" for i in range(20)))
    train = load_dataset_spec(str(path), "train")
    validation = load_dataset_spec(str(path), "validation")
    assert len(train) == 18 and len(validation) == 2
    assert capsys.readouterr().err.splitlines() == [  # once: when the train split is read
        f"peftlab: {path} is one file: 2 of its 20 rows (a fixed draw) are held out for validation and not trained on; "
        "give a folder with train and validation files to choose them"]
    load_dataset_spec(str(path), "train", held_out=False)  # the whole file: nothing held out, nothing said
    text = tmp_path / "book.txt"
    text.write_text("".join(f"line {i} of the book\n" for i in range(50)))
    load_dataset_spec(str(text), "train", tokenizer=tiny_tokenizer, max_length=8)
    err = capsys.readouterr().err
    assert err.startswith(f"peftlab: {text} is one text: its last ") and "are held out for validation" in err
