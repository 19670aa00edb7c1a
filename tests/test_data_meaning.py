"""Issue 26, class 3: data that cannot mean what the user thinks is refused or named -- a column or
key given twice, a training set of one class, blank texts (counted; refused above a share), and
labels that do not fit a saved classifier head (a peftlab error, not transformers' traceback)."""

from __future__ import annotations

import pytest
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

from peftlab.assets import AssetError, load_model_and_tokenizer
from peftlab.data import load_dataset_spec
from peftlab.data.checks import BLANK_SHARE_LIMIT
from peftlab.data.errors import DataError

ROWS = [("good film", "1"), ("bad film", "0")] * 20


def write(path, header: str, rows, separator: str = ","):
    path.write_text(header + "\n" + "".join(separator.join(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix, separator", [(".csv", ","), (".tsv", "\t")])
def test_a_column_named_twice_is_refused(suffix, separator, tmp_path):
    path = write(tmp_path / f"data{suffix}", separator.join(["text", "label", "label"]),
                 [(text, label, "0") for text, label in ROWS], separator)
    with pytest.raises(DataError, match=rf"{path}, line 1: the header names the column 'label' twice"):
        load_dataset_spec(path)


def test_a_json_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "good film", "label": 1}\n' * 20 + '{"text": "bad", "label": 0, "label": 1}\n')
    with pytest.raises(DataError, match=rf"{path}, line 21: the key 'label' is given twice"):
        load_dataset_spec(path)


def test_a_training_set_of_one_class_is_refused(tmp_path):
    path = write(tmp_path / "data.csv", "text,label", [("good film", "positive")] * 40)
    with pytest.raises(DataError, match="every training example has the class 'positive'; a classifier needs"):
        load_dataset_spec(path, "train")
    assert len(load_dataset_spec(path, "validation")) == 4  # a validation split of one class is fine
    two = write(tmp_path / "two.csv", "text,label", ROWS)
    assert len(load_dataset_spec(two, "train", max_samples=1)) == 1  # one drawn example: the data has two classes


def test_blank_texts_are_counted_and_refused_above_the_share(tmp_path, capsys):
    few = write(tmp_path / "few.csv", "text,label", [*ROWS, *[("good film", "1")] * 59, (" ", "0")])
    assert len(load_dataset_spec(few, held_out=False)) == 100
    assert f"{few} (all 100 rows): 1 of 100 rows have a blank 'text' (first: {few}, line 101)" in capsys.readouterr().err
    blank = int(100 * BLANK_SHARE_LIMIT) + 1
    many = write(tmp_path / "many.csv", "text,label", [*ROWS, *[("good film", "1")] * (60 - blank), *[("", "0")] * blank])
    with pytest.raises(DataError, match=f"{blank} of 100 rows .* have a blank 'text'"):
        load_dataset_spec(many, held_out=False)


def test_a_blank_response_is_counted_too(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text('{"prompt": "Q", "response": " "}\n' * 20)
    with pytest.raises(DataError, match="20 of 20 rows .* have a blank 'response'"):
        load_dataset_spec(path, task="causal-lm", held_out=False)


def test_labels_that_do_not_fit_the_saved_head_are_a_peftlab_error(bert_dir):  # noqa: F811
    with pytest.raises(AssetError, match="is a classifier whose saved head has 2 classes .* but the data has 3"):
        load_model_and_tokenizer(bert_dir, "seq-cls", num_labels=3)
    assert load_model_and_tokenizer(bert_dir, "seq-cls", num_labels=2)[0].config.num_labels == 2
