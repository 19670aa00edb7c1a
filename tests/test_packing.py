"""Padding-free packing: a packed batch has exactly the loss and gradients of the same rows
padded (fp32, 1e-5), on tiny Llama and Qwen2 models; a model whose attention mixes packed
examples is refused by name."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from chat_fixtures import chat_tokenizer
from tiny_models import tiny_llama

from peftlab.data import CausalLMCollator, DataError
from peftlab.data.packing import check_packing_is_exact, pack_rows
from peftlab.train.evaluate import batch_totals, model_inputs


def tiny_qwen2(seed: int = 0) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).eval()


def rows_of_spread_lengths(count: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        length = rng.randint(3, 14)
        prompt = rng.randint(1, length - 1)
        items.append({"input_ids": [rng.randrange(4, 64) for _ in range(length)],
                      "label_mask": [False] * prompt + [True] * (length - prompt)})
    return items


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss as the training loop defines it: summed over label tokens, divided by their count."""
    model.zero_grad()
    totals = batch_totals("causal-lm", model(**model_inputs(batch, torch.device("cpu"))).logits, batch["labels"])
    loss = totals.loss_sum / totals.count
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_one(build, train_on_prompt) -> None:
    model = build()
    items = rows_of_spread_lengths()
    if train_on_prompt:
        items = [{**item, "label_mask": [True] * len(item["label_mask"])} for item in items]
    tokenizer = chat_tokenizer()
    padded = CausalLMCollator(tokenizer, max_length=24)(items)
    packed = CausalLMCollator(tokenizer, max_length=24, packing=True)(items)
    assert "attention_mask" not in packed and packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed["input_ids"].shape[0] < len(items)  # several examples share a row
    loss, grads = loss_and_grads(model, padded)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    assert abs(loss - packed_loss) < 1e-5
    for name, grad in grads.items():
        assert torch.allclose(grad, packed_grads[name], atol=1e-5, rtol=0), name


def test_pack_rows_restarts_positions_and_ignores_each_first_label() -> None:
    rows = [([5, 6, 7], [False, True, True]), ([8, 9], [True, True]), ([10, 11, 12, 13], [False, False, True, True])]
    batch = pack_rows(rows, max_length=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 12, 13, -100, 9], [-100, 6, 7, -100, -100, -100]]


def test_packing_is_refused_for_attention_that_mixes_examples() -> None:
    check_packing_is_exact(tiny_llama())
    check_packing_is_exact(tiny_qwen2())
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    torch.manual_seed(0)
    with pytest.raises(DataError, match="--packing: opt with attention 'sdpa' does not keep packed examples apart"):
        check_packing_is_exact(transformers.OPTForCausalLM(config))
