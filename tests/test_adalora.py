"""AdaLoRA against HF peft as the oracle: the same training gives the same masks and logits, the
files go both ways (pruned ones too), and every bad input is refused with a clear error.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from peftlab import PeftModel, get_peft_model
from peftlab.hooks import TrainingProgress
from peftlab.methods.adalora import AdaLoraConfig, rank_per_layer
from peftlab.methods.lora_targets import ADALORA_DEFAULT_TARGET_MODULES
from peftlab.train.hooks import HookRunner, discover_hooks
from peftlab.data import ClassificationCollator, load_dataset_spec
from peftlab.train import run_training
from peftlab.train.callback import HookLossMixin, TrainingHooksCallback
from tiny_models import logits, max_diff, tiny_batch, tiny_bert_seq_cls, tiny_gpt2, tiny_llama
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401
from transformers import Trainer, TrainingArguments

TARGETS = ["q_proj", "v_proj", "down_proj"]
# HF adds its regulariser only under a task_type (PeftModel.forward skips AdaLoraModel.forward without one).
# init 4 -> average 2 over 6 layers: the budget falls 24 -> 12 between steps 5 and 25, masks every 2 steps.
SCHEDULE = dict(task_type="CAUSAL_LM", init_r=4, target_r=2, tinit=5, tfinal=5, deltaT=2, total_step=30, lora_alpha=8, beta1=0.85, beta2=0.85)
STEPS = 30


def hf_and_peftlab(base, **fields):
    """The same AdaLoRA adapter in both libraries: peftlab's tensors are copies of HF's initial ones."""
    hf = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(target_modules=TARGETS, **fields))
    ours = get_peft_model(copy.deepcopy(base), AdaLoraConfig(target_modules=TARGETS, **fields))
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for path, adapter in ours.adapters_of("default"):
            for name, param in adapter.factors().items():
                param.copy_(hf_params[f"base_model.model.{path}.{name}.default"])
    return hf, ours


def batches(model, count: int) -> list[dict]:
    return [tiny_batch(model, seed=100 + i) for i in range(count)]


def hf_masks(hf) -> dict[str, list[bool]]:
    pattern = hf.peft_config["default"].rank_pattern or {}
    return {key.removesuffix(".lora_E.default"): kept for key, kept in pattern.items()}


def our_masks(model) -> dict[str, list[bool]]:
    return {path: adapter.kept.tolist() for path, adapter in model.adapters_of("default")}


def train_both(hf, ours, steps: int = STEPS):
    """HF's custom loop on both (theirs adds the regulariser in forward, ours through the hook)."""
    hf_opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=2e-2)
    our_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    runner = HookRunner(discover_hooks(ours))
    masks = []
    for step, batch in enumerate(batches(ours, steps)):
        for model, optimizer in ((hf, hf_opt), (ours, our_opt)):
            model.train()
            loss = model(**batch, labels=batch["input_ids"]).loss
            if model is ours:
                loss = loss + runner.extra_loss(TrainingProgress(step, 0, 0.0))
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step) if model is hf else model.update_and_allocate(step)
            optimizer.zero_grad()
        masks.append((hf_masks(hf), our_masks(ours)))
    return masks


def test_training_matches_hf_step_by_step_and_prunes():
    base = tiny_llama()
    hf, ours = hf_and_peftlab(base, **SCHEDULE)
    masks = train_both(hf, ours)
    pruned_steps = 0
    for step, (theirs, mine) in enumerate(masks):
        if theirs:  # HF has a rank pattern once it first masks (step 6 here)
            assert mine == theirs, f"masks differ at step {step}"
            pruned_steps += 1
        else:
            assert all(all(kept) for kept in mine.values()), f"peftlab pruned at step {step} before HF did"
    assert pruned_steps == STEPS - 6
    final = our_masks(ours)
    assert sum(sum(kept) for kept in final.values()) == 2 * len(final)  # the target budget
    assert len({sum(kept) for kept in final.values()}) > 1  # moved between layers, not uniform
    for _, adapter in ours.adapters_of("default"):
        assert torch.all(adapter.lora_E[~adapter.kept] == 0)
    batch = tiny_batch(base, seed=7)
    assert max_diff(logits(ours.eval(), batch), logits(hf.eval(), batch)) < 1e-4
    assert rank_per_layer(ours, "default") == {path: sum(kept) for path, kept in final.items()}


def test_pruned_files_load_in_hf_and_back_and_export_as_plain_lora(tmp_path):
    base = tiny_llama()
    hf, ours = hf_and_peftlab(base, **SCHEDULE)
    train_both(hf, ours)
    batch = tiny_batch(base, seed=7)
    expected = logits(ours.eval(), batch)

    final_masks = our_masks(ours)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == STEPS
    assert saved["rank_pattern"] == {f"{p}.lora_E": k for p, k in our_masks(ours).items()}
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for path, kept in our_masks(ours).items():
        assert tensors[f"base_model.model.{path}.lora_A"].shape[0] == sum(kept)
        assert tensors[f"base_model.model.{path}.lora_B"].shape[1] == sum(kept)
        assert tensors[f"base_model.model.{path}.lora_E"].shape == (sum(kept), 1)

    in_hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert max_diff(logits(in_hf.eval(), batch), expected) < 1e-5
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert max_diff(logits(back, batch), expected) < 1e-6

    # HF's own file of the same training, and ours re-saved after loading a pruned one.
    hf.save_pretrained(tmp_path / "hf")
    from_hf = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "hf")
    assert max_diff(logits(from_hf, batch), logits(hf.eval(), batch)) < 1e-5
    back.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == saved["rank_pattern"]

    # Exported as plain LoRA for serving: exact, each layer keeping only its live components (zero-padded to r).
    ours.save_pretrained(tmp_path / "lora", as_lora=True)
    exported = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["r"] == max(rank_per_layer(ours, "default").values())
    lora_tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    live = {path: int(lora_tensors[f"base_model.model.{path}.lora_A.weight"].any(dim=1).sum()) for path in final_masks}
    assert live == rank_per_layer(ours, "default") and min(live.values()) < 4
    as_lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    assert max_diff(logits(as_lora.eval(), batch), expected) < 1e-5


