"""Every method of the table that runs on a 4-bit base (QLoRA, QDoRA, ...): on an NF4 base
(``quantize_model``), through the base-layer view.

The reference for every property is the *dequantised* base: a dense model holding exactly the
weights the 4-bit layers compute with (``dequantize_model``). Checked on a GPT-2 (Conv1D) and a
Llama (nn.Linear) model: outputs at init, which tensors train, disabling, save/load, fp32 and
bf16, parameter counts, the fused autograd path and its gradients, merging (exact into the
dequantised copy, lossy and warned into 4 bits), and ``peftlab merge --quantize nf4``.
"""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_fixtures import bert_dir, sentiment_dir  # noqa: F401
from transformers import AutoModelForSequenceClassification

from method_table import METHOD_CASES, ON_4BIT
from peftlab import PeftModel, get_peft_model
from peftlab.base import LossyMergeWarning
from peftlab.cli import main
from peftlab.quant import Linear4bit, dequantize_model, quantize_model
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_gpt2, tiny_llama

MODELS = {
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
CASES = [(model, case.name) for model in MODELS for case in ON_4BIT]
# LoRA's and DoRA's own fused path, checked against their formulas.
FUSED_CASES = [(model, method) for model in MODELS for method in ("lora", "dora")]


@functools.cache
def _dense_base(model_name: str) -> nn.Module:
    return MODELS[model_name][0]()


@functools.cache
def _quantized_base(model_name: str) -> nn.Module:
    return quantize_model(copy.deepcopy(_dense_base(model_name)))


@functools.cache
def _dequantised_base(model_name: str) -> nn.Module:
    return dequantize_model(copy.deepcopy(_quantized_base(model_name)))


def make(model_name: str, method: str, perturbed: bool = True, **options) -> PeftModel:
    config = METHOD_CASES[method].config(target_modules=MODELS[model_name][1], **options)
    torch.manual_seed(0)  # A's init: two calls build the same model
    model = get_peft_model(copy.deepcopy(_quantized_base(model_name)), config).eval()
    if perturbed:
        perturb(model)
    return model








def test_the_dequantised_base_is_the_4bit_base():
    """The reference model: dense layers (Conv1D again for GPT-2) computing what the 4-bit layers do."""
    for name in MODELS:
        quantized, dense = _quantized_base(name), _dequantised_base(name)
        assert any(isinstance(m, Linear4bit) for m in quantized.modules())
        assert not any(isinstance(m, Linear4bit) for m in dense.modules())
        assert [type(m) for m in dense.modules()] == [type(m) for m in _dense_base(name).modules()]
        assert not hasattr(dense, "peftlab_quantization")
        batch = tiny_batch(dense)
        assert max_diff(logits(dense, batch), logits(quantized, batch)) <= 1e-6
        assert max_diff(logits(dense, batch), logits(_dense_base(name), batch)) > 1e-4  # NF4 did round


@pytest.mark.parametrize("model_name,method", CASES)
def test_starts_equal_to_the_dequantised_base(model_name, method):
    model = make(model_name, method, perturbed=False)
    batch = tiny_batch(model)
    assert max_diff(logits(model, batch), logits(_dequantised_base(model_name), batch)) <= 1e-6


@pytest.mark.parametrize("model_name,method", CASES)
def test_only_adapter_tensors_change_in_training(model_name, method):
    """AdamW over every parameter: the adapter tensors move; the 4-bit codes, statistics and biases do not."""
    model = make(model_name, method, perturbed=False).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = METHOD_CASES[method].frozen
    assert trainable == {n for n, _ in model.named_parameters() if ".adapters." in n and not any(f".{t}" in n for t in frozen)}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = tiny_batch(model)
    for _ in range(3):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    assert any(n.endswith(".packed") for n in before)  # the 4-bit codes were among those compared


@pytest.mark.parametrize("model_name,method", CASES)
def test_disable_adapter_gives_the_dequantised_base(model_name, method):
    model = make(model_name, method)
    batch = tiny_batch(model)
    base_out = logits(_dequantised_base(model_name), batch)
    adapted = logits(model, batch)
    assert max_diff(adapted, base_out) > 1e-3
    with model.disable_adapter():
        assert max_diff(logits(model, batch), base_out) <= 1e-6
    assert max_diff(logits(model, batch), adapted) == 0


@pytest.mark.parametrize("model_name,method", CASES)
def test_save_load_round_trip_on_a_fresh_4bit_base(model_name, method, tmp_path):
    model = make(model_name, method)
    batch = tiny_batch(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(_quantized_base(model_name)), tmp_path).eval()
    assert max_diff(logits(loaded, batch), logits(model, batch)) == 0
    # Only the adapter is saved: the 4-bit base is rebuilt from the dense model, never stored with it.
    assert json.loads((tmp_path / "adapter_config.json").read_text()).get("fan_in_fan_out", False) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_name,method", CASES)
def test_outputs_and_gradients_finite(model_name, method, dtype):
    """Finite in fp32 and in bf16 compute dtype (``.to(bfloat16)`` changes the 4-bit layers' compute
    dtype, never their statistics), and bf16 stays close to fp32."""
    model = make(model_name, method)
    batch = tiny_batch(model)
    reference = logits(model, batch)
    model.to(dtype).train()
    assert {m.compute_dtype for m in model.modules() if isinstance(m, Linear4bit)} == {dtype}
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    tolerance = 1e-6 if dtype == torch.float32 else 0.1 * reference.abs().max().item()
    assert max_diff(out.logits.float(), reference) <= tolerance


@pytest.mark.parametrize("model_name,method", CASES)
def test_parameter_count(model_name, method):
    """Trainable: r·(in+out) per layer (+ out for DoRA's magnitude); total: that plus every base value,
    a 4-bit weight counting by its in·out values (as HF peft counts bitsandbytes weights)."""
    model = make(model_name, method, perturbed=False)
    case, expected, stored = METHOD_CASES[method], 0, 0
    for _, layer in model.adapted_layers():
        fan_in, fan_out = layer.view.in_features, layer.view.out_features
        expected += case.per_layer(fan_in, fan_out, 4)
        stored += (case.stored_per_layer or case.per_layer)(fan_in, fan_out, 4)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == stored + sum(p.numel() for p in _dense_base(model_name).parameters())


def _reference(layer, x: torch.Tensor, method: str) -> torch.Tensor:
    """Plain autograd on the dequantised weight: LoRA's formula, or DoRA's with the norm detached."""
    adapter, view = layer.adapters["default"], layer.view
    w = view.weight().detach()
    if method == "lora":
        return F.linear(x, w, view.bias) + adapter.scaling * (x @ adapter.lora_A.T) @ adapter.lora_B.T
    adapted = w + adapter.scaling * adapter.lora_B @ adapter.lora_A
    scale = adapter.lora_magnitude_vector / torch.linalg.norm(adapted, dim=1).detach()
    return F.linear(x, scale[:, None] * adapted, view.bias)


@pytest.mark.parametrize("model_name,method", FUSED_CASES)
def test_fused_path_on_the_4bit_base_matches_plain_autograd(model_name, method):
    """Every adapted 4-bit layer runs the fused Function (one autograd node, no saved weight), and its
    output and gradients (A, B, m, x) equal plain autograd on the dequantised weight."""
    generator = torch.Generator().manual_seed(3)
    model = make(model_name, method)
    fused_name = "DoraLinearFunctionBackward" if method == "dora" else "LoraLinearFunctionBackward"
    for path, layer in model.adapted_layers():
        assert isinstance(layer.base_layer, Linear4bit)
        adapter = layer.adapters["default"]
        x = torch.randn(2, 3, layer.view.in_features, generator=generator, requires_grad=True)
        upstream = torch.randn(2, 3, layer.view.out_features, generator=generator)
        params = [x, adapter.lora_A, adapter.lora_B] + ([adapter.lora_magnitude_vector] if method == "dora" else [])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ours = layer(x)
        assert type(ours.grad_fn).__name__ == fused_name, path
        # Nothing weight-sized is kept for backward (here every activation is smaller than W).
        assert all(t.numel() < layer.view.in_features * layer.view.out_features for t in saved), path
        ours_grads = torch.autograd.grad((ours * upstream).sum(), params)
        reference = _reference(layer, x, method)
        ref_grads = torch.autograd.grad((reference * upstream).sum(), params)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6, msg=path)
        for name, g, g_ref in zip(["x", "A", "B", "m"], ours_grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=f"{path} grad {name}")


