"""QLoRA interop with HF peft on a bitsandbytes 4-bit base (CPU), both ways, and on the dense base.

HF's side is the usual QLoRA recipe: transformers loads the tiny model saved to disk with
``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, fp32 compute)``. Ours quantizes the same
fp32 weights with ``quantize_model``; the packed bytes and statistics are identical (checked), so
both bases dequantise to the same weights and the logits must agree to rounding (1e-4).

Widths are multiples of 64: bitsandbytes 0.50.2's CPU dequantisation mis-scales 2-D weights whose
last dim is not a multiple of the blocksize. And bitsandbytes' CPU *inference* fast path (on
AVX512-BF16 machines, in eval mode without grad) repacks the weight with bf16 block scales, which
moves the logits by ~2e-3: an approximation of the stored model, turned off here so that both
libraries compute with the exact dequantised weights.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peftlab
from method_table import METHOD_CASES, ON_4BIT
from peftlab import PeftModel, get_peft_model
from peftlab.quant import Linear4bit, quantize_model
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_gpt2, tiny_llama

bnb = pytest.importorskip("bitsandbytes")

ATOL = 1e-4
MODELS = {
    "llama": (tiny_llama, "all-linear"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),  # Conv1D: transposed to [out, in] by both libraries
}
CASES = [(model, case.name) for model in MODELS for case in ON_4BIT if case.hf is not None]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Per model: the fp32 model (hidden 64) and the folder it is saved in, for transformers to quantize."""
    models = {}
    for name, (builder, _) in MODELS.items():
        model = builder(hidden=64)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        models[name] = (model, folder)
    return models


def hf_4bit_base(folder):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu", dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the bf16-scale inference path (see the module doc)
    return model.eval()


def adapter_config(model_name: str, method: str, library):
    case = METHOD_CASES[method]
    make = case.hf_config if library is peft else case.config
    return make(target_modules=copy.deepcopy(MODELS[model_name][1]), task_type="CAUSAL_LM")








def loaded_quietly(load):
    """Run ``load()``; a warning about missing or unexpected keys (HF only warns) fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load()
    messages = [str(w.message) for w in caught]
    assert [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()] == []
    return model.eval()


@pytest.mark.parametrize("model_name", list(MODELS))
def test_both_libraries_quantize_to_the_same_bytes(dense, model_name):
    model, folder = dense[model_name]
    theirs, ours = hf_4bit_base(folder), quantize_model(copy.deepcopy(model))
    layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers and {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)} == set(layers)
    for name, layer in layers.items():
        mine, state = ours.get_submodule(name), layer.weight.quant_state
        assert torch.equal(mine.packed, layer.weight.data), name
        assert torch.equal(mine.absmax_q, state.absmax) and torch.equal(mine.absmax_scale, state.state2.absmax)
        assert torch.equal(mine.absmax_offset, state.offset)
    batch = tiny_batch(model)
    assert max_diff(logits(ours, batch), logits(theirs, batch)) <= 1e-5


@pytest.mark.parametrize("model_name,method", CASES)
def test_peftlab_qlora_adapter_loads_in_hf_peft_on_bitsandbytes(dense, tmp_path, model_name, method):
    model, folder = dense[model_name]
    batch = tiny_batch(model)
    ours = get_peft_model(quantize_model(copy.deepcopy(model)), adapter_config(model_name, method, peftlab))
    perturb(ours.eval())
    ours.save_pretrained(tmp_path)

    theirs = loaded_quietly(lambda: peft.PeftModel.from_pretrained(hf_4bit_base(folder), str(tmp_path)))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    hf_keys = peft.get_peft_model_state_dict(theirs)
    assert sorted(saved) == sorted(hf_keys)
    assert all(torch.equal(hf_keys[k], v) for k, v in saved.items())
    expected = logits(theirs, batch)
    assert max_diff(logits(ours, batch), expected) <= ATOL
    with theirs.disable_adapter():
        assert max_diff(expected, logits(theirs, batch)) > 1e-2  # the adapter really moved the output


@pytest.mark.parametrize("model_name,method", CASES)
def test_hf_peft_qlora_adapter_loads_in_peftlab_on_its_4bit_base(dense, tmp_path, model_name, method):
    model, folder = dense[model_name]
    batch = tiny_batch(model)
    theirs = peft.get_peft_model(hf_4bit_base(folder), adapter_config(model_name, method, peft)).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)

    ours = loaded_quietly(lambda: PeftModel.from_pretrained(quantize_model(copy.deepcopy(model)), tmp_path))
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == sorted(ours.adapter_state_dict("default"))
    expected = logits(theirs, batch)
    assert max_diff(logits(ours, batch), expected) <= ATOL
    with ours.disable_adapter():
        assert max_diff(expected, logits(ours, batch)) > 1e-2


@pytest.mark.parametrize("model_name,method", CASES)
def test_qlora_adapter_is_an_ordinary_adapter_for_the_dense_base(dense, tmp_path, model_name, method):
    """A QLoRA adapter loads, with every key used, on the fp32 model in both libraries.

    Its outputs there differ from the 4-bit ones only by the quantization error: for LoRA each layer's
    output differs by exactly x (W - Q(W))ᵀ, the error that alone moves the base's logits by
    ``shift``; through the adapted network it grows or shrinks (0.5x to 2.1x of ``shift`` over 10
    seeds of each model for LoRA and DoRA, up to 4.7x for rsLoRA, whose larger scale makes the
    adapter's part larger), so the bound is 6x ``shift``. And it stays small next to what the adapter
    does (at most 0.34 of it over those seeds; bound 0.5).
    """
    model, _ = dense[model_name]
    batch = tiny_batch(model)
    quantized = quantize_model(copy.deepcopy(model))
    qlora = get_peft_model(copy.deepcopy(quantized), adapter_config(model_name, method, peftlab))
    perturb(qlora.eval())
    qlora.save_pretrained(tmp_path)
    on_4bit = logits(qlora, batch)
    shift = max_diff(logits(model, batch), logits(quantized, batch))

    # Asked for explicitly: by default peftlab refuses (issue 27; tests/test_base_quantization.py).
    ours = loaded_quietly(lambda: PeftModel.from_pretrained(copy.deepcopy(model), tmp_path, base_quantization="ignore"))
    theirs = loaded_quietly(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)))
    assert max_diff(logits(ours, batch), logits(theirs, batch)) <= 1e-5
    difference = max_diff(logits(ours, batch), on_4bit)
    assert 0 < difference <= 6 * shift
    assert difference < 0.5 * max_diff(on_4bit, logits(quantized, batch))
