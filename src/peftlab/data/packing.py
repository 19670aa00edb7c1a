"""Padding-free packing: a batch's examples laid end to end in rows of at most ``max_length``.

    rows [a a a] [b b] [c c c c] , max_length 6   ->   input_ids    a a a b b .      (. = pad)
                                                                    c c c c . .
                                                       position_ids 0 1 2 0 1 0
                                                                    0 1 2 3 0 1

Examples go into rows first-fit, longest first. ``position_ids`` restart at 0 for each example
(and for the padding at a row's end, which forms a block of its own with no labels), and the
batch has no ``attention_mask``: from position ids that restart, transformers' mask builder
(``masking_utils.find_packed_sequence_indices``, used by the eager, sdpa and flex attention of
Llama, Qwen2 and most decoders; flash attention reads them as variable-length sequences) makes
attention block-diagonal, so no example sees another. Each example's first label is ignored:
it would be predicted from the previous example's last token. What remains is exactly the
labels the unpacked batch scores, so with the loss summed over label tokens and divided by
their count over the whole step (as the training loop does) the packed and unpacked batches
have the same loss and gradients.

A model whose attention ignores position ids for masking would let examples attend to each
other silently: :func:`check_packing_is_exact` runs the model on two packed examples and on
each alone and refuses it by name if the logits differ.
"""

from __future__ import annotations

import torch
from torch import nn

from .collate import IGNORE_INDEX
from .errors import DataError


def pack_rows(rows: list[tuple[list[int], list[bool]]], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``(ids, label_mask)`` examples (each at most ``max_length`` long) packed as the module says."""
    bins: list[list[int]] = []  # example indices per packed row
    room: list[int] = []
    for index in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        length = len(rows[index][0])
        if length > max_length:
            raise ValueError(f"an example of {length} tokens is longer than max_length {max_length}; cut it first")
        slot = next((b for b, left in enumerate(room) if left >= length), None)
        if slot is None:
            bins.append([])
            room.append(max_length)
            slot = len(bins) - 1
        bins[slot].append(index)
        room[slot] -= length
    width = max(max_length - left for left in room)
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    labels = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    for row, members in enumerate(bins):
        at = 0
        for index in members:
            ids, mask = rows[index]
            end = at + len(ids)
            input_ids[row, at:end] = torch.tensor(ids, dtype=torch.long)
            learnt = torch.tensor(mask, dtype=torch.bool)
            learnt[0] = False  # the unpacked row never scores its first token either
            labels[row, at:end] = torch.where(learnt, input_ids[row, at:end], IGNORE_INDEX)
            position_ids[row, at:end] = torch.arange(len(ids))
            at = end
        position_ids[row, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


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
