"""Training hooks: found on a method and its adapters, called at their points by the loop and
by the HF Trainer callback; a hook's state survives a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_models import tiny_bert_seq_cls
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401
from transformers import Trainer, TrainingArguments

from peftlab import LoraConfig, get_peft_model
from peftlab.data import ClassificationCollator, load_dataset_spec
from peftlab.methods import register_method, unregister_method
from peftlab.methods.lora import LoraAdapter, LoraMethod
from peftlab.train import TrainingHook, run_training
from peftlab.train.callback import HookLossMixin, TrainingHooksCallback
from peftlab.train.checkpoint import load_checkpoint
from peftlab.train.hooks import discover_hooks

EVENTS: list[tuple[str, int]] = []


class RecordingHook(TrainingHook):
    """Records each call; checks that the adapters have gradients after backward and none at step begin."""

    def __init__(self, model, penalty: float = 0.0) -> None:
        self.params = [p for n, p in model.named_parameters() if "lora_A" in n]
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.penalty = penalty
        self.calls = 0

    def on_step_begin(self, progress):
        assert all(p.grad is None or not p.grad.any() for p in self.trained)
        EVENTS.append(("begin", progress.step))

    def extra_loss(self, progress):
        EVENTS.append(("loss", progress.step))
        return self.penalty * sum(p.square().sum() for p in self.params) if self.penalty else None

    def after_backward(self, progress):
        assert all(p.grad is not None for p in self.trained) and any(p.grad.any() for p in self.trained)
        EVENTS.append(("backward", progress.step))

    def after_optimizer_step(self, progress):
        self.calls += 1
        EVENTS.append(("optimizer", progress.step))

    def state_dict(self):
        return {"calls": torch.tensor(self.calls)}

    def load_state_dict(self, state):
        self.calls = int(state["calls"])


@dataclass
class HookedLoraConfig(LoraConfig):
    """A toy method: LoRA plus a RecordingHook for the whole model."""

    penalty: float = 0.0
    peft_type = "HOOKED_LORA"
    peftlab_only_fields = ("penalty",)


class HookedLoraMethod(LoraMethod):
    config_class = HookedLoraConfig

    def training_hooks(self, model, adapter_name):
        penalty = model.peft_config[adapter_name].penalty
        return [RecordingHook(model, penalty), *super().training_hooks(model, adapter_name)]


@pytest.fixture
def hooked_method():
    EVENTS.clear()
    register_method(HookedLoraMethod("hooked"))
    yield
    unregister_method("hooked")


def test_hooks_are_found_on_the_method_and_adapters(hooked_method, monkeypatch):
    model = get_peft_model(tiny_bert_seq_cls(), HookedLoraConfig(r=2, target_modules=["query", "value"]))
    assert [type(h) for h in discover_hooks(model)] == [RecordingHook]
    monkeypatch.setattr(LoraAdapter, "training_hooks", lambda self: [TrainingHook()])
    assert len(discover_hooks(model)) == 1 + 4  # the method's, and one per adapted layer (2 layers x 2)
    assert discover_hooks(tiny_bert_seq_cls()) == []  # full fine-tuning: none


def test_the_loop_calls_hooks_in_order_with_gradients_present(hooked_method, bert_dir, sentiment_dir, tmp_path):
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, method="hooked", max_steps=3, grad_accum=2, save_every=3))
    per_step = [("begin", 0), ("loss", 0), ("loss", 0), ("backward", 0), ("optimizer", 0)]
    assert EVENTS[:5] == per_step and len(EVENTS) == 15 and EVENTS[-1] == ("optimizer", 2)
    assert load_checkpoint(tmp_path).hooks == {"0": {"calls": torch.tensor(3)}}


def test_a_hook_loss_term_reaches_the_gradients(hooked_method, bert_dir, sentiment_dir, tmp_path):
    def lora_a_norm(penalty: float) -> float:
        out = tmp_path / str(penalty)
        # Plain SGD, so the step follows the gradient's size: the penalty alone shrinks A by 0.8 a step.
        run_training(tiny_options(bert_dir, sentiment_dir, out, method="hooked", max_steps=8, optimizer="sgd", lr=1e-2,
                                  momentum=0.0, max_grad_norm=None, scheduler="constant", warmup_ratio=0.0,
                                  method_options={"penalty": penalty}))
        from safetensors.torch import load_file

        return sum(t.norm() for k, t in load_file(out / "adapter_model.safetensors").items() if "lora_A" in k)

    assert lora_a_norm(10.0) < 0.5 * lora_a_norm(0.0)


def test_hf_trainer_gets_the_same_hooks(hooked_method, bert_dir, sentiment_dir, tiny_tokenizer, tmp_path):
    model = get_peft_model(tiny_bert_seq_cls(), HookedLoraConfig(r=2, target_modules=["query", "value"], penalty=1.0))

    class HookedTrainer(HookLossMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False,
                             logging_strategy="no", disable_tqdm=True)
    trainer = HookedTrainer(model=model, args=args, train_dataset=load_dataset_spec(sentiment_dir, "train"),
                            data_collator=ClassificationCollator(tiny_tokenizer, max_length=16),
                            callbacks=[TrainingHooksCallback()])
    trainer.train()
    kinds = [kind for kind, _ in EVENTS]
    assert kinds == ["begin", "loss", "loss", "backward", "optimizer"] * 2
    assert [step for kind, step in EVENTS if kind == "optimizer"] == [0, 1]

    # Without the mixin the loss term is missing, and the callback says so.
    plain = Trainer(model=model, args=args, train_dataset=load_dataset_spec(sentiment_dir, "train"),
                    data_collator=ClassificationCollator(tiny_tokenizer, max_length=16), callbacks=[TrainingHooksCallback()])
    with pytest.warns(UserWarning, match="HookLossMixin"):
        plain.train()
