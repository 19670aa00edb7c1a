"""Inputs that used to give a silently wrong result now give the right one, or a clear refusal
(issue 14, item 2): class names, what ``eval`` evaluates, 4-bit bases, options given twice."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from test_cli import run_cli, tiny_flags
from train_fixtures import bert_dir, sentiment_dir  # noqa: F401
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peftlab import LoraConfig, PeftModel, make_method_config
from peftlab.data import DataError, load_dataset_spec
from peftlab.train.build import trained_label_names


def assert_refused(code: int, err: str, command: str, *fragments: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"peftlab {command}: error:"), last
    for fragment in fragments:
        assert fragment in last, last


@pytest.mark.parametrize(
    "rows, message",
    [
        ("a good movie\t1\nthe bad film\t\nawful review\t0\n", "line 3: the label is blank"),
        ("a good movie\t1\nthe bad film\tnegative\n", "line 3: label 'negative' is a name, but"),
    ],
)
def test_blank_or_mixed_labels_are_refused(tmp_path, rows, message):
    path = tmp_path / "data.tsv"
    path.write_text("sentence\tlabel\n" + rows * 3)
    with pytest.raises(DataError, match=message):
        load_dataset_spec(path, "train")


def _named_data(folder, sentiment_dir):
    """The sentiment data with class names instead of ids."""
    folder.mkdir()
    for split in ("train", "validation"):
        text = (sentiment_dir / f"{split}.tsv").read_text()
        text = text.replace("\t0\n", "\tnegative\n").replace("\t1\n", "\tpositive\n")
        (folder / f"{split}.tsv").write_text(text)
    return folder


@pytest.fixture(scope="module")
def named_run(tmp_path_factory, bert_dir, sentiment_dir):
    """An adapter trained on class names (negative, positive), with --max-length 12 (not the default)."""
    root = tmp_path_factory.mktemp("named")
    data = _named_data(root / "data", sentiment_dir)
    adapter = root / "adapter"
    flags = tiny_flags(bert_dir, data, adapter)
    flags[flags.index("--max-length") + 1] = "12"
    from peftlab.cli import main

    assert main(["train", *flags, "--max-steps", "6"]) == 0
    return adapter, data


def test_class_names_are_saved_with_the_adapter_and_reused_by_eval(named_run, bert_dir, tmp_path, capsys):
    adapter, data = named_run
    only_positive = tmp_path / "positive.tsv"
    rows = [line for line in (data / "validation.tsv").read_text().splitlines()[1:] if line.endswith("\tpositive")]
    only_positive.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    names = trained_label_names(str(adapter), str(bert_dir))
    assert names == ("negative", "positive")
    assert set(load_dataset_spec(only_positive, "validation", label_names=names, held_out=False).labels) == {1}
    code, out, _ = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(only_positive))
    assert code == 0
    # The oracle: the adapter's own predictions, class 1 being "positive" as in training.
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    texts = [row.split("\t")[0] for row in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=12, return_token_type_ids=False)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    assert json.loads(out)["eval_accuracy"] == pytest.approx(float((predicted == 1).float().mean()))
    unknown = tmp_path / "neutral.tsv"
    unknown.write_text("sentence\tlabel\nthe movie was good\tneutral\n")
    code, _, err = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(unknown))
    assert_refused(code, err, "eval", "label 'neutral' is not one of the classes the model was trained on (negative, positive)")


def test_eval_of_a_file_takes_all_of_it_and_reuses_the_runs_settings(named_run, tmp_path, capsys):
    adapter, data = named_run
    whole = tmp_path / "all.tsv"
    whole.write_text((data / "train.tsv").read_text())
    code, out, err = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(whole))
    assert code == 0 and json.loads(out)["examples"] == 64  # not the 10% held out of a training file
    assert "evaluating 64 examples of" in err and "max_length=12" in err
    # With no --dataset and no --max-length, eval is the training run's own final evaluation.
    code, out, err = run_cli(capsys, "eval", "--adapter", str(adapter))
    trained = json.loads((adapter / "metrics.json").read_text())
    assert code == 0 and json.loads(out)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    assert f"dataset={data}" in err


def test_a_qlora_adapter_is_evaluated_and_merged_on_its_4bit_base(bert_dir, sentiment_dir, tmp_path, capsys):
    adapter = tmp_path / "qlora"
    code, out, _ = run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, adapter), "--method", "qlora", "--max-steps", "2")
    assert code == 0
    trained = json.loads(out)
    code, out, err = run_cli(capsys, "eval", "--adapter", str(adapter))  # no --quantize
    assert code == 0 and "quantize=nf4" in err
    assert json.loads(out)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)
    merged = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", "--adapter", str(adapter), "--out", str(merged))  # no --quantize
    assert code == 0 and "trained on a nf4 base" in err
    code, out, _ = run_cli(capsys, "eval", "--model", str(merged), "--dataset", str(sentiment_dir), "--max-length", "16")
    assert code == 0 and json.loads(out)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-4)


def test_merge_into_the_adapters_own_folder_is_refused(named_run, capsys):
    adapter, _ = named_run
    before = sorted(p.name for p in adapter.iterdir())
    code, _, err = run_cli(capsys, "merge", "--adapter", str(adapter), "--out", str(adapter))
    assert_refused(code, err, "merge", "is the adapter's own folder")
    assert sorted(p.name for p in adapter.iterdir()) == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method-option", "use_dora=maybe"], "use_dora must be true or false (a bool), got 'maybe' (str)"),
        (["--method-option", "r=4", "--r", "16"], "r is given twice: --r 16 and --method-option r=4"),
        (["--method-option", "rank_pattern={nomatch: 4}"], "rank_pattern key 'nomatch' matches none of the"),
    ],
)
def test_method_options_that_would_be_misread_are_refused(bert_dir, sentiment_dir, tmp_path, capsys, flags, message):
    code, _, err = run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, tmp_path / "out"), "--max-steps", "1", *flags)
    assert_refused(code, err, "train", message)


def test_compare_with_an_empty_methods_list_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "compare", "--methods", "", "--out", str(tmp_path / "cmp"))
    assert_refused(code, err, "compare", "--methods is empty")
    assert not (tmp_path / "cmp").exists()


def test_a_model_folder_without_tokenizer_files_is_refused(bert_dir, sentiment_dir, tmp_path, capsys):
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / name, model / name)
    code, _, err = run_cli(capsys, "train", *tiny_flags(model, sentiment_dir, tmp_path / "out"), "--max-steps", "1")
    assert_refused(code, err, "train", "has no tokenizer files", "tokenizer.save_pretrained")


def test_qlora_built_by_name_warns_that_quantizing_the_base_is_the_callers(bert_dir, sentiment_dir, tmp_path, capsys):
    """``make_method_config("qlora")`` is a LoraConfig: on a model nobody quantized it would train LoRA on the fp32
    weights (a benchmark of ours once did, unawares). It says so; the training engine, which quantizes first, does not."""
    message = (r"method 'qlora' trains its adapter on a base quantized to NF4: this is the adapter's config alone "
               r"\(a LoraConfig\); quantize the model first with peftlab\.quant\.quantize_model\(model\)")
    with pytest.warns(UserWarning, match=message):
        config = make_method_config("qlora", r=4)
    assert type(config) is LoraConfig and config.r == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_method_config("lora", r=4)
        code, _, _ = run_cli(capsys, "train", *tiny_flags(bert_dir, sentiment_dir, tmp_path / "qlora"), "--method", "qlora",
                             "--max-steps", "1")
    assert code == 0 and not [w for w in caught if "trains its adapter on a base quantized" in str(w.message)]
