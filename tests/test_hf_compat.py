"""HF peft code runs with ``peft`` replaced by ``peftlab``: the names, what they return, and the
Trainer saving adapter folders. HF peft is the oracle where it has the same call."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_bert_seq_cls, tiny_gpt2, tiny_llama

import peftlab
from peftlab import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    PeftType,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peftlab.config import TASK_TYPES
from peftlab.methods import register_method, unregister_method
from peftlab.methods.lora import LoraMethod
from peftlab.methods.lora_targets import LORA_DEFAULT_TARGET_MODULES

HF_NAMES = [
    "TaskType", "PeftType", "PeftConfig", "LoraConfig", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForSequenceClassification", "PeftModelForSeq2SeqLM", "PeftModelForTokenClassification",
    "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction", "AutoPeftModel", "AutoPeftModelForCausalLM",
    "AutoPeftModelForSequenceClassification", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForTokenClassification",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForFeatureExtraction", "get_peft_model",
    "get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
]


@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_peft_name_exists_in_peftlab(name):
    assert hasattr(peft, name), f"{name} is not an HF peft name"  # the list itself is checked against HF
    assert hasattr(peftlab, name)


def test_task_type_values_are_hfs():
    assert {t.value for t in TaskType} == {t.value for t in peft.TaskType}
    assert {t.value for t in TaskType} == set(TASK_TYPES)  # the names configs accept
    assert TaskType.CAUSAL_LM == "CAUSAL_LM" and LoraConfig(task_type=TaskType.SEQ_CLS).task_type == "SEQ_CLS"


def test_peft_type_follows_the_registry():
    """PeftType is derived from the method registry: a method registered later is a member too."""
    assert PeftType.LORA == peft.PeftType.LORA.value == LoraConfig.peft_type and PeftType.LORA.value == "LORA"
    with pytest.raises(AttributeError, match="PeftType has no 'TOY'"):
        PeftType.TOY

    class ToyConfig(LoraConfig):
        peft_type = "TOY"

    class ToyMethod(LoraMethod):
        config_class = ToyConfig

    register_method(ToyMethod("toy"))
    try:
        assert PeftType.TOY == "TOY" and "TOY" in PeftType and "TOY" in list(PeftType)
    finally:
        unregister_method("toy")
    assert "TOY" not in PeftType


def test_config_from_pretrained_reads_an_hf_adapter(tmp_path):
    hf_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(tiny_llama(), hf_config).save_pretrained(tmp_path)
    for cls in (PeftConfig, LoraConfig):
        config = cls.from_pretrained(tmp_path)
        assert type(config) is LoraConfig
        assert (config.r, config.lora_alpha, sorted(config.target_modules), config.task_type) == (4, 8, ["q_proj", "v_proj"], "CAUSAL_LM")
    config.save_pretrained(tmp_path / "again")
    assert LoraConfig.from_pretrained(tmp_path / "again") == config


def test_get_peft_model_returns_the_task_class(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model, PeftModel)
    assert type(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))).__mro__[1] is PeftModel
    model.save_pretrained(tmp_path)
    assert isinstance(PeftModel.from_pretrained(tiny_llama(), tmp_path), PeftModelForCausalLM)
    classifier = get_peft_model(tiny_bert_seq_cls(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert isinstance(classifier, PeftModelForSequenceClassification)


def _saved_base(folder, model):
    model.save_pretrained(folder)
    return str(folder)


def test_auto_peft_model_loads_base_and_adapter(tmp_path):
    base_dir = _saved_base(tmp_path / "base", tiny_llama())
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                   base_model_name_or_path=base_dir))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    batch = tiny_batch(model)
    for auto in (AutoPeftModelForCausalLM, AutoPeftModel):
        loaded = auto.from_pretrained(tmp_path / "adapter")
        assert isinstance(loaded, PeftModelForCausalLM)
        assert max_diff(logits(loaded, batch), logits(model, batch)) == 0.0
    with pytest.raises(ValueError, match="trained for task_type=CAUSAL_LM; load it with AutoPeftModelForCausalLM"):
        AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")


def test_auto_peft_model_for_classification_gets_the_saved_class_count(tmp_path):
    base = tiny_bert_seq_cls()
    base_dir = _saved_base(tmp_path / "base", base)
    three = copy.deepcopy(base)
    three.config.num_labels = 3
    three.classifier = torch.nn.Linear(three.config.hidden_size, 3)
    model = get_peft_model(three, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS", base_model_name_or_path=base_dir))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "adapter")
    batch = tiny_batch(model)
    assert logits(loaded, batch).shape[-1] == 3
    assert max_diff(logits(loaded, batch), logits(model, batch)) < 1e-6


def test_auto_peft_model_applies_the_recorded_4bit_base(tmp_path):
    from peftlab.quant import Linear4bit, quantize_model

    base_dir = _saved_base(tmp_path / "base", tiny_llama(hidden=64))
    model = get_peft_model(quantize_model(tiny_llama(hidden=64)),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", base_model_name_or_path=base_dir))
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert any(isinstance(m, Linear4bit) for m in loaded.modules())
    batch = tiny_batch(model)
    assert max_diff(logits(loaded, batch), logits(model, batch)) == 0.0


def test_state_dict_functions_match_hf_and_round_trip():
    base = tiny_llama()
    config = dict(r=2, target_modules=["q_proj", "v_proj"])
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    assert sorted(get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    perturb(theirs)
    result = set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    batch = tiny_batch(base)
    assert max_diff(logits(ours, batch), logits(theirs, batch)) < 1e-6
    broken = {k: v.clone() for k, v in get_peft_model_state_dict(ours).items()}
    key = sorted(broken)[0]
    broken[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"NaN or infinite values in {key}"):
        set_peft_model_state_dict(ours, broken)


def test_inject_adapter_in_model_matches_hfs_low_level_api():
    base = tiny_llama()
    config = dict(r=2, target_modules=["q_proj", "v_proj"])
    ours = copy.deepcopy(base)
    assert inject_adapter_in_model(LoraConfig(**config), ours) is ours
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(base))
    assert sorted(get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    # The same tensors train (module names inside a layer differ: see the README's differences).
    assert sorted(p.shape for p in ours.parameters() if p.requires_grad) == sorted(
        p.shape for p in theirs.parameters() if p.requires_grad
    )
    perturb(theirs)
    set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    batch = tiny_batch(base)
    assert max_diff(logits(ours, batch), logits(theirs, batch)) < 1e-6


def test_prepare_model_for_kbit_training_on_a_4bit_base():
    from peftlab.quant import quantize_model

    base = quantize_model(tiny_llama(hidden=64))
    base.model.norm.to(torch.bfloat16)
    prepared = prepare_model_for_kbit_training(base)
    assert prepared is base
    assert all(not p.requires_grad for p in base.parameters())
    assert all(p.dtype == torch.float32 for p in base.parameters())
    assert base.is_activation_checkpointing
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    model.train()
    batch = tiny_batch(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("model_type", sorted(LORA_DEFAULT_TARGET_MODULES))
def test_default_lora_targets_equal_hfs(model_type):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as hf_table

    assert LORA_DEFAULT_TARGET_MODULES[model_type] == hf_table[model_type]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert_seq_cls])
def test_lora_config_without_target_modules_adapts_what_hf_adapts(build):
    ours = get_peft_model(build(), LoraConfig(r=2))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=2))
    assert sorted(get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)


def test_lora_config_without_target_modules_on_an_unknown_model_type_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules is not set and LoraConfig has no default for model type None"):
        get_peft_model(model, LoraConfig(r=2))


def test_save_pretrained_refuses_pickle_and_names_ignored_arguments(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="safe_serialization=False.*safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not any(tmp_path.iterdir())
    with pytest.warns(UserWarning, match="peftlab ignores save_embedding_layers"):
        model.save_pretrained(tmp_path, save_embedding_layers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "quiet", safe_serialization=True, save_embedding_layers="auto")
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()


# -- HF Trainer and TRL -----------------------------------------------------------------------------


def _lm_rows(count: int = 8, length: int = 8) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 64, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def _trainer(model, out, eval_dataset=None, **args):
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, **args,
    )
    return Trainer(model=model, args=arguments, train_dataset=_lm_rows(), eval_dataset=eval_dataset)


def test_importing_peftlab_patches_nothing_until_a_model_is_built():
    """``import peftlab`` leaves transformers' Trainer, its attention registry and the import system alone; the first PeftModel
    installs the Trainer support (checked in a fresh interpreter, since this one has built models)."""
    import subprocess
    import sys

    probe = (
        "import sys, peftlab, transformers.trainer as t\n"
        "from peftlab.hf_trainer import _PatchOnImport\n"
        "hooked = lambda: any(isinstance(f, _PatchOnImport) for f in sys.meta_path)\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as attention\n"
        "print(hooked(), hasattr(t, '_peftlab_wrapped'), 'peftlab_s2' in attention)\n"
        "from tiny_models import tiny_llama\n"
        "peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=2, target_modules=['q_proj']))\n"
        "print(hooked(), hasattr(t, '_peftlab_wrapped'), 'peftlab_s2' in attention)\n"
        "peftlab.get_peft_model(tiny_llama(), peftlab.LongLoraConfig(r=2, target_modules=['q_proj'], rope_scale=2.0))\n"
        "print('peftlab_s2' in attention)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent).stdout.split("\n")
    # S²-Attn joins transformers' attention registry when a LongLoRA model first uses it, not on import.
    assert out[:3] == ["False False False", "True True False", "True"]


def test_hf_trainer_writes_adapter_folders_and_resumes_from_them(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer = _trainer(model, tmp_path / "run", max_steps=2, save_steps=1, save_strategy="steps")
    trainer.train()
    trainer.save_model(tmp_path / "final")
    for folder in (tmp_path / "run" / "checkpoint-1", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}
    # HF peft loads what the Trainer wrote.
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    batch = tiny_batch(model)
    assert max_diff(logits(theirs, batch), logits(model, batch)) < 1e-6
    # Resuming loads the checkpoint's adapter (not nothing): step 2 from checkpoint-1 equals the first run's step 2.
    fresh = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    resumed = _trainer(fresh, tmp_path / "resumed", max_steps=2, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert max_diff(logits(fresh, batch), logits(model, batch)) < 1e-6


def test_hf_trainer_loads_the_best_adapter_at_the_end(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    trainer = _trainer(model, tmp_path / "run", eval_dataset=_lm_rows(4), max_steps=3, save_steps=1, save_strategy="steps",
                       eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                       greater_is_better=True)  # "best" = highest loss: an early checkpoint, not the final weights
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    saved = load_file(f"{best}/adapter_model.safetensors")
    current = get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(current) and all(torch.equal(saved[k], current[k]) for k in saved)


def test_trl_sft_trainer_trains_a_peftlab_model(tmp_path, tiny_tokenizer):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = ["a good movie", "the film was bad", "great review", "awful film is bad"] * 2
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    arguments = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, max_length=16, disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(model=model, args=arguments, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tiny_tokenizer)
    trainer.train()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
