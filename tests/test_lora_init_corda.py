"""CorDA (``preprocess_corda`` + ``init_lora_weights="corda"``) against HF peft: from the same sample
data (batches of one sequence, HF's requirement), the same A, B and residual base, IPM and KPM, on
Linear (Llama) and Conv1D (GPT-2); the model starts unchanged."""

from __future__ import annotations

import copy
import warnings

import peft
import peft.tuners.lora.corda as hf_corda
import peft.tuners.lora.config
import pytest
import torch

from peftlab import CordaConfig, LoraConfig, get_peft_model, preprocess_corda
from tiny_models import tiny_batch, tiny_gpt2, tiny_llama

# HF's preprocess_corda matches "all-linear" as a regex (no layer): the layers by name.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {"llama": (tiny_llama, LLAMA_LINEAR), "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])}


def samples(count: int = 12) -> list[torch.Tensor]:
    return [torch.randint(3, 64, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(count)]


def run_on(model, data):
    def run():
        for ids in data:
            model(input_ids=ids)
    return run


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_hf(method, model_name, tmp_path):
    build, targets = MODELS[model_name]
    base, data = build(), samples()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_base = copy.deepcopy(base)
        hf_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                                    corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))
        hf_corda.preprocess_corda(hf_base, hf_config, run_model=run_on(hf_base, data))
        hf = peft.get_peft_model(hf_base, hf_config)
    ours_base = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=method, cache_file=str(tmp_path / "cache.safetensors")))
    preprocess_corda(ours_base, config, run_model=run_on(ours_base, data))
    ours = get_peft_model(ours_base, config)
    theirs, mine = peft.get_peft_model_state_dict(hf), ours.adapter_state_dict("default")
    assert set(mine) == set(theirs)
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0, msg=key)
    for path, layer in ours.adapted_layers():
        hf_layer = hf.base_model.model.get_submodule(path).get_base_layer()
        hf_weight = hf_layer.weight.T if model_name == "gpt2" else hf_layer.weight
        torch.testing.assert_close(layer.view.weight(), hf_weight, atol=1e-5, rtol=0, msg=path)
    batch = tiny_batch(base)
    torch.testing.assert_close(ours(**batch).logits, base(**batch).logits, atol=1e-5, rtol=0)
    # The cache gives the same start without running the data again.
    again = copy.deepcopy(base)
    preprocess_corda(again, config)
    cached = get_peft_model(again, config)
    for key, value in cached.adapter_state_dict("default").items():
        torch.testing.assert_close(value, mine[key], atol=0, rtol=0)


def test_corda_without_data_is_refused():
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="corda", corda_config=CordaConfig())
    with pytest.raises(ValueError, match="CorDA needs data.*run_model"):
        preprocess_corda(tiny_llama(), config)
    with pytest.raises(ValueError, match="needs the layers' decompositions.*preprocess_corda"):
        get_peft_model(tiny_llama(), config)


def test_corda_method_must_be_ipm_or_kpm():
    with pytest.raises(ValueError, match="'ipm' or 'kpm'"):
        CordaConfig(corda_method="pca")
