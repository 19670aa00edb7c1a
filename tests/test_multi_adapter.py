"""Several adapters on one model: add, load, switch, delete, save them, and mix them per row of a batch."""

from __future__ import annotations

import copy
import functools
import re

import peft
import pytest
import torch
from torch import nn

from method_table import METHOD_CASES, METHOD_TABLE
from peftlab import AdapterConfig, LoraConfig, PeftModel, get_peft_model
from peftlab.layer import AdaptedLayer
from tiny_models import tiny_batch, tiny_bert_seq_cls, tiny_gpt2, tiny_llama

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert_seq_cls}
# Adapter "b" covers fewer layers than "a", so a mixed batch meets layers where a row's adapter is absent.
TARGETS = {
    "gpt2": (["c_attn", "c_proj", "c_fc"], ["c_attn"]),
    "llama": (["q_proj", "v_proj", "down_proj"], ["v_proj"]),
    "bert": (["query", "value"], ["value"]),
}
# Trained copies: on GPT-2 only "a" has one (b's rows must use the original ln_f); on BERT each
# adapter has its own classifier head (SEQ_CLS), so rows must also pick their head.
EXTRA = {
    "gpt2": ({"modules_to_save": ["ln_f"]}, {}),
    "llama": ({}, {}),
    "bert": ({"task_type": "SEQ_CLS"}, {"task_type": "SEQ_CLS"}),
}


@functools.cache
def _base(model_name: str) -> nn.Module:
    return BUILDERS[model_name]()


def fresh_base(model_name: str) -> nn.Module:
    return copy.deepcopy(_base(model_name))


