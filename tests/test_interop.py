"""Interop with HF peft, both ways: same files, same keys, same logits.

An adapter saved by one library must load in the other with no missing or unexpected key and give
the same logits. Adapters are perturbed first (B ≠ 0, DoRA magnitudes and classifier copies moved),
so an adapter that silently failed to load would show up as a logit difference.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

from method_table import METHOD_CASES, WITH_HF_TWIN, MethodCase
from peftlab import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_batch, tiny_bert_seq_cls, tiny_gpt2, tiny_llama

ATOL = 1e-5

# Per model: builder, the shared config options, and the model-specific parts of some variants.
MODELS = {
    "gpt2": dict(
        build=tiny_gpt2,
        config=dict(target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM"),
        rank_pattern={"c_fc": 2, "h.1.attn.c_attn": 6},
        alpha_pattern={"c_fc": 3, "h.0.mlp.c_proj": 16},
        modules_to_save=["ln_f"],
    ),
    "llama": dict(
        build=tiny_llama,
        config=dict(target_modules="all-linear", task_type="CAUSAL_LM"),
        rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"down_proj": 5},
        modules_to_save=["norm"],
    ),
    "bert": dict(
        build=tiny_bert_seq_cls,
        config=dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS"),
        rank_pattern={"query": 2, "layer.1.attention.output.dense": 6},
        alpha_pattern={"value": 3},
        modules_to_save=["LayerNorm"],
    ),
}
# Every method of the table with an HF twin, then LoRA with the fields that change the file's layout.
VARIANTS = [case.name for case in WITH_HF_TWIN] + ["rank_pattern", "modules_to_save"]


def config_options(model_name: str, variant: str) -> dict:
    spec = MODELS[model_name]
    options = dict(spec["config"])
    if variant == "rank_pattern":
        options.update(rank_pattern=dict(spec["rank_pattern"]), alpha_pattern=dict(spec["alpha_pattern"]))
    elif variant == "modules_to_save":
        options["modules_to_save"] = list(spec["modules_to_save"])
    return copy.deepcopy(options)  # HF rewrites its config's fields in place


def case_of(variant: str) -> MethodCase:
    return METHOD_CASES.get(variant, METHOD_CASES["lora"])


def ours_config(model_name: str, variant: str):
    return case_of(variant).config(**config_options(model_name, variant))


def hf_config(model_name: str, variant: str):
    return case_of(variant).hf_config(**config_options(model_name, variant))


@pytest.fixture(scope="module")
def bases():
    """One base model per architecture; every test deep-copies it so both libraries start equal."""
    return {name: spec["build"]() for name, spec in MODELS.items()}


def perturb(model: torch.nn.Module, seed: int = 0) -> int:
    """Move every trainable tensor away from its init (zeros get noise, others a relative change)."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            scale = param.abs().mean()
            param.add_(noise * (0.1 if scale == 0 else 0.3 * scale))
            count += 1
    assert count > 0, "nothing to perturb: the adapter has no trainable tensor"
    return count


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def key_warnings(caught) -> list[str]:
    """Warnings that say some adapter keys were not loaded (HF only warns; for us they fail)."""
    messages = [str(w.message) for w in caught]
    return [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()]


def load_in_hf(base, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory))
    assert key_warnings(caught) == []
    return model.eval()