def test_an_unpruned_adapter_round_trips_without_a_rank_pattern(tmp_path):
    base = tiny_gpt2()  # Conv1D layers
    config = AdaLoraConfig(target_modules=["c_attn", "c_fc"], init_r=3, target_r=2, total_step=10)
    ours = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for _, adapter in ours.adapters_of("default"):
            adapter.lora_E.normal_()
    batch = tiny_batch(base)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    in_hf = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert max_diff(logits(in_hf.eval(), batch), logits(ours.eval(), batch)) < 1e-5
    assert max_diff(logits(ours, batch), logits(base, batch)) > 1e-3
    merged = copy.deepcopy(ours).merge_and_unload()
    assert max_diff(logits(merged, batch), logits(ours, batch)) < 1e-5


# -- the loops call the allocator themselves ----------------------------------------------------------


def assert_pruned_to_target(folder, total_step: int) -> None:
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["total_step"] == total_step  # filled from the run
    kept = [sum(mask) for mask in saved["rank_pattern"].values()]
    assert len(kept) >= 4 and sum(kept) == saved["target_r"] * len(kept)


def test_peftlab_training_fills_total_step_and_prunes(bert_dir, sentiment_dir, tmp_path):
    options = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "lora_alpha": 8}
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, method="adalora", max_steps=8, method_options=options))
    assert_pruned_to_target(tmp_path, total_step=8)


def test_hf_trainer_callback_fills_total_step_and_prunes(sentiment_dir, tiny_tokenizer, tmp_path):
    model = get_peft_model(tiny_bert_seq_cls(), AdaLoraConfig(target_modules=["query", "value"], init_r=4, target_r=2))

    class AdaLoraTrainer(HookLossMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, logging_strategy="no",
                             disable_tqdm=True)
    trainer = AdaLoraTrainer(model=model, args=args, train_dataset=load_dataset_spec(sentiment_dir, "train"),
                             data_collator=ClassificationCollator(tiny_tokenizer, max_length=16),
                             callbacks=[TrainingHooksCallback()])
    trainer.train()
    model.save_pretrained(tmp_path / "adapter")
    assert_pruned_to_target(tmp_path / "adapter", total_step=6)


# -- bad input ---------------------------------------------------------------------------------------


def test_target_r_above_init_r_is_refused():
    with pytest.raises(ValueError, match=r"target_r \(8\) > init_r \(4\).*raise init_r or lower target_r"):
        AdaLoraConfig(init_r=4, target_r=8, total_step=10)


def test_a_schedule_without_a_pruning_phase_is_refused():
    with pytest.raises(ValueError, match=r"tinit \(5\) >= total_step \(10\) - tfinal \(5\)"):
        AdaLoraConfig(tinit=5, tfinal=5, total_step=10)
    # Filled from the run, the same check runs before the first step.
    model = get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=TARGETS, tinit=5, tfinal=5))
    with pytest.raises(ValueError, match=r"tinit \(5\) >= total_step \(8\) - tfinal \(5\)"):
        HookRunner(discover_hooks(model)).on_step_begin(TrainingProgress(0, 8, 0.0))


def test_no_total_step_where_the_loop_cannot_give_one_is_refused():
    model = get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=TARGETS))
    batch = tiny_batch(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with pytest.raises(ValueError, match=r"AdaLoRA needs total_step.*AdaLoraConfig\(total_step=\.\.\.\)"):
        model.update_and_allocate(0)
    # A run's length fills it (as peftlab's loop and the Trainer callback pass it).
    HookRunner(discover_hooks(model)).after_optimizer_step(TrainingProgress(0, 12, 0.0))
    assert model.peft_config["default"].total_step == 12


def test_allocating_without_gradients_is_refused():
    model = get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=TARGETS, total_step=10))
    with pytest.raises(RuntimeError, match="after loss.backward.*before zero_grad"):
        model.update_and_allocate(0)


def test_two_trainable_adalora_adapters_are_refused():
    model = get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=TARGETS, total_step=10))
    with pytest.raises(ValueError, match="AdaLoRA trains one adapter at a time, and 'default' is trainable already"):
        model.add_adapter("second", AdaLoraConfig(target_modules=TARGETS, total_step=10))
    assert list(model.peft_config) == ["default"]
    model.add_adapter("frozen", AdaLoraConfig(target_modules=TARGETS, total_step=10, inference_mode=True))


def test_other_bad_values_are_refused():
    for fields, message in [
        ({"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True]}}, "list of init_r=12 booleans"),
        ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
        ({"orth_reg_weight": -1}, "orth_reg_weight must be >= 0"),
        ({"deltaT": 0}, "deltaT must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdaLoraConfig(total_step=10, **fields)
    with pytest.raises(TypeError, match=r"Embedding layer \(model.embed_tokens\)"):
        get_peft_model(tiny_llama(), AdaLoraConfig(target_modules=["embed_tokens"], total_step=10))


@pytest.mark.parametrize("model_type", sorted(ADALORA_DEFAULT_TARGET_MODULES))
def test_default_targets_are_hfs(model_type):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as hf_table

    assert ADALORA_DEFAULT_TARGET_MODULES[model_type] == hf_table[model_type]
