"""Library inputs that used to give a traceback, an unclear message or a silently wrong result:
each now gives a one-line error that names the culprit (issue 14, items 2 and 4)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import perturb, tiny_batch, tiny_gpt2, tiny_llama

from peftlab import LoraConfig, PeftModel, get_peft_model


def test_get_peft_model_without_a_model_or_with_a_dict_config():
    with pytest.raises(TypeError, match=r"get_peft_model needs a torch model \(an nn.Module.*got NoneType"):
        get_peft_model(None, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"needs a peftlab config such as LoraConfig\(...\), got dict. Build one from the dict: LoraConfig\(\*\*d\)"):
        get_peft_model(tiny_llama(), {"r": 2, "target_modules": ["q_proj"]})


def test_invalid_regex_in_target_modules():
    with pytest.raises(ValueError, match=r"target_modules '.\*q_proj\(' is not a valid regular expression"):
        LoraConfig(target_modules=".*q_proj(")


def test_training_while_merged_is_refused_at_the_forward():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.merge_adapter()
    model.train()
    batch = tiny_batch(model)
    with pytest.raises(RuntimeError, match=r"adapter 'default' is merged into the weights .* call unmerge_adapter\(\) before training"):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    model.eval()
    with torch.no_grad():
        model(**batch)  # inference on a merged model is fine
    model.unmerge_adapter()
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(exclude_modules=["q_proj"]), r"target_modules matched 2 module\(s\) .* but exclude_modules=\['q_proj'\] removes every one"),
        (dict(layers_to_transform=[5]), r"but layers_to_transform=\[5\] removes every one of them.*the matched modules are in layers \[0, 1\]"),
    ],
)
def test_narrowing_options_that_remove_every_target_are_blamed(options, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], **options))


def test_rank_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"rank_pattern key 'nomatch' matches none of the 2 adapted modules"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"nomatch": 4}))
    with pytest.raises(ValueError, match=r"alpha_pattern key 'k_proj' matches none"):
        get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], alpha_pattern={"k_proj": 4}))
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4}))
    assert model.base_model.model.layers[0].self_attn.v_proj.adapters["default"].r == 4


def test_adapter_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"holds NaN or infinite values in {key}"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_seq_cls_adapter_on_a_causal_lm_says_what_it_was_trained_for(tmp_path):
    from transformers import GPT2ForSequenceClassification

    model = get_peft_model(GPT2ForSequenceClassification(tiny_gpt2().config), LoraConfig(r=2, target_modules=["c_attn"], task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"It was trained for task_type=SEQ_CLS but this model is a GPT2LMHeadModel \(CAUSAL_LM\)"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    with pytest.raises(ValueError, match=r"trained for task_type=SEQ_CLS but this model is a GPT2LMHeadModel"):
        get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"])).load_adapter(tmp_path, "other")


def test_a_rank_that_cannot_fit_in_memory_is_refused_before_allocating():
    # 2**40 x (16 + 16) float32 values: far beyond any machine's memory; torch would fail or swap.
    with pytest.raises(MemoryError, match=r"the adapter needs .* TiB for its weights alone .* lower r"):
        get_peft_model(tiny_llama(), LoraConfig(r=2**40, target_modules=["q_proj"]))


def test_a_perturbed_adapter_still_loads(tmp_path):
    """The checks above refuse broken files only: a trained adapter round-trips."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    batch = tiny_batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