def load_in_peftlab(base, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(copy.deepcopy(base), directory)
    assert key_warnings(caught) == []
    # HF writes every field of its config; the unused ones hold "off" values and must load quietly. (A model
    # whose tied embedding the adapter trains alone is warned of: the model's doing, not the file's.)
    assert [str(w.message) for w in caught if "peftlab" in w.filename and "issues/2777" not in str(w.message)] == []
    return model.eval()


def assert_same_logits(ours, theirs, base, batch) -> None:
    expected = logits(theirs, batch)
    assert (logits(ours, batch) - expected).abs().max().item() <= ATOL
    # The comparison proves something only if the adapter changes the output.
    assert (expected - logits(base, batch)).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_peftlab_adapter_loads_in_hf_peft(bases, tmp_path, model_name, variant):
    """A perturbed peftlab adapter loads in HF peft with every key used and the same logits."""
    base = bases[model_name]
    batch = tiny_batch(base)
    ours = get_peft_model(copy.deepcopy(base), ours_config(model_name, variant)).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)

    theirs = load_in_hf(base, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    hf_keys = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    assert sorted(saved) == sorted(hf_keys)
    for key, tensor in saved.items():
        assert hf_keys[key].shape == tensor.shape, key
        torch.testing.assert_close(hf_keys[key], tensor, rtol=0, atol=0)
    assert_same_logits(ours, theirs, base, batch)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_hf_peft_adapter_loads_in_peftlab(bases, tmp_path, model_name, variant):
    """A perturbed HF peft adapter loads in peftlab with every key used and the same logits."""
    base = bases[model_name]
    batch = tiny_batch(base)
    theirs = peft.get_peft_model(copy.deepcopy(base), hf_config(model_name, variant)).eval()
    perturb(theirs)
    theirs.save_pretrained(tmp_path)

    ours = load_in_peftlab(base, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(saved) == sorted(ours.adapter_state_dict("default"))
    assert_same_logits(ours, theirs, base, batch)


def _normalised(key: str, value):
    # HF keeps target_modules as a set: its order in the file is arbitrary.
    if key in ("target_modules", "modules_to_save") and isinstance(value, list):
        return sorted(value)
    return value


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_adapter_config_matches_hf(bases, tmp_path, model_name, variant):
    """peftlab writes only HF's keys, all of those it shares with HF, with HF's values ("all-linear" expanded alike)."""
    base = bases[model_name]
    options = config_options(model_name, variant)
    ours_model = get_peft_model(copy.deepcopy(base), ours_config(model_name, variant))
    ours_model.save_pretrained(tmp_path / "ours")
    peft.get_peft_model(copy.deepcopy(base), hf_config(model_name, variant)).save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())

    hf_fields = {f.name for f in dataclasses.fields(getattr(peft, case_of(variant).hf))}
    shared = hf_fields & {f.name for f in dataclasses.fields(ours_model.peft_config["default"])}
    assert set(ours) <= hf_fields
    assert set(ours) >= shared | {"peft_type"}
    differing = {k: (ours[k], theirs.get(k)) for k in ours if _normalised(k, ours[k]) != _normalised(k, theirs.get(k))}
    assert differing == {}
    if options["target_modules"] == "all-linear":
        assert isinstance(ours["target_modules"], list) and "lm_head" not in " ".join(ours["target_modules"])


EMBEDDING_CASES = {
    "gpt2-wte": ("gpt2", dict(target_modules=["wte", "c_attn"], task_type="CAUSAL_LM")),
    "llama-embed_tokens": ("llama", dict(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")),
}


@pytest.mark.parametrize("direction", ["peftlab_to_hf", "hf_to_peftlab"])
@pytest.mark.parametrize("case", list(EMBEDDING_CASES))
def test_embedding_lora_interop(bases, tmp_path, case, direction):
    """LoRA on an nn.Embedding uses HF's lora_embedding_A/B keys and gives HF's logits, both ways."""
    model_name, options = EMBEDDING_CASES[case]
    base = bases[model_name]
    batch = tiny_batch(base)
    if direction == "peftlab_to_hf":
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, **copy.deepcopy(options))).eval()
        perturb(ours)
        ours.save_pretrained(tmp_path)
        theirs = load_in_hf(base, tmp_path)
    else:
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, **copy.deepcopy(options)))
        theirs.eval()
        perturb(theirs)
        if model_name == "llama":
            # HF saves the whole embed_tokens weight with the adapter; change some rows (as a run with
            # new tokens would), so peftlab must load them, not just tolerate the key.
            with torch.no_grad():
                theirs.get_input_embeddings().base_layer.weight[3:6] += 0.5
        theirs.save_pretrained(tmp_path)
        ours = load_in_peftlab(base, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len([k for k in saved if "lora_embedding" in k]) == 2
    if direction == "hf_to_peftlab" and model_name == "llama":
        assert "base_model.model.model.embed_tokens.base_layer.weight" in saved
    adapter_keys = sorted(k for k in saved if not k.endswith(".base_layer.weight"))
    hf_keys = peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)
    assert adapter_keys == sorted(hf_keys) == sorted(ours.adapter_state_dict("default"))
    assert_same_logits(ours, theirs, base, batch)
    # The embedding adapter alone moves the output (its A is zero at init, so this needs the perturbation).
    with torch.no_grad():
        ids = batch["input_ids"]
        emb_path = [p for p, _ in ours.adapted_layers() if p.endswith(("wte", "embed_tokens"))]
        assert len(emb_path) == 1
        layer = ours.base_model.get_submodule(emb_path[0])
        assert (layer(ids) - layer.base_layer(ids)).abs().max() > 1e-3


