"""Issue 27: an adapter trained on an NF4 base (QLoRA) is never loaded silently on a full-precision
base, nor one trained on a full-precision base on a 4-bit one; the export of a QLoRA adapter says
on which base it is exact and measures the error on the other."""

import copy
import warnings

import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model, io
from peftlab.base_gap import BaseMismatchWarning, logit_gap, nf4_gap, probe_inputs
from peftlab.quant import Linear4bit, quantize_model
from train_fixtures import prompt_dir  # noqa: F401
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_llama

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _saved(tmp_path, quantized: bool):
    base = tiny_llama(hidden=64)
    if quantized:
        quantize_model(base)
    model = get_peft_model(base, LoraConfig(**CONFIG))
    perturb(model)
    model.save_pretrained(tmp_path)
    return model


def test_the_file_records_the_base(tmp_path):
    _saved(tmp_path / "q", quantized=True)
    _saved(tmp_path / "f", quantized=False)
    assert io.read_adapter_metadata(tmp_path / "q")[io.QUANTIZATION_KEY] == "nf4"
    assert io.read_adapter_metadata(tmp_path / "f")[io.QUANTIZATION_KEY] == "none"


def test_qlora_adapter_on_full_precision_base_is_refused(tmp_path):
    _saved(tmp_path, quantized=True)
    with pytest.raises(ValueError, match="NF4.*quantize_model"):
        PeftModel.from_pretrained(tiny_llama(hidden=64), tmp_path)
    other = get_peft_model(tiny_llama(hidden=64), LoraConfig(**CONFIG), "first")
    with pytest.raises(ValueError, match="NF4"):
        other.load_adapter(tmp_path, "qlora")
    with pytest.raises(ValueError, match="holds adapters already"):
        other.load_adapter(tmp_path, "qlora", base_quantization="apply")
    with pytest.raises(ValueError, match="use one of"):
        other.load_adapter(tmp_path, "qlora", base_quantization="yes")
    assert list(other.peft_config) == ["first"]


def test_apply_quantizes_the_base_as_recorded(tmp_path):
    trained = _saved(tmp_path, quantized=True)
    batch = tiny_batch(trained)
    loaded = PeftModel.from_pretrained(tiny_llama(hidden=64), tmp_path, base_quantization="apply")
    assert any(isinstance(m, Linear4bit) for m in loaded.modules())
    assert max_diff(logits(loaded, batch), logits(trained, batch)) == 0.0


def test_ignore_warns_with_the_measured_difference(tmp_path):
    trained = _saved(tmp_path, quantized=True)
    with pytest.warns(BaseMismatchWarning, match=r"max abs logit difference (\S+),") as caught:
        loaded = PeftModel.from_pretrained(tiny_llama(hidden=64), tmp_path, base_quantization="ignore")
    # The figure is the adapter on the NF4 base (as trained) vs on this full-precision base.
    expected = logit_gap(trained, loaded, probe_inputs(loaded))
    assert f"max abs logit difference {expected.max_abs:.4g}," in str(caught[0].message)
    assert expected.max_abs > 0
    assert not any(isinstance(m, Linear4bit) for m in loaded.modules())
    other = get_peft_model(tiny_llama(hidden=64), LoraConfig(**CONFIG), "first")
    with pytest.warns(BaseMismatchWarning, match="max abs logit difference"):
        other.load_adapter(tmp_path, "qlora", base_quantization="ignore")
    assert set(other.peft_config) == {"first", "qlora"}


def test_full_precision_adapter_on_4bit_base_is_refused(tmp_path):
    _saved(tmp_path, quantized=False)
    with pytest.raises(ValueError, match="full-precision base, but this base is quantized"):
        PeftModel.from_pretrained(quantize_model(tiny_llama(hidden=64)), tmp_path)
    with pytest.warns(BaseMismatchWarning, match="not measured"):
        PeftModel.from_pretrained(quantize_model(tiny_llama(hidden=64)), tmp_path, base_quantization="ignore")


def test_matching_and_unrecorded_bases_load_without_a_word(tmp_path):
    _saved(tmp_path / "q", quantized=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        PeftModel.from_pretrained(quantize_model(tiny_llama(hidden=64)), tmp_path / "q")
    # HF peft's files record nothing about the base: nothing to check.
    tensors = io.read_adapter_weights(tmp_path / "q")
    io.write_adapter(tmp_path / "hf", io.read_adapter_config(tmp_path / "q"), tensors)
    PeftModel.from_pretrained(tiny_llama(hidden=64), tmp_path / "hf")


def test_nf4_gap_of_the_bare_base_is_its_quantization_error():
    base = tiny_llama(hidden=64)
    gap = nf4_gap(base, lambda b: b)
    reference = quantize_model(tiny_llama(hidden=64))
    assert gap == logit_gap(reference, tiny_llama(hidden=64), probe_inputs(base))
    assert gap.max_abs > 0 and 0 < gap.relative < 1
    assert not any(isinstance(m, Linear4bit) for m in base.modules())  # left as it was
    assert torch.equal(logits(base, tiny_batch(base)), logits(tiny_llama(hidden=64), tiny_batch(base)))


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def test_cli_qlora_adapter_export_and_merge_keep_the_tokenizer_and_state_the_base(tiny_tokenizer, prompt_dir, tmp_path, capsys):
    """`peftlab train` saves the tokenizer (and chat template) with the adapter, `merge` with the merged
    model; `export` of a QLoRA adapter says it is exact on the NF4 base and gives the error measured
    on the full-precision base, which HF peft (the oracle) reproduces."""
    import json

    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab import AutoPeftModelForCausalLM
    from peftlab.cli import main
    from peftlab.export import FULL_PRECISION_GAP_KEY
    from train_fixtures import save_tiny_model

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TEMPLATE
    base_dir = save_tiny_model(tmp_path / "base", tokenizer, "llama")
    adapter, exported, merged = tmp_path / "adapter", tmp_path / "exported", tmp_path / "merged"
    assert main(["train", "--model", str(base_dir), "--task", "causal-lm", "--dataset", str(prompt_dir), "--method", "qlora",
                 "--out", str(adapter), "--max-steps", "2", "--batch-size", "8", "--max-length", "32", "--lr", "1e-2",
                 "--lora-dropout", "0"]) == 0
    assert AutoTokenizer.from_pretrained(adapter).chat_template == TEMPLATE
    assert main(["merge", "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert AutoTokenizer.from_pretrained(merged).chat_template == TEMPLATE

    assert main(["export", "--to", "lora", "--adapter", str(adapter), "--out", str(exported)]) == 0
    err = capsys.readouterr().err
    readme = (exported / "README.md").read_text()
    assert "exact on the NF4 (4-bit) base" in readme and "On the full-precision base" in readme
    recorded = json.loads(io.read_adapter_metadata(exported)[FULL_PRECISION_GAP_KEY])
    assert f"max abs logit difference {recorded['max_abs_logit']:.4g}" in readme and recorded["max_abs_logit"] > 0
    assert "max abs logit difference" in err

    on_nf4 = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    full = AutoModelForCausalLM.from_pretrained(base_dir)
    served = peft.PeftModel.from_pretrained(full, str(exported)).eval()
    gap = logit_gap(on_nf4, served, probe_inputs(full, AutoTokenizer.from_pretrained(adapter)))
    assert gap.max_abs == pytest.approx(recorded["max_abs_logit"], rel=1e-4)
    assert gap.relative == pytest.approx(recorded["relative_logit"], rel=1e-4)
