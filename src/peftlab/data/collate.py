"""Turn a list of dataset items into a padded batch of tensors, for ``DataLoader(collate_fn=...)``.

Classification: ``{"text", "label"}`` items -> ``input_ids``, ``attention_mask``, ``labels``
(one class id per row). Truncated to ``max_length``; padded to the batch's longest row.

Causal LM: ``{"prompt", "response"}`` items -> the same keys, where ``labels`` copies the response
tokens and EOS and is -100 (ignored by the loss) on the prompt and the padding (conversations:
the assistant turns, see :mod:`.chat`; ``packing``: see :mod:`.packing`)::

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

from .chat import render_conversation
from .errors import DataError
from .packing import IGNORE_INDEX, pack_rows, packed_batch, split_sequence


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
    """Batches causal-LM items with the loss on what the model should learn.

    Items: ``{"prompt", "response"}`` (response and EOS learnt), ``{"messages", "learn_from"}``
    (a conversation through the chat template, see :func:`.chat.render_conversation`),
    ``{"input_ids", "label_mask"}`` (already encoded: :mod:`.encoded`), or plain-text windows.
    ``train_on_prompt``: learn every token. ``chat_template``: the template's text, instead of
    the tokenizer's own.

    Over ``max_length``, the part before the first learnt token (the prompt) and the rest (the
    response) each keep their beginning: the response keeps at least half the window (or all of
    itself, if shorter) and the prompt the rest, so every row keeps some tokens to learn from. A
    response cut short loses its EOS, since the text did not end there.

    ``packing``: the batch's rows are laid end to end in rows of at most ``max_length`` tokens
    instead of padded one per row (see :mod:`.packing`): ``position_ids`` restart at each example,
    and there is no ``attention_mask``, which tells transformers to keep the examples apart. Items
    already packed (:class:`.packing.PackedRows`) become one batch row each, packing or not.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 256
    chat_template: str | None = None
    train_on_prompt: bool = False
    packing: bool = False

    def __post_init__(self) -> None:
        _require_pad_token(self.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token to end each response with; set tokenizer.eos_token")
        if self.max_length < 2:
            raise ValueError(f"max_length must leave room for a prompt and a response, got {self.max_length}")

    def encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        """Token ids of prompt + response + EOS, truncated, and how many of them are the prompt's."""
        ids, mask = self.encode_whole({"prompt": prompt, "response": response})
        ids, mask = self.fit(ids, mask)
        return ids, (0 if self.train_on_prompt else len(ids) - sum(mask))

    def encode_whole(self, item: dict[str, Any]) -> tuple[list[int], list[bool]]:
        """An item's token ids and loss mask (True: learnt), not truncated."""
        if "label_mask" in item:
            return list(item["input_ids"]), list(item["label_mask"])
        if "messages" in item:
            rendered = render_conversation(
                self.tokenizer, item["messages"], chat_template=self.chat_template,
                train_on_prompt=self.train_on_prompt, learn_from=item.get("learn_from", 0),
            )
            return rendered.input_ids, rendered.assistant_mask
        prompt_ids = self.tokenizer(item["prompt"], add_special_tokens=True, verbose=False)["input_ids"]
        response_ids = self.tokenizer(item["response"], add_special_tokens=False, verbose=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if not response_ids or response_ids[-1] != eos:  # a response that spells out EOS keeps one
            response_ids = response_ids + [eos]
        bos = self.tokenizer.bos_token_id
        if bos is not None and prompt_ids[:2] == [bos, bos]:
            raise DataError(f"the prompt {item['prompt'][:40]!r} starts with the BOS token, which the tokenizer adds "
                            f"too; remove it from the text")
        return prompt_ids + response_ids, [self.train_on_prompt] * len(prompt_ids) + [True] * len(response_ids)

    def fit(self, ids: list[int], mask: list[bool]) -> tuple[list[int], list[bool]]:
        """``ids`` and ``mask`` cut to ``max_length`` as the class docstring says."""
        if len(ids) <= self.max_length:
            return ids, mask
        prompt_length = next((i for i, learnt in enumerate(mask) if learnt), len(mask))
        response_kept = min(len(ids) - prompt_length, max(self.max_length - prompt_length, self.max_length // 2))
        prompt_kept = min(prompt_length, self.max_length - response_kept)
        keep = list(range(prompt_kept)) + list(range(prompt_length, prompt_length + response_kept))
        return [ids[i] for i in keep], [mask[i] for i in keep]

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if batch and "score_from" in batch[0]:
            return _stack_windows(batch)
        if batch and "example_lengths" in batch[0]:  # sequences packed before batching (PackedRows)
            return packed_batch([split_sequence(item) for item in batch], self.tokenizer.pad_token_id)
        rows = [self.fit(*self.encode_whole(item)) for item in batch]
        if self.packing:
            return pack_rows(rows, self.max_length, self.tokenizer.pad_token_id)
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, mask) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            # Labels come from positions, not token ids, so a pad token equal to EOS is still learnt.
            learnt = torch.tensor(mask, dtype=torch.bool)
            labels[row, : len(ids)] = torch.where(learnt, input_ids[row, : len(ids)], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _stack_windows(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([item["input_ids"] for item in batch], dtype=torch.long)
    labels = input_ids.clone()
    for row, item in enumerate(batch):
        labels[row, : item["score_from"]] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
