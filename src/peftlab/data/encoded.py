"""Causal-LM examples tokenized once, before training: what ``--max-length`` cuts, and how much.

    rows = encode_rows(dataset, collator)         # ChatDataset or CausalLMDataset -> EncodedRows
    length = choose_max_length(rows, limit=2048)  # the longest row, up to the model's limit
    counts = count_truncation(rows, collator)     # rows cut, rows left with nothing to learn

Encoding up front (with the collator's own rules, so the figures are those training sees) lets
the run choose ``--max-length`` from the data, count the rows it cuts before the first step, and
spend no step re-rendering chat templates. A row counts as truncated when it is longer than
``max_length``: its last token, the EOS or end-of-turn that teaches the model to stop, is then
lost (and, when the cut falls in the prompt, its end: the question or the assistant header). A
row whose kept tokens include nothing to learn (the loss cannot score a row's first token) is
counted apart; a dataset where every row is such is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from tqdm import tqdm

from .chat import ChatDataset, ChatTemplateError, require_chat_template
from .errors import DataError


@dataclass(frozen=True)
class EncodedRows:
    """Token ids with their loss masks (True: learnt), not truncated; items are ``{"input_ids", "label_mask"}``."""

    input_ids: list[list[int]]
    label_mask: list[list[bool]]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "label_mask": self.label_mask[index]}

    def select(self, indices: Sequence[int]) -> EncodedRows:
        return replace(self, input_ids=[self.input_ids[i] for i in indices], label_mask=[self.label_mask[i] for i in indices])

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


@dataclass(frozen=True)
class TruncationCount:
    rows: int
    truncated: int  # longer than max_length: lost their end
    nothing_to_learn: int  # no learnt token left after the cut
    max_length: int
    longest: int  # tokens of the longest row, before the cut

    def as_metrics(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_rows": self.rows, f"{prefix}_rows_truncated": self.truncated,
                f"{prefix}_rows_nothing_to_learn": self.nothing_to_learn, f"{prefix}_longest_row_tokens": self.longest}

    def describe(self, what: str) -> str:
        share = self.truncated / max(self.rows, 1)
        text = (f"{what}: {self.truncated} of {self.rows} rows ({share:.0%}) cut at --max-length {self.max_length} "
                f"(the longest row has {self.longest} tokens)")
        if self.nothing_to_learn:
            text += f"; {self.nothing_to_learn} of them keep nothing to learn"
        return text


def encode_rows(dataset: Any, collator: Any) -> EncodedRows:
    """Every item of ``dataset`` as ``collator.encode_whole`` makes it (a CausalLMCollator); an
    error of the chat template names the row."""
    source = getattr(dataset, "source", "rows")
    if isinstance(dataset, ChatDataset):
        require_chat_template(collator.tokenizer, collator.chat_template, source)
    rows = []
    for i in tqdm(range(len(dataset)), desc="tokenize", unit="row", disable=len(dataset) < 5000, leave=False):
        try:
            rows.append(collator.encode_whole(dataset[i]))
        except ChatTemplateError as error:
            raise ChatTemplateError(f"{source}, row {i + 1}: {error}") from None
    return EncodedRows([ids for ids, _ in rows], [mask for _, mask in rows], source)


def choose_max_length(rows: EncodedRows, limit: int | None) -> int:
    """The longest row's length, at most ``limit`` (the model's positions), at least 2."""
    longest = max(rows.lengths, default=2)
    return max(2, min(longest, limit) if limit else longest)


def count_truncation(rows: EncodedRows, collator: Any) -> TruncationCount:
    """How many rows ``collator`` (its ``max_length``) cuts, and how many it leaves nothing to learn."""
    truncated = nothing = 0
    for ids, mask in zip(rows.input_ids, rows.label_mask):
        if len(ids) > collator.max_length:
            truncated += 1
            _, mask = collator.fit(ids, mask)
        nothing += not any(mask[1:])
    return TruncationCount(len(rows), truncated, nothing, collator.max_length, max(rows.lengths, default=0))


def refuse_if_nothing_to_learn(count: TruncationCount, source: str) -> None:
    """A DataError when no row keeps a token to learn (e.g. every response cut away)."""
    if count.rows and count.nothing_to_learn == count.rows:
        raise DataError(
            f"{source}: all {count.rows} rows have every label masked after the cut at --max-length {count.max_length} "
            f"({count.truncated} truncated; the longest has {count.longest} tokens), so there is nothing to train on; "
            f"raise --max-length, shorten the prompts, or use --train-on-prompt"
        )
