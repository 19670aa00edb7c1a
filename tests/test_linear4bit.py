"""Linear4bit (frozen NF4 base layer), its base-layer view, and quantize_model on tiny models."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab import base
from peftlab.base import LossyMergeWarning
from peftlab.quant import (
    Linear4bit,
    Linear4bitView,
    dequantize_model,
    dequantize_nf4,
    model_size_bytes,
    quantize_model,
    quantize_nf4,
)


def _linear(in_features=96, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.bias.normal_() if bias else None
    return layer


def _gpt2(cls=transformers.GPT2LMHeadModel, **extra):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_is_linear_with_the_dequantised_weight(dtype):
    layer = Linear4bit.from_module(_linear())
    x = torch.randn(3, 5, 96).to(dtype)
    expected = F.linear(x, dequantize_nf4(layer.state, dtype), layer.bias.to(dtype))
    out = layer(x)
    assert out.dtype == dtype
    assert torch.equal(out, expected)
    assert torch.equal(layer.to_linear(dtype)(x), expected)


def test_gradient_reaches_the_input_and_never_the_weight():
    layer = Linear4bit.from_module(_linear())
    w = layer.dequantize()
    x = torch.randn(4, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    out.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, w, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert all(not p.requires_grad for p in layer.parameters())
    # The dequantised weight is never kept: no full-size float tensor lives on the layer...
    assert all(not b.is_floating_point() or b.numel() < w.numel() for b in layer.buffers())
    # ... nor is one saved for backward.
    assert all(t.numel() < w.numel() for t in saved)


def test_bias_gradient_when_unfrozen():
    layer = Linear4bit.from_module(_linear())
    layer.bias.requires_grad_(True)
    layer(torch.randn(2, 3, 96)).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((40,), 6.0))


def test_conv1d_is_quantized_in_linear_convention():
    torch.manual_seed(0)
    conv = Conv1D(40, 96)  # GPT-2 layout: weight [in=96, out=40]
    with torch.no_grad():
        conv.bias.normal_()
    layer = Linear4bit.from_module(conv)
    assert (layer.in_features, layer.out_features, layer.source_cls) == (96, 40, Conv1D)
    assert torch.equal(layer.state.packed, quantize_nf4(conv.weight.T).packed)
    with torch.no_grad():
        conv.weight.copy_(layer.dequantize().T)  # the dequantised Conv1D
    x = torch.randn(3, 96)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-6, atol=1e-6)


def test_rejects_other_module_types():
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        Linear4bit.from_module(nn.Embedding(10, 4))


def test_state_dict_round_trip_and_device_moves():
    layer = Linear4bit.from_module(_linear())
    sd = layer.state_dict()
    assert {"packed", "absmax_q", "absmax_scale", "absmax_offset", "bias", "_extra_state"} <= set(sd)
    other = Linear4bit.from_module(_linear(seed=1))
    version = other.quant_version
    other.load_state_dict(sd)
    assert other.quant_version > version
    x = torch.randn(2, 96)
    assert torch.equal(other(x), layer(x))
    # A state saved with another layout (no double quantization) is adopted, not rejected.
    plain = Linear4bit.from_module(_linear(seed=2), double_quant=False, blocksize=128)
    other.load_state_dict(plain.state_dict())
    assert (other.double_quant, other.blocksize) == (False, 128) and torch.equal(other(x), plain(x))

    layer.to("cpu").to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.absmax_scale.dtype == torch.float32 and layer.packed.dtype == torch.uint8


def test_loading_a_state_of_another_shape_is_a_clear_error():
    layer = Linear4bit.from_module(_linear())
    wrong = Linear4bit.from_module(_linear(in_features=64))
    with pytest.raises(ValueError, match=r"\[out, in\] = \[40, 64\].*\[40, 96\]"):
        layer.load_state_dict(wrong.state_dict())
    with pytest.raises(ValueError, match=r"shape \(40, 64\).*\[40, 96\]"):
        layer.load_state(wrong.state)
    sd = wrong.state_dict()
    del sd["_extra_state"]
    with pytest.raises(ValueError, match="another shape"):
        layer.load_state_dict(sd, strict=False)


def test_view_is_registered_and_serves_adapters():
    layer = Linear4bit.from_module(_linear())
    view = base.base_view(layer)
    assert isinstance(view, Linear4bitView) and base.is_linear_like(layer) and not view.fan_in_fan_out
    assert (view.in_features, view.out_features) == (96, 40)
    assert (view.dtype, view.device) == (torch.float32, torch.device("cpu"))
    assert view.bias is layer.bias
    assert torch.equal(view.weight(torch.bfloat16), layer.dequantize(torch.bfloat16))
    x = torch.randn(2, 96)
    assert torch.equal(view.forward_no_bias(x), F.linear(x, view.weight()))
    assert torch.equal(view.forward(x), layer(x))


def test_view_add_to_weight_requantizes_and_warns_with_the_error():
    layer = Linear4bit.from_module(_linear())
    view = base.base_view(layer)
    before, version = view.weight(), view.weight_version()
    delta = torch.randn(40, 96) * 0.01
    with pytest.warns(LossyMergeWarning, match=r"lossy \(max abs error ([0-9.e-]+)") as record:
        view.add_to_weight(delta)
    reported = float(str(record[0].message).split("max abs error ")[1].split(",")[0])
    assert record[0].message.max_abs_error == pytest.approx(reported, rel=1e-3)
    assert view.weight_version() > version
    assert 0 < reported < 0.1
    assert (view.weight() - (before + delta)).abs().max().item() == pytest.approx(reported, rel=1e-3)


def test_quantize_model_gpt2_skips_embeddings_norms_and_head():
    model = _gpt2()
    ids = torch.randint(0, 100, (2, 8))
    ref = model(ids).logits
    size = model_size_bytes(model)
    assert quantize_model(model) is model
    blocks = model.transformer.h
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert isinstance(blocks[0].get_submodule(name), Linear4bit)
    assert type(model.transformer.wte) is nn.Embedding and type(model.transformer.ln_f) is nn.LayerNorm
    assert type(model.lm_head) is nn.Linear
    assert model.peftlab_quantization == {"quant_type": "nf4", "blocksize": 64, "double_quant": True,
                                          "skip_modules": ["score", "classifier", "lm_head"]}
    out = model(ids).logits
    assert (out - ref).abs().max() < 0.1
    assert model_size_bytes(model) < size
    assert sum(base.is_linear_like(m) for m in model.modules()) == 9  # 8 quantized + the head


def test_quantize_model_llama_and_classification_heads():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=100, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    llama = quantize_model(transformers.LlamaForSequenceClassification(cfg), compute_dtype=torch.bfloat16)
    layer = llama.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert isinstance(layer.get_submodule(name), Linear4bit)
        assert layer.get_submodule(name).compute_dtype == torch.bfloat16
    assert type(llama.score) is nn.Linear and type(layer.input_layernorm) is not Linear4bit

    # An explicit skip_modules replaces the default heads list (as transformers' llm_int8_skip_modules does).
    gpt2 = quantize_model(_gpt2(transformers.GPT2ForSequenceClassification, num_labels=2), skip_modules=["mlp"])
    assert type(gpt2.transformer.h[0].mlp.c_fc) is Conv1D and isinstance(gpt2.score, Linear4bit)
    assert isinstance(gpt2.transformer.h[0].attn.c_attn, Linear4bit)
    assert gpt2.peftlab_quantization["skip_modules"] == ["mlp"]


def test_view_adding_zero_keeps_the_weight_exactly():
    layer = Linear4bit.from_module(_linear())
    view = base.base_view(layer)
    before, version = layer.packed.clone(), view.weight_version()
    view.add_to_weight(torch.zeros(40, 96))
    assert torch.equal(layer.packed, before) and view.weight_version() == version


def test_state_dict_is_all_tensors_and_survives_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    layer = Linear4bit.from_module(_linear())
    sd = layer.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    safetensors_torch.save_file(sd, tmp_path / "layer.safetensors")
    other = Linear4bit.from_module(_linear(seed=1))
    other.load_state_dict(safetensors_torch.load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(2, 96)
    assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=str)
def test_dequantize_model_restores_dense_layers_with_the_exact_weights(dtype):
    model = quantize_model(_gpt2(), compute_dtype=torch.float32)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    ids = torch.randint(0, 100, (2, 8))
    before = model(ids).logits
    assert dequantize_model(model, dtype) is model
    assert not hasattr(model, "peftlab_quantization")
    for name, layer in quantized.items():
        dense = model.get_submodule(name)
        assert type(dense) is Conv1D  # GPT-2's own class again, weight [in, out]
        assert torch.equal(dense.weight, layer.dequantize(dtype).T) and torch.equal(dense.bias, layer.bias.to(dense.bias.dtype))
    if dtype is None:
        assert torch.equal(model(ids).logits, before)
    linear = Linear4bit.from_module(_linear()).to_dense(torch.bfloat16)
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.bfloat16


def test_quantize_model_copies_the_tensors_it_keeps_and_their_ties():
    """The full-precision tensors left are copied (releasing a memory-mapped checkpoint), ties kept."""
    model = _gpt2()
    wte = model.transformer.wte.weight
    before = {name: t.data_ptr() for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    quantize_model(model)
    after = {name: t.data_ptr() for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert set(before) & set(after) and all(after[n] != before[n] for n in set(before) & set(after))
    assert model.transformer.wte.weight is wte and model.lm_head.weight is wte
