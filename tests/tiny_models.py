"""Tiny transformers models built from configs (never downloaded), deterministic per seed.

    model = tiny_gpt2()            # GPT2LMHeadModel, Conv1D layers c_attn / c_proj / c_fc
    model = tiny_llama()           # LlamaForCausalLM, nn.Linear projections
    model = tiny_bert_seq_cls()    # BertForSequenceClassification, 2 labels, head "classifier"
    batch = tiny_batch(model)      # {"input_ids", "attention_mask"} for that model's vocabulary
    perturb(model); logits(model, batch); max_diff(a, b)   # shared by the adapter property tests

Each builder takes ``seed`` so two calls give identical weights; for two libraries to start from
the same base, build once and ``copy.deepcopy`` it. GPT-2 and Llama also take ``hidden`` (the
4-bit interop tests need widths that are multiples of bitsandbytes' blocksize, 64).
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

# Tiny matrices gain nothing from threads, and on a busy 2-core machine a second thread makes each
# small matmul wait (about 500x slower here): every test that builds these models runs on one.
torch.set_num_threads(1)

VOCAB = 64
HIDDEN = 16


def _build(model_class, config, seed: int):
    torch.manual_seed(seed)
    model = model_class(config)
    return model.eval()


def tiny_gpt2(seed: int = 0, hidden: int = HIDDEN) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=hidden, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return _build(GPT2LMHeadModel, config, seed)


def tiny_llama(seed: int = 0, hidden: int = HIDDEN, tied: bool = False) -> LlamaForCausalLM:
    """``tied``: the output layer shares the input embedding's weight (SmolLM2's ``tie_word_embeddings``)."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied,
    )
    return _build(LlamaForCausalLM, config, seed)


def tiny_bert_seq_cls(seed: int = 0) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _build(BertForSequenceClassification, config, seed)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert_seq_cls}


def tiny_batch(model, batch_size: int = 4, seq_len: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids in the model's vocabulary (ids >= 3, so none is a special token)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every trainable tensor away from init (B = 0 would make most adapter properties trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        assert params, "nothing to perturb"
        for param in params:
            scale = param.abs().mean()
            param.add_(torch.randn(param.shape, generator=generator) * (0.1 if scale == 0 else 0.3 * scale))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()
