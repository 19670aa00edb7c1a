"""LoRA-FA: what its layer keeps for backward (u = x Aᵀ, never x), its gradients, A frozen through
training, its files (plain LoRA), and create_lorafa_optimizer against HF peft's.

The properties every method has (training, merging, saving, 4-bit, interop) come from the method
table (method_table.py).
"""

from __future__ import annotations

import copy
import json

import peft
import peft.optimizers.lorafa
import pytest
import torch

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.methods import make_method_config
from peftlab.methods.dropout_mask import DropMask
from peftlab.methods.lora_fa import LoraFaAdapter
from peftlab.optimizers import create_lorafa_optimizer
from tiny_models import perturb, tiny_batch, tiny_gpt2, tiny_llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def adapted(model_name: str, method: str, dropout: float = 0.0):
    torch.manual_seed(0)
    config = make_method_config(method, r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[model_name])
    return get_peft_model(BUILDERS[model_name](), config)


def saved_activation_bytes(layer, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for backward of one layer call, parameters (kept anyway) left out."""
    params = {id(p) for p in layer.parameters()}
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    activations = [t for t in saved if id(t) not in params]
    return sum(t.numel() * t.element_size() for t in activations), activations


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("model_name", list(BUILDERS))
def test_the_layer_keeps_u_not_the_input(model_name, dropout):
    """Per adapted layer, LoRA-FA keeps for backward exactly u = x Aᵀ ([N, r]) where LoRA keeps u and
    the input x ([N, in]): one input activation less. (A dropout mask, the same for both, lives on
    the autograd node as the dropped positions, not as a saved tensor.)"""
    lora, lora_fa = adapted(model_name, "lora", dropout).train(), adapted(model_name, "lora_fa", dropout).train()
    generator = torch.Generator().manual_seed(0)
    for (path, ours), (_, theirs) in zip(lora_fa.adapted_layers(), lora.adapted_layers()):
        x = torch.randn(2, 5, ours.view.in_features, generator=generator, requires_grad=True)
        fa_bytes, kept = saved_activation_bytes(ours, x)
        lora_bytes, _ = saved_activation_bytes(theirs, x)
        input_bytes = x.numel() * x.element_size()
        u_bytes = 10 * 4 * x.element_size()
        assert fa_bytes == u_bytes and [tuple(t.shape) for t in kept] == [(10, 4)], path
        assert lora_bytes == u_bytes + input_bytes, path


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("model_name", list(BUILDERS))
def test_fused_gradients_match_the_formula(model_name, dropout):
    """Output and gradients (B, x) equal autograd on h = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, the dropout
    mask drawn alike from the same seed; A gets no gradient."""
    model = adapted(model_name, "lora_fa", dropout).train()
    perturb(model)
    generator = torch.Generator().manual_seed(1)
    for path, layer in model.adapted_layers():
        adapter = layer.adapters["default"]
        x = torch.randn(2, 3, layer.view.in_features, generator=generator, requires_grad=True)
        upstream = torch.randn(2, 3, layer.view.out_features, generator=generator)
        torch.manual_seed(5)
        ours = layer(x)
        assert type(ours.grad_fn).__name__ == "LoraLinearFunctionBackward", path
        grads = torch.autograd.grad((ours * upstream).sum(), [adapter.lora_B, x])
        torch.manual_seed(5)
        x2 = x.reshape(-1, x.shape[-1])
        dropped = (DropMask.sample(*x2.shape, dropout, x.device).apply(x2) if dropout else x2).view(x.shape)
        reference = layer.base_layer(x) + adapter.scaling * (dropped @ adapter.lora_A.T) @ adapter.lora_B.T
        ref_grads = torch.autograd.grad((reference * upstream).sum(), [adapter.lora_B, x])
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6, msg=path)
        for name, g, g_ref in zip(["B", "x"], grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=f"{path} grad {name}")
        assert adapter.lora_A.grad is None


def test_a_never_changes_in_training():
    """AdamW with weight decay over every parameter, set_adapter in between: B moves, A does not."""
    model = adapted("llama", "lora_fa")
    model.add_adapter("other", make_method_config("lora_fa", r=2, target_modules=["q_proj"]))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and ".default." in n}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = tiny_batch(model)
    for active in ("default", ["default", "other"], "default"):
        model.set_adapter(active)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], a) for n, a in a_before.items())
    assert all(not torch.equal(params[n], b) for n, b in b_before.items())


def test_embedding_a_is_random_so_the_adapter_can_learn():
    """HF's embedding LoRA starts with A = 0, which frozen would stay 0; LoRA-FA's A is random, B = 0."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), make_method_config("lora_fa", r=4, target_modules=["embed_tokens"]))
    adapter = model.base_model.get_submodule("model.embed_tokens").adapters["default"]
    assert isinstance(adapter, LoraFaAdapter) and adapter.lora_A.abs().min() > 0 and not adapter.lora_B.any()
    batch = tiny_batch(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert adapter.lora_B.grad.abs().max() > 0 and adapter.lora_A.grad is None


def test_saves_as_a_plain_lora_adapter(tmp_path):
    model = adapted("gpt2", "lora_fa")
    perturb(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["fan_in_fan_out"] is True
    assert type(PeftModel.from_pretrained(tiny_gpt2(), tmp_path).peft_config["default"]) is LoraConfig
    assert type(peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).peft_config["default"]) is peft.LoraConfig


def test_lora_fa_with_dora_is_refused():
    with pytest.raises(ValueError, match="LoRA-FA with use_dora=True is not supported"):
        make_method_config("lora_fa", use_dora=True)


# -- create_lorafa_optimizer ------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_create_lorafa_optimizer_takes_hf_peft_steps(monkeypatch, tmp_path, use_rslora):
    """Same model, same batches, four steps with weight decay: every tensor equals HF's within 1e-6.

    HF computes the projection under bfloat16 autocast where bf16 is available; peftlab does not
    round (see LoraFAOptimizer), so HF runs its float32 path here."""
    monkeypatch.setattr(peft.optimizers.lorafa, "is_bf16_available", lambda: False)
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], modules_to_save=["model.norm"],
                   use_rslora=use_rslora, rank_pattern={"down_proj": 2})
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(options)))
    perturb(theirs)  # B != 0, so A Aᵀ and B both matter
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    hf_optimizer = peft.optimizers.create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    our_optimizer = create_lorafa_optimizer(ours, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.1)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_A" in n)
    a_before = {k: v.clone() for k, v in ours.adapter_state_dict("default").items() if "lora_A" in k}

    for step in range(4):
        batch = tiny_batch(base, seed=step)
        for model, optimizer in ((theirs, hf_optimizer), (ours, our_optimizer)):
            model(**batch, labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    hf_state = peft.get_peft_model_state_dict(theirs)
    our_state = ours.adapter_state_dict("default")
    assert sorted(hf_state) == sorted(our_state)
    moved = 0
    for key, tensor in our_state.items():
        torch.testing.assert_close(tensor, hf_state[key], rtol=0, atol=1e-6, msg=key)
        moved += "lora_B" in key
    assert moved == 6 and all(torch.equal(our_state[k], a) for k, a in a_before.items())
    assert (our_state["base_model.model.model.norm.weight"] - base.model.norm.weight).abs().max() > 1e-3


def test_create_lorafa_optimizer_checks_the_deprecated_rslora_argument():
    model = adapted("llama", "lora")
    with pytest.raises(ValueError, match=r"use_rslora=True was passed .* adapters \['default'\]"):
        create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-3, use_rslora=True)
    with pytest.warns(FutureWarning, match="deprecated"):
        create_lorafa_optimizer(model, r=4, lora_alpha=8, lr=1e-3, use_rslora=False)
