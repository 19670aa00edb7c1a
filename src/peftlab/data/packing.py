"""Padding-free packing: examples laid end to end in rows of at most ``max_length`` tokens.

    rows [a a a] [b b] [c c c c] , max_length 6   ->   input_ids    c c c c b b
                                                                    a a a . . .      (. = pad)
                                                       position_ids 0 1 2 3 0 1
                                                                    0 1 2 0 1 2

Two places pack. ``--packing`` in training packs the whole training set once, before batching
(:func:`pack_dataset`): best-fit decreasing, as TRL's ``pack_dataset(strategy="bfd")``, so the
sequences are nearly full, and a step takes ``--batch-size`` of them, shuffled per epoch like
rows. A batch of unpacked rows (evaluation, EVA/CorDA's batches) is packed on its own by the
collator (:func:`pack_rows`). Either way no example is ever split: rows are first cut to
``max_length`` as without packing (counted and announced), so each fits a sequence whole.

``position_ids`` restart at 0 for each example (and for the padding at a row's end, which forms a
block of its own with no labels), and the batch has no ``attention_mask``: from position ids that
restart, transformers' mask builder (``masking_utils.find_packed_sequence_indices``, used by the
eager, sdpa and flex attention of Llama, Qwen2 and most decoders; flash attention reads them as
variable-length sequences) makes attention block-diagonal, so no example sees another. Each
example's first label is ignored: it would be predicted from the previous example's last token.
What remains is exactly the labels the unpacked examples score, so with the loss summed over
label tokens and divided by their count over the whole step (as the training loop does) packed
and unpacked batches of the same examples have the same loss and gradients.

A model whose attention ignores position ids for masking would let examples attend to each
other silently: :func:`check_packing_is_exact` runs the model on two packed examples and on
each alone and refuses it by name if the logits differ.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .encoded import EncodedRows
from .errors import DataError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips (re-exported by .collate)


def best_fit_bins(lengths: Sequence[int], capacity: int, seed: int | None = None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity``: best fit decreasing.

    Longest first, each into the fullest bin it still fits (the first opened among equals), or a
    new one. ``seed``: the order among equally long items (None: their index order); the result is
    a function of ``lengths``, ``capacity`` and ``seed`` alone.
    """
    tie_break = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(tie_break)
    bins: list[list[int]] = []
    by_room: dict[int, deque[int]] = {}  # room left -> bins with that room, oldest first
    rooms: list[int] = []  # the distinct rooms of by_room, sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie_break[i])):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"an example of {length} tokens is longer than max_length {capacity}; cut it first")
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):  # the smallest room that holds it
            room = rooms[at]
            chosen = by_room[room].popleft()
            if not by_room[room]:
                del by_room[room], rooms[at]
        else:
            room, chosen = capacity, len(bins)
            bins.append([])
        bins[chosen].append(index)
        left = room - length
        if left > 0:
            if left not in by_room:
                by_room[left] = deque()
                bisect.insort(rooms, left)
            by_room[left].append(chosen)
    return bins


@dataclass(frozen=True)
class PackedRows(EncodedRows):
    """Training rows packed into sequences: each item is one sequence, its examples' ids and masks
    end to end, with ``example_lengths`` saying where each example ends."""

    example_lengths: list[list[int]]
    max_length: int
    examples: int  # rows packed

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), "example_lengths": self.example_lengths[index]}

    def select(self, indices: Sequence[int]) -> PackedRows:
        chosen = replace(super().select(indices), example_lengths=[self.example_lengths[i] for i in indices])
        return replace(chosen, examples=sum(len(lengths) for lengths in chosen.example_lengths))

    @property
    def efficiency(self) -> float:
        """Tokens over the slots of as many sequences of ``max_length``: 1 - the padding they leave."""
        return sum(self.lengths) / max(len(self) * self.max_length, 1)

    def describe(self) -> str:
        return (f"--packing: {self.examples} rows packed into {len(self)} sequences of at most {self.max_length} "
                f"tokens ({self.efficiency:.1%} full, best fit); --batch-size counts these sequences")

    def as_metrics(self) -> dict[str, Any]:
        return {"packed_sequences": len(self), "packing_efficiency": self.efficiency}


