"""Issue 26, class 6: method defaults that do nothing are not silent -- LongLoRA with no context
extension is refused (an explicit rope_scale=1 trains at the model's length, with a warning); merging
with --quantize nf4 an adapter trained on a full-precision base is refused."""

from __future__ import annotations

import pytest
from tiny_models import tiny_llama
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

from peftlab import get_peft_model
from peftlab.cli import main
from peftlab.lab.sweep import plan_runs
from peftlab.methods.longlora import LongLoraConfig
from peftlab.train.loop import run_training


def test_longlora_without_an_extension_is_refused():
    with pytest.raises(ValueError, match="neither rope_scale nor target_length says how far"):
        get_peft_model(tiny_llama(hidden=32), LongLoraConfig(task_type="CAUSAL_LM"))
    with pytest.warns(UserWarning, match="LongLoRA at rope_scale 1 extends no context"):
        get_peft_model(tiny_llama(hidden=32), LongLoraConfig(task_type="CAUSAL_LM", rope_scale=1.0))
    model = get_peft_model(tiny_llama(hidden=32), LongLoraConfig(task_type="CAUSAL_LM", target_length=64))
    assert model.get_base_model().config.max_position_embeddings == 64


def test_a_comparison_runs_longlora_at_the_models_length_and_records_it():
    planned = plan_runs({"model": "x"}, ["longlora"], family_of=lambda model: "llama")
    assert planned[0].options["rope_scale"] == 1.0
    extended = plan_runs({"model": "x", "target_length": 64}, ["longlora"], family_of=lambda model: "llama")
    assert extended[0].options.get("rope_scale") is None  # given an extension, the comparison adds nothing


def test_merging_a_full_precision_adapter_into_a_4_bit_base_is_refused(bert_dir, sentiment_dir, tmp_path, capsys):  # noqa: F811
    adapter = tmp_path / "adapter"
    run_training(tiny_options(bert_dir, sentiment_dir, adapter, max_steps=1))
    code = main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--quantize", "nf4"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on a full-precision base" in err and not (tmp_path / "merged").exists()