# -- merging --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name,method", CASES)
def test_exact_merge_into_the_dequantised_copy(model_name, method):
    """merge_and_unload(dequantize=True) gives the plain dense model class, computing the QLoRA output."""
    model = make(model_name, method)
    batch = tiny_batch(model)
    expected = logits(model, batch)
    plain = model.merge_and_unload(dequantize=True)
    assert type(plain) is type(_dense_base(model_name))
    assert [type(m) for m in plain.modules()] == [type(m) for m in _dense_base(model_name).modules()]
    assert sorted(n for n, _ in plain.named_parameters()) == sorted(n for n, _ in _dense_base(model_name).named_parameters())
    assert max_diff(logits(plain, batch), expected) <= 1e-5
    assert max_diff(logits(plain, batch), logits(_dequantised_base(model_name), batch)) > 1e-3


def test_two_step_merge_is_the_same(recwarn):
    """dequantize_model(peft_model) then the ordinary merge_and_unload(): the same weights, no warning."""
    one_step = make("llama", "dora").merge_and_unload(dequantize=True)
    two_step = dequantize_model(make("llama", "dora")).merge_and_unload()
    assert [w for w in recwarn if issubclass(w.category, LossyMergeWarning)] == []
    one, two = one_step.state_dict(), two_step.state_dict()
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("model_name,method", CASES)
def test_merge_into_4bit_warns_once_with_the_measured_error(model_name, method):
    """The default merge_and_unload() keeps the 4-bit layers (re-quantized: lossy) and says so in one
    warning whose error is the largest weight error over all layers, as measured here."""
    model = make(model_name, method)
    batch = tiny_batch(model)
    expected = logits(model, batch)
    targets = {path: (layer.view.weight() + layer.adapters["default"].delta_weight(layer.view)).detach()
               for path, layer in model.adapted_layers()}
    with pytest.warns(LossyMergeWarning) as record:
        merged = model.merge_and_unload()
    lossy = [w for w in record if issubclass(w.category, LossyMergeWarning)]
    assert len(lossy) == 1
    message = lossy[0].message
    assert f"re-quantized {len(targets)} 4-bit layer(s)" in str(message) and "dequantize=True" in str(message)
    measured = max(max_diff(merged.get_submodule(p).dequantize(), t) for p, t in targets.items())
    assert message.max_abs_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
    assert measured > 0
    # Rounding to NF4 errs by at most about half its widest step (0.28 of a block's absmax), whatever the
    # method made of the weight (Delta-LoRA moves it 3x as far as LoRA).
    assert all(max_diff(merged.get_submodule(p).dequantize(), t) < 0.2 * t.abs().max() for p, t in targets.items())
    assert all(isinstance(merged.get_submodule(p), Linear4bit) for p in targets)
    # Lossy, but smaller than what the adapter does: the ratio is a random variable of the adapter's draws
    # (0.1 to 0.8 over seeds 0-7 for LoRA on these tiny models, measured), so the bound is the effect itself.
    adapter_effect = max_diff(expected, logits(_dequantised_base(model_name), batch))
    assert 1e-5 < max_diff(logits(merged, batch), expected) < adapter_effect


def test_cli_merge_of_a_qlora_adapter_into_the_dequantised_base(bert_dir, sentiment_dir, tmp_path, capsys):
    """`peftlab merge --quantize nf4` merges into the exactly dequantised base: the saved plain model
    gives the QLoRA model's logits."""
    adapter, merged_dir = tmp_path / "qlora", tmp_path / "merged"
    flags = ["--model", str(bert_dir), "--dataset", str(sentiment_dir), "--out", str(adapter), "--batch-size", "8",
             "--max-length", "16", "--lora-dropout", "0", "--lr", "1e-2", "--method", "qlora", "--max-steps", "2"]
    assert main(["train", *flags]) == 0
    assert main(["merge", "--adapter", str(adapter), "--out", str(merged_dir), "--quantize", "nf4"]) == 0
    assert "wrote" in capsys.readouterr().err
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    qlora = PeftModel.from_pretrained(quantize_model(AutoModelForSequenceClassification.from_pretrained(bert_dir)),
                                      adapter).eval()
    batch = {"input_ids": torch.tensor([[2, 5, 6, 11], [2, 4, 13, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    assert max_diff(logits(merged, batch), logits(qlora, batch)) <= 1e-5
