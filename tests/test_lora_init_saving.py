"""Saving and loading adapters whose init rewrote the base (PiSSA, OLoRA): the files are HF's both
ways, and ``path_initial_model_for_weight_conversion`` / the plain-LoRA export give the rank-2r LoRA
that reproduces the trained model on the unmodified base (logits within 1e-5, in HF peft too)."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.methods.lora_init.conversion import ConversionError
from peftlab.methods.lora_init.loftq import LoftQConfig
from tiny_models import perturb, tiny_batch, tiny_gpt2, tiny_llama

ATOL = 1e-5
MODELS = {"llama": (tiny_llama, "all-linear"), "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])}


def trained(model_name: str, init: str, **fields):
    """(original base, the peftlab model after a stand-in for training: every adapter tensor moved)."""
    build, targets = MODELS[model_name]
    base = build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **fields))
    perturb(model)
    return base, model


def hf_load(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_loads_on_the_original_base_in_both_libraries(init, model_name, tmp_path):
    """As HF: the saved config says the init, so loading on the original base rewrites it again."""
    if init == "olora" and model_name == "gpt2":
        pytest.skip("HF's OLoRA decomposes Conv1D weights transposed (see olora.py)")
    base, model = trained(model_name, init)
    batch = tiny_batch(base)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    torch.testing.assert_close(hf_load(base, tmp_path)(**batch).logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(**batch).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_conversion_reproduces_the_trained_model_on_the_original_base(init, model_name, tmp_path):
    build, targets = MODELS[model_name]
    base = build()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    model.save_pretrained(tmp_path / "init")  # HF's flow: the adapter right after get_peft_model
    perturb(model)
    batch = tiny_batch(base)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    torch.testing.assert_close(hf_load(base, tmp_path / "lora")(**batch).logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")(**batch).logits,
                               expected, atol=ATOL, rtol=0)


def test_conversion_writes_what_hf_writes(tmp_path):
    base = tiny_llama()
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa", use_rslora=True)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    peft.set_peft_model_state_dict(hf, model.adapter_state_dict("default"))  # the same start
    hf.save_pretrained(tmp_path / "hf_init")
    perturb(model)
    peft.set_peft_model_state_dict(hf, model.adapter_state_dict("default"))  # the same "training"
    model.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init"))
    hf.save_pretrained(tmp_path / "hf", path_initial_model_for_weight_conversion=str(tmp_path / "hf_init"))
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "hf"))
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    ours_cfg, hf_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "hf"))
    for field in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert ours_cfg[field] == pytest.approx(hf_cfg[field]), field


def test_initial_adapter_is_written_where_none_was_saved(tmp_path):
    base, model = trained("llama", "pissa")
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    initial = load_file(tmp_path / "init" / "adapter_model.safetensors")
    for path, adapter in model.adapters_of("default"):
        assert torch.equal(initial[f"base_model.model.{path}.lora_A.weight"], adapter.initial_factors[0])
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_export_to_plain_lora_is_for_the_original_base(tmp_path):
    base, model = trained("gpt2", "pissa")
    batch = tiny_batch(base)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path, as_lora=True)
    torch.testing.assert_close(hf_load(base, tmp_path)(**batch).logits, expected, atol=ATOL, rtol=0)


# -- bad input ------------------------------------------------------------------------------------


def test_conversion_without_the_initial_weights_is_refused(tmp_path):
    base, model = trained("llama", "pissa")
    other = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConversionError, match="does not hold this adapter's initial weights.*right after get_peft_model"):
        model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "other"))
    for _, adapter in model.adapters_of("default"):
        del adapter.initial_factors  # as if built elsewhere
    with pytest.raises(ConversionError, match="initial factors are not at hand.*path_initial_model_for_weight_conversion"):
        model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "none"))
    with pytest.raises(ConversionError, match="initial factors are not at hand"):
        model.save_pretrained(tmp_path / "export", as_lora=True)


def test_conversion_of_an_adapter_that_left_the_base_alone_is_refused(tmp_path):
    _, model = trained("llama", True)
    with pytest.raises(ConversionError, match="leaves the base unchanged.*without path_initial_model_for_weight_conversion"):
        model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_loftq_and_dora_conversions_are_refused(tmp_path):
    _, loftq = trained("llama", "loftq", loftq_config=LoftQConfig())
    with pytest.raises(ConversionError, match="LoftQ.*quantized base"):
        loftq.save_pretrained(tmp_path / "a", as_lora=True)
    _, dora = trained("llama", "pissa", use_dora=True)
    with pytest.raises(ConversionError, match="DoRA.*not W plus a low-rank part"):
        dora.save_pretrained(tmp_path / "b", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