def test_hf_config_field_that_peftlab_cannot_honour_is_refused(bases, tmp_path):
    """An HF-only option that changes the math (here layer_replication) is refused by name, not dropped."""
    base = bases["llama"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layer_replication": [[0, 2]]}))
    with pytest.raises(ValueError, match=r"sets layer_replication=\[\[0, 2\]\]: an HF peft feature that peftlab does not support"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_hf_adapter_with_lora_bias_is_refused_as_unsupported(bases, tmp_path):
    """HF's lora_bias=True adds a trained bias to lora_B: peftlab says so, not "does not fit"."""
    base = bases["llama"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"sets lora_bias=True: an HF peft feature that peftlab does not support") as caught:
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert "does not fit" not in str(caught.value)


@pytest.mark.parametrize("options", [dict(modules_to_save=["embed_tokens"]), dict(modules_to_save=["lm_head"]),
                                     dict(target_modules=["q_proj", "embed_tokens"])])
def test_a_tied_embedding_trained_alone_warns_as_hf_does(options):
    """Without ensure_weight_tying, a tied embedding that the adapter trains (or adapts) alone is untied
    by training: HF peft warns (peft#2777), and so does peftlab; tying it, or an untied model, is quiet."""
    config = dict(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM") | options

    def untying_warnings(make, base, **extra):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = make(copy.deepcopy(base), extra)
        return [str(w.message) for w in caught if "tie" in str(w.message) and "2777" in str(w.message)], model

    hf = lambda base, extra: peft.get_peft_model(base, peft.LoraConfig(**config, **extra))  # noqa: E731
    ours = lambda base, extra: get_peft_model(base, LoraConfig(**config, **extra))  # noqa: E731
    tied = tiny_llama(tied=True)
    assert untying_warnings(hf, tied)[0]  # the oracle warns here
    messages, model = untying_warnings(ours, tied)
    wrapped = "embed_tokens" if "embed_tokens" in str(options) else "lm_head"
    assert len(messages) == 1 and f"trains or adapts {'model.' if wrapped == 'embed_tokens' else ''}{wrapped} on its " \
        "own" in messages[0] and "set ensure_weight_tying=True to keep them one" in messages[0]
    assert model.base_model.lm_head.weight is not None
    assert not untying_warnings(ours, tiny_llama(tied=False))[0]
    if "modules_to_save" in options and options["modules_to_save"] == ["embed_tokens"]:
        assert not untying_warnings(ours, tied, ensure_weight_tying=True)[0]


@pytest.mark.parametrize("direction", ["hf_to_peftlab", "peftlab_to_hf"])
def test_trained_tied_embedding_stays_tied_both_ways(tmp_path, direction):
    """HF's ensure_weight_tying: the trained copy of a tied input embedding is the output layer's too."""
    base = tiny_llama(tied=True)
    batch = tiny_batch(base)
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "norm"],
                   ensure_weight_tying=True, task_type="CAUSAL_LM")
    if direction == "hf_to_peftlab":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options)).eval()
        perturb(source)
        source.save_pretrained(tmp_path)
        loaded = load_in_peftlab(base, tmp_path)
    else:
        source = get_peft_model(copy.deepcopy(base), LoraConfig(**options)).eval()
        perturb(source)
        source.save_pretrained(tmp_path)
        loaded = load_in_hf(base, tmp_path)
    ours = loaded if direction == "hf_to_peftlab" else source
    assert ours.base_model.lm_head.weight is ours.base_model.model.embed_tokens.weight
    assert_same_logits(loaded, source, base, batch)
