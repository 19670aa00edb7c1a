"""Gradient checkpointing through PeftModel gives adapters the gradients they get without it."""

import pytest
import torch

from peftlab import LoraConfig, get_peft_model
from tiny_models import tiny_batch, tiny_llama


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_adapters_get_the_same_gradients_with_checkpointing(use_reentrant):
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        batch = tiny_batch(model)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert all(g is not None for g in checkpointed.values()), "an adapter got no gradient under checkpointing"
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
