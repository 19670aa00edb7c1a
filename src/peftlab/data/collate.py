"""Turn a list of dataset items into a padded batch of tensors, for ``DataLoader(collate_fn=...)``.

Classification: ``{"text", "label"}`` items -> ``input_ids``, ``attention_mask``, ``labels``
(one class id per row). Truncated to ``max_length``; padded to the batch's longest row.

Causal LM: ``{"prompt", "response"}`` items -> the same keys, where ``labels`` copies the response
tokens and EOS and is -100 (ignored by the loss) on the prompt and the padding::

    input_ids  [BOS] p p p  r r r [EOS] [PAD]
    labels     -100  ....   r r r [EOS] -100

Prompt and response are tokenised apart, so the boundary is exact: put any separator (a space, a
newline) in the text itself. Rows are padded on the right, which training wants.

Causal LM on plain text: windows ``{"input_ids", "score_from"}`` of one token stream (see
:mod:`.text`), all of one length, stacked as they are; ``labels`` copies the tokens from
``score_from`` on and is -100 before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def _require_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token; load it with peftlab.assets.load_model_and_tokenizer, "
            "or set tokenizer.pad_token = tokenizer.eos_token"
        )


@dataclass
class ClassificationCollator:
    """Batches ``{"text", "label"}`` items for sequence classification."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 128

    def __post_init__(self) -> None:
        _require_pad_token(self.tokenizer)

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            [item["text"] for item in batch],
            truncation=True,
            max_length=self.max_length,
            padding="longest",
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor([item["label"] for item in batch], dtype=torch.long),
        }


@dataclass
class CausalLMCollator:
    """Batches ``{"prompt", "response"}`` items for causal LM with the loss on the response only.

    Over ``max_length``, each part keeps its beginning: the response keeps at least half the
    window (or all of itself, if shorter) and the prompt the rest, so every row keeps some tokens
    to learn from. A response cut short loses its EOS, since the text did not end there.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 256

    def __post_init__(self) -> None:
        _require_pad_token(self.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token to end each response with; set tokenizer.eos_token")
        if self.max_length < 2:
            raise ValueError(f"max_length must leave room for a prompt and a response, got {self.max_length}")

    def encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of prompt + response + EOS, truncated, and how many of them are the prompt's."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        response_kept = min(len(response_ids), max(self.max_length - len(prompt_ids), self.max_length // 2))
        prompt_kept = min(len(prompt_ids), self.max_length - response_kept)
        return prompt_ids[:prompt_kept] + response_ids[:response_kept], prompt_kept

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if batch and "input_ids" in batch[0]:
            return _stack_windows(batch)
        rows = [self.encode(item["prompt"], item["response"]) for item in batch]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            # Labels come from positions, not token ids, so a pad token equal to EOS is still learnt.
            labels[row, prompt_length : len(ids)] = input_ids[row, prompt_length : len(ids)]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _stack_windows(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([item["input_ids"] for item in batch], dtype=torch.long)
    labels = input_ids.clone()
    for row, item in enumerate(batch):
        labels[row, : item["score_from"]] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
