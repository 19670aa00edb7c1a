"""Issue 26, class 5: library calls that cannot do what the caller means get HF-level guidance or better --
get_peft_model on a model that carries adapters, training a model with nothing trainable, and HF peft's
top-level names for the methods peftlab has."""

from __future__ import annotations

import re

import peft
import pytest
from test_hf_compat import _trainer
from tiny_models import tiny_llama

import peftlab
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.api_guard import NothingToTrainError
from peftlab.methods import METHODS
from peftlab.optim import make_optimizer


def config(**changes) -> LoraConfig:
    return LoraConfig(**{"r": 2, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", **changes})


def test_get_peft_model_refuses_a_model_that_carries_adapters():
    model = get_peft_model(tiny_llama(), config())
    with pytest.raises(ValueError, match=r"already carries the adapter\(s\) default; .* model.add_adapter\(name, config\)"):
        get_peft_model(model, config(r=4))
    with pytest.raises(ValueError, match="the base model of a PeftModel"):
        get_peft_model(model.get_base_model(), config(r=4))
    model.add_adapter("second", config(r=4))  # the way that works
    assert set(model.peft_config) == {"default", "second"}
    assert get_peft_model(model.unload(), config()) is not None  # a clean base takes one again


def test_training_a_model_for_inference_says_why(tmp_path):
    get_peft_model(tiny_llama(), config()).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(NothingToTrainError, match=r"were loaded for inference: .*is_trainable=True"):
        make_optimizer(loaded, "adamw", 1e-3)
    with pytest.raises(NothingToTrainError, match="^Trainer: the model has no trainable parameters"):
        _trainer(loaded, tmp_path / "run", max_steps=1).train()
    make_optimizer(PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True), "adamw", 1e-3)


def test_training_a_merged_model_says_why():
    merged = get_peft_model(tiny_llama(), config()).merge_and_unload()
    with pytest.raises(NothingToTrainError, match=r"as in a model returned by merge_and_unload\(\)"):
        make_optimizer(merged, "sgd", 1e-3)


def hf_names_for_peftlab_methods() -> list[str]:
    """HF peft's top-level Config and Model classes whose method peftlab has (HF's spelling: AdaLora, Vera)."""
    ours = {"Lora", "AdaLora", "Vera"} | {m.config_class.__name__.removesuffix("Config") for m in METHODS.values()
                                          if m.config_class.__module__.startswith("peftlab.methods.")}
    return [name for name in dir(peft) if (match := re.fullmatch(r"(\w+?)(Config|Model)", name)) and match[1] in ours]


def test_hf_top_level_names_of_peftlabs_methods_import():
    names = hf_names_for_peftlab_methods()
    assert {"LoraConfig", "AdaLoraConfig", "VeraConfig", "LoraModel", "AdaLoraModel", "VeraModel"} <= set(names)
    assert [name for name in names if not hasattr(peftlab, name)] == []
    assert peftlab.AdaLoraConfig(target_r=2, init_r=4, total_step=10).peft_type == peft.AdaLoraConfig.__name__[:-6].upper()
    with pytest.raises(TypeError, match=r"peftlab has no separate LoraModel: .* get_peft_model\(model, LoraConfig"):
        peftlab.LoraModel(tiny_llama(), config(), "default")
