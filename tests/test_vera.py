"""VeRA: HF peft's files both ways (tiny GPT-2 Conv1D / Llama / BERT, both ``save_projection`` values,
logits within 1e-5, no key warnings), its projection bit for bit, one frozen shared pair per model,
and the multi-adapter rules (HF's, with the cases HF gets silently wrong refused).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from peft.tuners.vera.model import _kaiming_init
from safetensors.torch import load_file

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.methods import UnsupportedBaseError
from peftlab.methods.dropout_mask import DropMask
from peftlab.methods.vera import VeraAdapter, VeraConfig, VeraProjections, draw_projections
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_bert_seq_cls, tiny_gpt2, tiny_llama

ATOL = 1e-5
MODELS = {
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")),
    "llama": (tiny_llama, dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "bert": (tiny_bert_seq_cls, dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
}


@pytest.fixture(scope="module")
def bases():
    return {name: build() for name, (build, _) in MODELS.items()}


def options(model_name: str, **extra) -> dict:
    return copy.deepcopy(dict(r=8, **MODELS[model_name][1], **extra))  # HF rewrites its config in place


def key_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]


@pytest.mark.parametrize("key, r, max_in, max_out", [(0, 4, 32, 16), (123, 256, 768, 3072), (7, 3, 5, 9)])
def test_projection_is_hf_bit_for_bit(key, r, max_in, max_out):
    generator = torch.Generator(device="cpu").manual_seed(key)
    hf_a = _kaiming_init((r, max_in), generator=generator)
    hf_b = _kaiming_init((max_out, r), generator=generator)
    a, b = draw_projections(r, max_in, max_out, key)
    assert torch.equal(a, hf_a) and torch.equal(b, hf_b)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_peftlab_vera_loads_in_hf(bases, tmp_path, model_name, save_projection):
    base = bases[model_name]
    batch = tiny_batch(base)
    ours = get_peft_model(copy.deepcopy(base), VeraConfig(**options(model_name, save_projection=save_projection))).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert key_warnings(caught) == []
    saved = load_file(tmp_path / "adapter_model.safetensors")
    hf_keys = peft.get_peft_model_state_dict(theirs)
    assert sorted(saved) == sorted(hf_keys)
    assert ("base_model.vera_A" in saved) is save_projection
    # HF regenerated (or loaded) the same projection the layers use here.
    hf_layer = next(m for m in theirs.modules() if hasattr(m, "vera_A") and isinstance(m.vera_A, torch.nn.Module))
    torch.testing.assert_close(hf_layer.vera_A["default"], ours.method_state["default"].vera_A, rtol=0, atol=0)
    expected = logits(theirs, batch)
    assert max_diff(logits(ours, batch), expected) <= ATOL
    assert max_diff(expected, logits(base, batch)) > 1e-3  # the adapter changes the output


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_hf_vera_loads_in_peftlab(bases, tmp_path, model_name, save_projection):
    base = bases[model_name]
    batch = tiny_batch(base)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**options(model_name, save_projection=save_projection)))
    theirs.eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert key_warnings(caught) == []
    assert [str(w.message) for w in caught if "peftlab" in w.filename] == []  # every HF field loads quietly
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == sorted(ours.adapter_state_dict("default"))
    expected = logits(theirs, batch)
    assert max_diff(logits(ours, batch), expected) <= ATOL
    assert max_diff(expected, logits(base, batch)) > 1e-3


@pytest.mark.parametrize("model_name", list(MODELS))
def test_vera_config_file_matches_hf(bases, tmp_path, model_name):
    base = bases[model_name]
    get_peft_model(copy.deepcopy(base), VeraConfig(**options(model_name))).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**options(model_name))).save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    hf_fields = {f.name for f in dataclasses.fields(peft.VeraConfig)}
    assert set(ours) <= hf_fields
    assert set(ours) >= (hf_fields & {f.name for f in dataclasses.fields(VeraConfig)}) | {"peft_type"}

    def norm(key, value):
        return sorted(value) if key in ("target_modules", "modules_to_save") and isinstance(value, list) else value

    assert {k: (ours[k], theirs.get(k)) for k in ours if norm(k, ours[k]) != norm(k, theirs.get(k))} == {}


def test_hf_defaults():
    config = VeraConfig()
    assert (config.r, config.projection_prng_key, config.save_projection, config.vera_dropout, config.d_initial) == (
        256, 0, True, 0.0, 0.1
    )
    hf = peft.VeraConfig()
    for field in dataclasses.fields(VeraConfig):
        if hasattr(hf, field.name) and field.name not in ("target_modules",):
            assert getattr(config, field.name) == getattr(hf, field.name), field.name


def test_one_frozen_pair_shared_by_all_layers_moved_by_to(bases):
    model = get_peft_model(copy.deepcopy(bases["llama"]), VeraConfig(r=8, target_modules="all-linear"))
    pairs = [m for m in model.modules() if isinstance(m, VeraProjections)]
    assert len(pairs) == 1
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
    assert all(not b.requires_grad for b in pairs[0].buffers())
    model.add_adapter("other", VeraConfig(r=8, target_modules="all-linear"))
    model.set_adapter("other")
    model.set_adapter(["default", "other"])  # set_adapter never makes the pair (or anything else) train
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.method_state["other"] is model.method_state["default"]
    perturb(model)
    batch = tiny_batch(model)
    before = logits(model, batch)
    model.to(torch.float64)
    assert pairs[0].vera_A.dtype == torch.float64
    assert max_diff(logits(model, batch), before.double()) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float32, (1e-5, 1e-6)), (torch.float64, (1e-12, 1e-12))], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "folded, keeps_product", [(False, False), (False, True), (True, False)], ids=["rank-r", "rank-r-keeping-v", "folded"]
)
@pytest.mark.parametrize("target", ["c_fc", "c_proj"])
def test_fused_forward_and_backward_equal_the_formula(bases, target, folded, keeps_product, dtype, tol, monkeypatch):
    """Every one-node path against autograd on h = x Wᵀ + λ_b ⊙ ((λ_d ⊙ x aᵀ) bᵀ), on GPT-2's Conv1D
    widening (c_fc) and narrowing (c_proj): the rank-r products per token (g_λb from one more product,
    or from the kept v = (λ_d ⊙ x aᵀ) bᵀ as at large r), and ΔW folded into W with the vectors'
    gradients from gᵀ x aᵀ (what large batches on narrow layers take)."""
    monkeypatch.setattr(VeraAdapter, "folding_pays", lambda self, rows: folded)
    monkeypatch.setattr(VeraAdapter, "keeps_product", lambda self: keeps_product)
    model = get_peft_model(copy.deepcopy(bases["gpt2"]), VeraConfig(r=8, target_modules=[target])).to(dtype)
    perturb(model)
    path, layer = next(model.adapted_layers())
    adapter = layer.adapters["default"]
    x = torch.randn(2, 5, layer.view.in_features, dtype=dtype, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    fused = (x.grad.clone(), adapter.vera_lambda_b.grad.clone(), adapter.vera_lambda_d.grad.clone())
    x.grad = adapter.vera_lambda_b.grad = adapter.vera_lambda_d.grad = None
    a, b = adapter.sliced(adapter.vera_lambda_d)
    w = layer.view.weight()
    reference = x @ w.T + layer.view.bias + adapter.vera_lambda_b * ((adapter.vera_lambda_d * (x @ a.T)) @ b.T)
    torch.testing.assert_close(out, reference, rtol=tol[1], atol=tol[1])
    reference.backward(grad)
    for got, want in zip(fused, (x.grad, adapter.vera_lambda_b.grad, adapter.vera_lambda_d.grad)):
        torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("keeps_product", [False, True], ids=["rank-r", "rank-r-keeping-v"])
@pytest.mark.parametrize("target", ["c_fc", "c_proj"])
def test_dropout_runs_fused_and_matches_the_formula_with_the_same_mask(bases, target, keeps_product, monkeypatch):
    """With vera_dropout the adapter sees dropout(x), the base x: one node still (never folded, even where
    folding would pay), equal to h = x Wᵀ + λ_b ⊙ ((λ_d ⊙ dropout(x) aᵀ) bᵀ) with the mask it drew, fp64."""
    monkeypatch.setattr(VeraAdapter, "folding_pays", lambda self, rows: True)
    monkeypatch.setattr(VeraAdapter, "keeps_product", lambda self: keeps_product)
    config = VeraConfig(r=8, target_modules=[target], vera_dropout=0.3)
    model = get_peft_model(copy.deepcopy(bases["gpt2"]), config).to(torch.float64)
    perturb(model)
    model.train()
    path, layer = next(model.adapted_layers())
    adapter = layer.adapters["default"]
    n_in = layer.view.in_features
    x = torch.randn(2, 5, n_in, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "VeraLinearFunctionBackward"
    torch.manual_seed(1)  # the mask the fused call drew, drawn again
    mask = DropMask.sample(10, n_in, 0.3, x.device)
    assert 0 < len(mask.positions) < 10 * n_in
    keep = torch.full((10 * n_in,), 1 / 0.7, dtype=torch.float64)
    keep[mask.positions] = 0
    a, b = adapter.sliced(adapter.vera_lambda_d)
    dropped = x * keep.view(2, 5, n_in)
    reference = (x @ layer.view.weight().T + layer.view.bias
                 + adapter.vera_lambda_b * ((adapter.vera_lambda_d * (dropped @ a.T)) @ b.T))
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    params = [x, adapter.vera_lambda_b, adapter.vera_lambda_d]
    weights = torch.randn_like(out)  # a loss whose gradient differs per output entry
    for got, want in zip(torch.autograd.grad((out * weights).sum(), params),
                         torch.autograd.grad((reference * weights).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# -- bad input ------------------------------------------------------------------------------------


def test_embedding_target_is_refused_by_name(bases):
    with pytest.raises(UnsupportedBaseError, match=r"VeRA cannot adapt model\.embed_tokens, an Embedding"):
        get_peft_model(copy.deepcopy(bases["llama"]), VeraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))


def test_adapters_with_different_keys_are_refused(bases):
    model = get_peft_model(copy.deepcopy(bases["llama"]), VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"projection_prng_key=3 but 'default' has 0: .*share one projection"):
        model.add_adapter("b", VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=3))
    assert list(model.peft_config) == ["default"] and list(model.method_state) == ["default"]


def test_adapters_with_different_save_projection_are_refused(bases):
    model = get_peft_model(copy.deepcopy(bases["llama"]), VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"save_projection=False but 'default' has True"):
        model.add_adapter("b", VeraConfig(r=4, target_modules=["q_proj"], save_projection=False))


def test_later_adapter_with_larger_r_is_refused(bases):
    model = get_peft_model(copy.deepcopy(bases["llama"]), VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"VeRA r=8 at .* is larger than the model's shared projection \(r=4"):
        model.add_adapter("b", VeraConfig(r=8, target_modules=["q_proj"]))


def test_later_adapter_on_larger_layers_is_refused(bases):
    """HF checks only the first layer of a later adapter and fails in the forward; here it is refused up front."""
    model = get_peft_model(copy.deepcopy(bases["llama"]), VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"gate_proj \(16 -> 32\) is larger than the model's shared VeRA projection \(16 -> 16"):
        model.add_adapter("b", VeraConfig(r=4, target_modules=["q_proj", "gate_proj"]))


def test_smaller_later_adapter_without_saved_projection_is_refused(bases):
    """Its file could not regenerate the slice it trained on: refused rather than reloaded wrong."""
    model = get_peft_model(
        copy.deepcopy(bases["llama"]), VeraConfig(r=8, target_modules="all-linear", save_projection=False)
    )
    with pytest.raises(ValueError, match=r"cannot regenerate from the key with save_projection=False"):
        model.add_adapter("b", VeraConfig(r=4, target_modules="all-linear", save_projection=False))


def test_smaller_later_adapter_with_saved_projection_round_trips(bases, tmp_path):
    base = bases["llama"]
    batch = tiny_batch(base)
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=8, target_modules="all-linear"))
    model.add_adapter("small", VeraConfig(r=4, target_modules=["q_proj"]))
    model.set_adapter("small")
    perturb(model)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path, selected_adapters=["small"])
    # The file holds the part of the pair "small" uses, sized as its own config implies: it loads
    # alone, here and in HF (which sizes the pair by the config it loads).
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "small").eval()
    assert max_diff(logits(loaded, batch), expected) <= ATOL
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "small")).eval()
    assert max_diff(logits(theirs, batch), expected) <= ATOL


def test_adapter_with_another_projection_is_refused_next_to_one(bases, tmp_path):
    """Saved from a model whose pair was sized by q_proj alone: not the slice of an all-linear pair."""
    base = bases["llama"]
    get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"trained with another random projection"):
        model.load_adapter(tmp_path, "b")
    assert list(model.peft_config) == ["default"]


def test_a_vera_file_is_not_loaded_as_another_method(bases, tmp_path):
    base = bases["llama"]
    get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a VERA adapter but the config given is LoraConfig \(LORA\)"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=LoraConfig(r=4, target_modules=["q_proj"]))
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("projection_prng_key", "save_projection",
                                                                                      "d_initial", "vera_dropout", "init_weights")}
                                      | {"peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"does not fit this model: missing keys .*lora_A"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