def perturb(model: nn.Module, adapter_name: str, seed: int) -> None:
    """Move one adapter's tensors (and its trained copies) away from init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if f".{adapter_name}." in name + ".":
                scale = param.abs().mean()
                param.add_(torch.randn(param.shape, generator=generator) * (0.3 if scale == 0 else 0.5 * scale))


def configs(model_name: str, method: str = "lora") -> tuple[AdapterConfig, AdapterConfig]:
    a_targets, b_targets = TARGETS[model_name]
    a_extra, b_extra = EXTRA[model_name]
    case = METHOD_CASES[method]
    b_extra = {**b_extra, "inference_mode": True} if case.one_trainable_adapter else b_extra
    return case.config(4, target_modules=a_targets, **a_extra), case.config(2, target_modules=b_targets, **b_extra)


def two_adapters(model_name: str, method: str = "lora") -> PeftModel:
    config_a, config_b = configs(model_name, method)
    model = get_peft_model(fresh_base(model_name), config_a, adapter_name="a")
    model.add_adapter("b", config_b)
    perturb(model, "a", seed=1)
    perturb(model, "b", seed=2)
    return model.eval()


def logits(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def alone(model: PeftModel, name: str, batch) -> torch.Tensor:
    """What the whole batch gives with one adapter active (or the base for "__base__")."""
    if name == "__base__":
        with model.disable_adapter():
            return logits(model, batch)
    model.set_adapter(name)
    return logits(model, batch)


ROWS = ["a", "__base__", "b", "a"]


@pytest.mark.parametrize("method", [case.name for case in METHOD_TABLE])
@pytest.mark.parametrize("model_name", list(BUILDERS))
def test_mixed_batch_rows_match_their_adapter_alone(model_name, method):
    """adapter_names=[a, __base__, b, a]: each row equals that row's output with its adapter alone,
    trained copies (ln_f, classifier heads) included."""
    model = two_adapters(model_name, method)
    batch = tiny_batch(model, batch_size=len(ROWS))
    mixed = logits(model, batch, adapter_names=ROWS)
    per_adapter = {name: alone(model, name, batch) for name in set(ROWS)}
    for row, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[row], per_adapter[name][row], rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")
    # The three choices give three different outputs, so a mix-up between rows cannot pass.
    assert (per_adapter["a"][0] - per_adapter["b"][0]).abs().max() > 1e-3
    assert (per_adapter["a"][0] - per_adapter["__base__"][0]).abs().max() > 1e-3
    assert (per_adapter["b"][0] - per_adapter["__base__"][0]).abs().max() > 1e-3


def test_mixed_batch_generate_gpt2():
    """generate(..., adapter_names=...) (greedy) gives each row the tokens it gets alone with its adapter."""
    model = two_adapters("gpt2")
    prompt = tiny_batch(model, batch_size=len(ROWS), seq_len=4, seed=5)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        mixed = model.generate(**prompt, adapter_names=ROWS, **options)
        per_adapter = {}
        for name in set(ROWS):
            if name == "__base__":
                with model.disable_adapter():
                    per_adapter[name] = model.generate(**prompt, **options)
            else:
                model.set_adapter(name)
                per_adapter[name] = model.generate(**prompt, **options)
    assert mixed.shape == (len(ROWS), 4 + 5)
    for row, name in enumerate(ROWS):
        assert mixed[row].tolist() == per_adapter[name][row].tolist(), f"row {row} ({name})"
    new_tokens = {name: out[:, 4:] for name, out in per_adapter.items()}
    assert not torch.equal(new_tokens["a"], new_tokens["b"]) and not torch.equal(new_tokens["a"], new_tokens["__base__"])


def test_mixed_batch_checks_names_and_length():
    """Unknown adapter names and a names list of the wrong length are refused with a clear message."""
    model = two_adapters("gpt2")
    batch = tiny_batch(model, batch_size=4)
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        model(**batch, adapter_names=["a", "c", "a", "a"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 4 rows"):
        model(**batch, adapter_names=["a", "b", "a"])


def test_set_adapter_switches_output_and_trainable_parameters():
    """set_adapter picks the adapter that runs and the one whose tensors train; the other stays frozen."""
    model = two_adapters("gpt2")
    batch = tiny_batch(model)

    def trainable_adapters():
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return {re.search(r"\.(?:adapters|copies)\.([^.]+)\.", n).group(1) for n in names}

    assert model.active_adapter == "a" and trainable_adapters() == {"a"}
    out_a = logits(model, batch)
    model.set_adapter("b")
    assert model.active_adapters == ["b"] and trainable_adapters() == {"b"}
    out_b = logits(model, batch)
    assert (out_a - out_b).abs().max() > 1e-3
    model.set_adapter("a")
    assert torch.equal(logits(model, batch), out_a)


def test_save_pretrained_layout_and_load_adapter(tmp_path):
    """save_pretrained puts 'default' at the root and others in dir/NAME/ (as HF does), and load_adapter
    brings each back under a new name with its outputs."""
    config_a, config_b = configs("gpt2")
    model = get_peft_model(fresh_base("gpt2"), config_a)  # "default"
    model.add_adapter("b", config_b)
    perturb(model, "default", seed=1)
    perturb(model, "b", seed=2)
    model.eval()
    batch = tiny_batch(model)
    expected = {name: alone(model, name, batch) for name in ("default", "b")}
    model.save_pretrained(tmp_path / "ours")

    files = sorted(str(p.relative_to(tmp_path / "ours")) for p in (tmp_path / "ours").rglob("*") if p.is_file())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "b/adapter_config.json", "b/adapter_model.safetensors"]
    theirs = peft.get_peft_model(fresh_base("gpt2"), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["c_attn"]))
    theirs.save_pretrained(tmp_path / "theirs")
    hf_files = sorted(
        str(p.relative_to(tmp_path / "theirs")) for p in (tmp_path / "theirs").rglob("*") if p.is_file() and p.suffix != ".md"
    )
    assert files == hf_files

    loaded = PeftModel.from_pretrained(fresh_base("gpt2"), tmp_path / "ours", adapter_name="first").eval()
    loaded.load_adapter(tmp_path / "ours" / "b", "second")
    assert sorted(loaded.peft_config) == ["first", "second"]
    assert loaded.active_adapter == "first"  # loading does not switch
    torch.testing.assert_close(logits(loaded, batch), expected["default"], rtol=0, atol=0)
    loaded.set_adapter("second")
    torch.testing.assert_close(logits(loaded, batch), expected["b"], rtol=0, atol=0)
    mixed = logits(loaded, batch, adapter_names=["first", "second", "__base__", "second"])
    torch.testing.assert_close(mixed[1], expected["b"][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[0], expected["default"][0], rtol=1e-5, atol=1e-5)


def test_save_selected_adapters_only(tmp_path):
    """selected_adapters saves just those adapters."""
    model = two_adapters("gpt2")
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "b/adapter_config.json",
        "b/adapter_model.safetensors",
    ]


def test_delete_adapter_removes_its_modules_and_restores_layers():
    """delete_adapter drops the adapter's tensors everywhere, gives back plain layers no adapter covers,
    and leaves the other adapter's outputs untouched."""
    model = two_adapters("gpt2")
    batch = tiny_batch(model)
    out_a = alone(model, "a", batch)
    model.set_adapter("b")
    model.delete_adapter("b")

    assert sorted(model.peft_config) == ["a"] and model.active_adapters == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, batch), out_a)
    model.add_adapter("b", configs("gpt2")[1])  # the name is free again

    model.delete_adapter("a")
    assert model.active_adapters == ["b"]
    wrapped = {path for path, _ in model.adapted_layers()}
    assert wrapped == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    # Layers only "a" covered are the original Conv1D again, with their original weights.
    c_fc = model.base_model.transformer.h[0].mlp.c_fc
    assert not isinstance(c_fc, AdaptedLayer)
    assert torch.equal(c_fc.weight, _base("gpt2").transformer.h[0].mlp.c_fc.weight)


def test_delete_unknown_adapter_raises():
    """delete_adapter of a name that does not exist says which adapters do."""
    model = two_adapters("gpt2")
    with pytest.raises(ValueError, match=r"no adapter named 'zz'; the adapters are: a, b"):
        model.delete_adapter("zz")


def test_mixed_batch_across_methods():
    """Adapters of different methods (here every method of the table) in one model and one batch: each
    row equals its adapter alone."""
    model = get_peft_model(fresh_base("llama"), METHOD_TABLE[0].config(4, target_modules=TARGETS["llama"][0]),
                           adapter_name=METHOD_TABLE[0].name)
    for case in METHOD_TABLE[1:]:
        model.add_adapter(case.name, case.config(4, target_modules=TARGETS["llama"][0]))
    for seed, case in enumerate(METHOD_TABLE):
        perturb(model, case.name, seed=seed)
    model.eval()
    rows = [case.name for case in METHOD_TABLE] + ["__base__"]
    batch = tiny_batch(model, batch_size=len(rows))
    mixed = logits(model, batch, adapter_names=rows)
    base = alone(model, "__base__", batch)
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], alone(model, name, batch)[row], rtol=1e-5, atol=1e-5, msg=name)
        if name != "__base__":  # each adapter moves its row, so a row given the wrong adapter cannot pass
            assert (mixed[row] - base[row]).abs().max() > 1e-3, name
