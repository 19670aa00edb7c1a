"""Bad input fails early with a message that says what was wrong; an interrupted save loses nothing."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import peftlab.io
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.layer import AdaptedLayer
from tiny_models import tiny_batch, tiny_gpt2, tiny_llama


@functools.cache
def _base(name: str) -> nn.Module:
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[name]()


def fresh(name: str) -> nn.Module:
    return copy.deepcopy(_base(name))


def perturbed_model(name: str = "llama", seed: int = 0, **options) -> PeftModel:
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **options}
    model = get_peft_model(fresh(name), LoraConfig(**options)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# -- config values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(r=0), "r must be a positive integer, got 0."),
        (dict(r=-2), "r must be a positive integer, got -2."),
        (dict(r=2.5), "LoraConfig: r must be an integer, got 2.5 (float)."),
        (dict(lora_alpha="16"), "LoraConfig: lora_alpha must be a number, got '16' (str)."),
        (dict(use_dora="false"), "LoraConfig: use_dora must be true or false (a bool), got 'false' (str)."),
        (dict(use_rslora=1), "LoraConfig: use_rslora must be true or false (a bool), got 1 (int)."),
        (dict(exclude_modules="mlp.("), "exclude_modules 'mlp.(' is not a valid regular expression"),
        (dict(rank_pattern={"q_proj[": 4}), "rank_pattern key 'q_proj[' is not a valid regular expression"),
        (dict(lora_alpha=0), "lora_alpha must be a positive number, got 0."),
        (dict(lora_alpha=-1.5), "lora_alpha must be a positive number, got -1.5."),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern['q_proj'] must be a positive integer, got 0."),
        (dict(lora_dropout=-0.1), "lora_dropout must be in [0, 1), got -0.1"),
        (dict(lora_dropout=1.0), "lora_dropout must be in [0, 1), got 1.0"),
    ],
)
def test_invalid_config_values(options, message):
    """Ranks, alphas and dropout outside their domains are refused when the config is built."""
    with pytest.raises(ValueError) as error:
        LoraConfig(target_modules=["q_proj"], **options)
    assert message in str(error.value)


@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.999])
def test_valid_dropout_is_accepted(dropout):
    """The boundary of the dropout check: [0, 1) is fine."""
    assert LoraConfig(target_modules=["q_proj"], lora_dropout=dropout).lora_dropout == dropout


# -- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_name,targets,closest",
    [
        ("gpt2", ["c_atn"], ["c_attn"]),
        ("llama", ["qproj", "vproj"], ["q_proj", "v_proj"]),
        ("llama", ["model.layers.0.self_attn.q_prj"], ["q_proj"]),
    ],
)
def test_targets_matching_nothing_name_the_closest_modules(model_name, targets, closest):
    """target_modules that match no module fail, and the message suggests the closest existing names."""
    model = fresh(model_name)
    with pytest.raises(ValueError) as error:
        get_peft_model(model, LoraConfig(target_modules=targets))
    message = str(error.value)
    assert "matched no module" in message
    suggested = message.split("Closest module names: ")[1].rstrip(".").split(", ")
    assert set(closest) <= set(suggested) and len(suggested) <= 3
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


@pytest.mark.parametrize(
    "model_name,targets,layer_type",
    [
        ("gpt2", ["ln_1"], "LayerNorm"),
        ("gpt2", ["attn"], "GPT2Attention"),
        ("llama", ["input_layernorm"], "LlamaRMSNorm"),
        ("llama", ["self_attn"], "LlamaAttention"),
    ],
)
def test_unsupported_layer_type(model_name, targets, layer_type):
    """A target that is not a Linear/Conv1D/Embedding (a norm, a whole attention block) is refused by type."""
    model = fresh(model_name)
    with pytest.raises(TypeError) as error:
        get_peft_model(model, LoraConfig(target_modules=targets))
    message = str(error.value)
    assert f"cannot adapt a {layer_type}" in message and "Linear" in message and "Conv1D" in message
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_failed_add_adapter_leaves_the_model_as_it_was():
    """add_adapter that fails on a bad target keeps the existing adapter, its outputs, and no trace of the new one."""
    model = perturbed_model()
    batch = tiny_batch(model)
    before = logits(model, batch)
    layers_before = sorted(path for path, _ in model.adapted_layers())
    with pytest.raises(TypeError):
        model.add_adapter("bad", LoraConfig(target_modules=["k_proj", "input_layernorm"]))
    assert sorted(model.peft_config) == ["default"]
    assert sorted(path for path, _ in model.adapted_layers()) == layers_before
    assert torch.equal(logits(model, batch), before)


# -- adapter names ------------------------------------------------------------------------------


def test_adding_an_existing_adapter_name():
    """A second adapter under a name in use is refused, and the first is untouched."""
    model = perturbed_model()
    batch = tiny_batch(model)
    before = logits(model, batch)
    with pytest.raises(ValueError, match=r"an adapter named 'default' exists already"):
        model.add_adapter("default", LoraConfig(target_modules=["k_proj"]))
    assert torch.equal(logits(model, batch), before)


def test_set_adapter_of_unknown_name():
    """set_adapter with an unknown name says which adapters exist, and the active one stays."""
    model = perturbed_model()
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; the adapters are: default\."):
        model.set_adapter("nope")
    assert model.active_adapters == ["default"]


# -- loading ------------------------------------------------------------------------------------


def test_adapter_shapes_that_do_not_fit(tmp_path):
    """An adapter saved with r=4 but described as r=2 fails on load naming the first key and both shapes;
    load_adapter leaves no half-loaded adapter behind."""
    perturbed_model(r=4).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 2}))
    first_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    expected = f"{first_key} has shape (4, 16) in the file but (2, 16) in the model"
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(fresh("llama"), tmp_path)
    assert expected in str(error.value)

    model = perturbed_model()
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        model.load_adapter(tmp_path, "other")
    assert sorted(model.peft_config) == ["default"]
    assert not any(".other." in n for n, _ in model.named_parameters())


def test_adapter_for_another_architecture(tmp_path):
    """A GPT-2 adapter loaded on Llama fails with the missing and unexpected keys named."""
    perturbed_model("gpt2", target_modules=["c_attn"]).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(fresh("llama"), tmp_path)
    message = str(error.value)
    assert "missing keys ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'" in message
    assert "unexpected keys ['base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'" in message


def test_unknown_peft_type(tmp_path):
    """An adapter_config.json with a peft_type peftlab does not know names it and the known ones."""
    perturbed_model().save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "FANCY_NEW"}))
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(fresh("llama"), tmp_path)
    message = str(error.value)
    assert "unknown peft_type 'FANCY_NEW' in adapter_config.json" in message and "LORA" in message


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header that follows the 8-byte length
    path.write_bytes(bytes(data))


def _bad_header_length(path):
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _corrupt_header, _bad_header_length], ids=["truncated", "corrupt", "bad-length"])
def test_damaged_weights_file(tmp_path, damage):
    """A truncated or corrupt adapter_model.safetensors fails with the path and what to do, not a raw library error."""
    perturbed_model().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    damage(weights)
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(fresh("llama"), tmp_path)
    message = str(error.value)
    assert str(weights) in message and "is truncated or corrupt" in message and "Save the adapter again" in message


def test_missing_weights_file_mentions_pickle(tmp_path):
    """Without safetensors weights the error says so, and that adapter_model.bin is not loaded."""
    perturbed_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors in .*peftlab loads no pickle files"):
        PeftModel.from_pretrained(fresh("llama"), tmp_path)


# -- atomic save --------------------------------------------------------------------------------


def _fail_save_file_midway(monkeypatch):
    real = peftlab.io.save_file

    def half_written_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        _truncate(Path(filename))
        raise OSError("No space left on device")

    monkeypatch.setattr(peftlab.io, "save_file", half_written_then_fail)


def _fail_nth_replace(n):
    def install(monkeypatch):
        real = os.replace
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == n:
                raise OSError("Input/output error")
            return real(src, dst)

        monkeypatch.setattr(peftlab.io.os, "replace", replace)

    return install


@pytest.mark.parametrize(
    "interrupt",
    [_fail_save_file_midway, _fail_nth_replace(1), _fail_nth_replace(2)],
    ids=["save_file-midway", "first-replace", "second-replace"],
)
def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch, interrupt):
    """A second save_pretrained that fails at any point leaves the first adapter loadable, with its
    own outputs, and no temporary files behind."""
    first = perturbed_model(seed=1)
    batch = tiny_batch(first)
    first.save_pretrained(tmp_path)
    files_before = sorted(p.name for p in tmp_path.iterdir())
    first_out = logits(first, batch)

    second = perturbed_model(seed=2, r=2, target_modules=["q_proj", "k_proj", "v_proj"])
    assert (logits(second, batch) - first_out).abs().max() > 1e-3
    interrupt(monkeypatch)
    with pytest.raises(OSError):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == files_before
    loaded = PeftModel.from_pretrained(fresh("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), first_out, rtol=0, atol=0)
