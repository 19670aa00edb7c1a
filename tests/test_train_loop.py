"""The training loop on tiny models: outputs, metrics, batching, checkpointing of activations, state."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import bert_dir, gpt2_dir, llama_dir, prompt_dir, sentiment_dir, tiny_options  # noqa: F401
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import torch.distributed as dist
from peftlab import LoraConfig, get_peft_model
from peftlab.train import run_training
from peftlab.train.loop import enable_gradient_checkpointing

METRIC_KEYS = {"eval_accuracy", "train_time_s", "peak_memory_mb", "trainable_params", "total_params", "steps",
               "train_loss_curve", "val_curve", "train_accuracy", "time_per_step_s", "examples_per_s", "options"}


def test_lora_run_writes_adapter_and_metrics(bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "out"
    metrics = run_training(tiny_options(bert_dir, sentiment_dir, out, epochs=2, eval_every=4))
    assert METRIC_KEYS <= set(metrics)
    assert metrics["steps"] == 16 and len(metrics["train_loss_curve"]) == 16 and len(metrics["train_accuracy"]) == 2
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    split = metrics["time_split_per_step_s"]  # a CPU run: forward, backward and optimizer timed per step
    assert set(split) == {"forward", "backward", "optimizer"} and all(v > 0 for v in split.values())
    assert sum(split.values()) < metrics["time_per_step_s"]
    assert [v["step"] for v in metrics["val_curve"]] == [4, 8, 12, 16]
    assert metrics["options"]["lr"] == 1e-3 and metrics["options"]["target_modules"] == ["query", "key", "value", "dense"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(1, 17))
    assert {"step", "epoch", "loss", "lr", "step_time_s", "examples_per_s"} <= set(lines[0])
    assert lines[0]["loss"] == metrics["train_loss_curve"][0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(bert_dir)
    assert "base_model.model.classifier.weight" in load_file(out / "adapter_model.safetensors")


def test_full_fine_tuning_saves_a_plain_model(bert_dir, sentiment_dir, tmp_path):
    out = tmp_path / "full"
    metrics = run_training(tiny_options(bert_dir, sentiment_dir, out, method="full", max_steps=3))
    assert metrics["trainable_params"] == metrics["total_params"] and metrics["options"]["lr"] == 5e-5
    assert (out / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    before = AutoModelForSequenceClassification.from_pretrained(bert_dir)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, before.bert.encoder.layer[0].attention.self.query.weight)
    assert AutoTokenizer.from_pretrained(out).pad_token == "[PAD]"


def test_causal_lm_reports_perplexity(gpt2_dir, prompt_dir, tmp_path):
    metrics = run_training(tiny_options(gpt2_dir, prompt_dir, tmp_path / "lm", task="causal-lm", method="dora", max_steps=4))
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item())
    assert metrics["options"]["target_modules"] == ["c_attn"]


def test_qlora_trains_on_a_4bit_base(llama_dir, prompt_dir, tmp_path):
    metrics = run_training(tiny_options(llama_dir, prompt_dir, tmp_path / "q", task="causal-lm", method="qlora", max_steps=2))
    assert metrics["options"]["target_modules"] == "all-linear"
    assert metrics["trainable_params"] < metrics["total_params"]
    assert all(torch.isfinite(torch.tensor(metrics["train_loss_curve"])))


def test_gradient_accumulation_matches_the_larger_batch(bert_dir, sentiment_dir, tmp_path):
    one = run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "a", batch_size=16, max_steps=3))
    two = run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "b", batch_size=8, grad_accum=2, max_steps=3))
    assert one["train_loss_curve"] == pytest.approx(two["train_loss_curve"], abs=1e-6)
    a, b = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_sgd_cosine_bf16_and_checkpointing_run(bert_dir, sentiment_dir, tmp_path):
    metrics = run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "x", optimizer="sgd", scheduler="cosine",
                                        bf16=True, gradient_checkpointing=True, max_steps=3, lr=0.1))
    assert all(torch.isfinite(torch.tensor(metrics["train_loss_curve"])))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_adapters_get_gradients_with_checkpointing_and_a_frozen_embedding(use_reentrant):
    from tiny_models import tiny_batch, tiny_bert_seq_cls

    def adapter_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = get_peft_model(tiny_bert_seq_cls(), LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
        assert not model.get_base_model().bert.embeddings.word_embeddings.weight.requires_grad
        if checkpointing:
            enable_gradient_checkpointing(model, use_reentrant=use_reentrant)
        model.train()
        model(**tiny_batch(model)).logits.square().sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    plain, checkpointed = adapter_grads(False), adapter_grads(True)
    assert plain and all(g is not None and g.abs().sum() > 0 for g in checkpointed.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


def test_no_global_state_is_left_behind(bert_dir, sentiment_dir, tmp_path):
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(1), random.random())
    torch.manual_seed(123)
    random.seed(123)
    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "g", max_steps=1, seed=7))
    assert (torch.rand(1), random.random()) == expected
    assert not dist.is_initialized()
