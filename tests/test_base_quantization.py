"""Issue 27: an adapter trained on an NF4 base (QLoRA) is never loaded silently on a full-precision
base, nor one trained on a full-precision base on a 4-bit one; the export of a QLoRA adapter says
on which base it is exact and measures the error on the other."""

import warnings

import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model, io
from peftlab.base_gap import BaseMismatchWarning, logit_gap, nf4_gap, probe_inputs
from peftlab.quant import Linear4bit, quantize_model
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