def examples_in(data: Any, indices: Sequence[int]) -> int:
    """How many rows the items ``indices`` of ``data`` hold: one each, or a packed sequence's examples."""
    if isinstance(data, PackedRows):
        return sum(len(data.example_lengths[i]) for i in indices)
    return len(indices)


def pack_dataset(rows: EncodedRows, fit: Callable[[list[int], list[bool]], tuple[list[int], list[bool]]],
                 max_length: int, seed: int) -> PackedRows:
    """``rows``, each cut by ``fit`` to at most ``max_length``, packed best-fit into sequences."""
    cut = [fit(ids, mask) for ids, mask in zip(rows.input_ids, rows.label_mask)]
    bins = best_fit_bins([len(ids) for ids, _ in cut], max_length, seed)
    return PackedRows(
        input_ids=[[t for i in members for t in cut[i][0]] for members in bins],
        label_mask=[[m for i in members for m in cut[i][1]] for members in bins],
        source=rows.source, example_lengths=[[len(cut[i][0]) for i in members] for members in bins],
        max_length=max_length, examples=len(cut),
    )


def pack_rows(rows: list[tuple[list[int], list[bool]]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``(ids, label_mask)`` examples (each at most ``max_length`` long) packed best fit in one batch."""
    bins = best_fit_bins([len(ids) for ids, _ in rows], max_length)
    return packed_batch([[rows[i] for i in members] for members in bins], pad_id)


def packed_batch(sequences: list[list[tuple[list[int], list[bool]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch row per sequence of ``(ids, label_mask)`` examples, laid out as the module says."""
    width = max(sum(len(ids) for ids, _ in examples) for examples in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    learnt = torch.zeros((len(sequences), width), dtype=torch.bool)
    position_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, examples in enumerate(sequences):
        at = 0
        for ids, mask in examples:
            end = at + len(ids)
            input_ids[row, at:end] = torch.tensor(ids, dtype=torch.long)
            learnt[row, at + 1 : end] = torch.tensor(mask[1:], dtype=torch.bool)  # never an example's first token
            position_ids[row, at:end] = torch.arange(len(ids))
            at = end
        position_ids[row, at:] = torch.arange(width - at)
    labels = torch.where(learnt, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def split_sequence(item: dict[str, Any]) -> list[tuple[list[int], list[bool]]]:
    """A :class:`PackedRows` item back into its ``(ids, label_mask)`` examples."""
    examples, at = [], 0
    for length in item["example_lengths"]:
        examples.append((item["input_ids"][at : at + length], item["label_mask"][at : at + length]))
        at += length
    return examples


@torch.no_grad()
def check_packing_is_exact(model: nn.Module, tolerance: float = 1e-4) -> None:
    """A DataError naming the model and its attention when two examples packed in one row give
    other logits than each alone (the attention lets them see each other)."""
    config = model.config
    vocab = int(config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=generator) for n in (5, 7))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        alone = [model(input_ids=ids.to(device), use_cache=False).logits.float() for ids in (first, second)]
        positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
        packed = model(input_ids=torch.cat([first, second], 1).to(device), position_ids=positions.to(device),
                       use_cache=False).logits.float()
    finally:
        model.train(was_training)
    difference = (packed - torch.cat(alone, 1)).abs().max().item()
    scale = max(1.0, torch.cat(alone, 1).abs().max().item())
    if not difference <= tolerance * scale:
        attention = getattr(config, "_attn_implementation", None) or "default"
        raise DataError(
            f"--packing: {config.model_type} with attention {attention!r} does not keep packed examples apart "
            f"(logits differ by {difference:.3g} from the examples run alone), so packing would train on text that "
            f"crosses examples; drop --packing, or load the model with an attention implementation that reads "
            f"position ids (sdpa, eager, flash_attention_2)"
        )
