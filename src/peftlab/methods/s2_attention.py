"""Shifted sparse attention (S²-Attn, LongLoRA: Chen et al. 2023, arXiv 2309.12307), for training.

The sequence is cut into groups of G tokens (G = L/4 of each batch's length by default, or a fixed
number of tokens on a grid from position 0: LongLoRA fixes it, so that a row computes the same
whatever batch it is padded in) and each query attends causally within its group only. Heads ``[H//2, H)`` use groups shifted by G/2, so information flows between
neighbouring groups across layers:

    heads [0, H//2)    groups [0, G) [G, 2G) ... [L-G, L)
    heads [H//2, H)    groups [0, G/2) [G/2, 3G/2) ... [L-G/2, L)

The official ``roll`` version rolls the shifted heads by -G/2, so its last group holds the tail
*and* the first G/2 tokens, which then see the tail: a leak from the future. Here the shifted
heads get G/2 masked slots on both ends instead, so no group wraps around. A length that is no
multiple of G gets masked slots at the end (as right padding would), and keys that the batch's
padding mask hides are masked too, so the real tokens of a right-padded row compute what they
would unpadded. With a single group (G >= L) nothing is shifted: every head attends fully, which
is ordinary causal attention.

It plugs into transformers through its own registries, under the name :data:`S2_ATTENTION`:
``AttentionInterface`` gets :func:`s2_attention_forward` and ``AttentionMaskInterface`` the sdpa
mask; in eval mode the function is sdpa's own, so inference is ordinary full attention.

    previous = enable_s2_attention(model, group_size_ratio=0.25)   # training now uses S²-Attn
    disable_s2_attention(model, previous)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

#: The attention implementation name registered with transformers.
S2_ATTENTION = "peftlab_s2"
#: The attention module attribute holding its group size ratio (G = ratio · L, rounded up to even).
GROUP_RATIO_ATTRIBUTE = "s2_group_size_ratio"
#: The attention module attribute holding a fixed G in tokens, which wins over the ratio.
GROUP_SIZE_ATTRIBUTE = "s2_group_size"


def group_size(length: int, ratio: float) -> int:
    """G for a sequence of ``length``: ``ratio · length`` rounded up to an even number (the shift is G/2)."""
    return max(2, 2 * math.ceil(length * ratio / 2))


def key_validity(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """``[B, L]``: which keys the batch's padding leaves visible, from transformers' 4-D causal mask
    (None: no padding). Refuses a mask that is not causal-with-padding (packed sequences, left padding)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (length, length):
        raise ValueError("S²-Attn needs transformers' boolean sdpa mask of one causal sequence per row.")
    valid = attention_mask[:, 0].any(dim=-2)
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    if not torch.equal(attention_mask[:, 0], causal & valid[:, None, :]):
        raise ValueError(
            "S²-Attn trains on right-padded rows of one sequence each; this batch's attention mask is something else "
            "(left padding, packed sequences or a custom mask). Pad on the right (peftlab's collator does)."
        )
    return valid


def _grouped_causal(q, k, v, valid, size: int, scale: float, dropout: float) -> torch.Tensor:
    """Causal attention inside consecutive groups of ``size`` along the sequence; ``valid``: [B, L] or None."""
    b, h, length, _ = q.shape
    n = length // size
    if valid is None:  # no mask tensor: sdpa's causal kernel (flash on CPU and GPU), O(L) memory, not O(L·G)
        q, k, v = (t.reshape(b, h * n, size, t.shape[-1]) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
        return out.reshape(b, h, length, out.shape[-1])
    # A hidden key is never seen; a query always sees itself, so no row is empty (its output is dropped).
    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    diagonal = torch.eye(size, dtype=torch.bool, device=q.device)
    mask = causal & (valid.view(b, 1, n, 1, size) | diagonal)
    q, k, v = (t.reshape(b, h, n, size, t.shape[-1]) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.reshape(b, h, length, out.shape[-1])


def _shifted_unpadded(q, k, v, size: int, scale: float, dropout: float) -> torch.Tensor:
    """The shifted heads of a batch without padding whose L is a multiple of ``size``: the groups that
    start at G/2 are the first G/2 tokens, full groups in between and the last G/2 tokens -- each
    plain causal attention, so no masked slots and no mask tensor (what the padded path computes)."""
    half, length = size // 2, q.shape[2]
    pieces = ((0, half, half), (half, length - half, size), (length - half, length, half))
    return torch.cat([_grouped_causal(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], None, group, scale, dropout)
                      for a, b, group in pieces], dim=2)


def _within_one_group(q, k, v, valid, size: int, scale: float, dropout: float) -> torch.Tensor:
    """A sequence up to ``size`` long on the grid of ``size``-token groups: the plain heads see it all
    causally, the shifted heads' groups split it at size/2 (what the padded path computes, without the
    masked slots)."""
    length, heads = q.shape[2], q.shape[1] // 2
    position = torch.arange(length, device=q.device)
    causal = position[None, :] <= position[:, None]
    same_group = (position[:, None] < size // 2) == (position[None, :] < size // 2)
    mask = torch.stack([causal] * heads + [causal & same_group] * (q.shape[1] - heads))
    if valid is not None:  # as in _grouped_causal: hidden keys never seen, each query sees itself
        mask = mask & (valid[:, None, None, :] | torch.eye(length, dtype=torch.bool, device=q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def shifted_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, size: int, scale: float,
    dropout: float = 0.0, fixed_grid: bool = False,
) -> torch.Tensor:
    """S²-Attn on ``[B, H, L, D]`` (k, v with H heads), groups of ``size`` (even); returns ``[B, H, L, D]``.

    ``fixed_grid``: the groups are a grid from position 0 whatever L, so a sequence up to ``size`` long
    still has its shifted heads split at size/2 and a row computes the same at any padding; without it
    such a sequence is one group with nothing shifted (G = L is full attention)."""
    if size < 2 or size % 2:
        raise ValueError(f"S²-Attn's group size must be an even number >= 2 (half of it is the shift), got {size}.")
    length = q.shape[2]
    if length <= size:
        if fixed_grid:
            return _within_one_group(q, k, v, valid, size, scale, dropout)
        return _grouped_causal(q, k, v, valid, length, scale, dropout)  # one group: plain causal attention
    padded = math.ceil(length / size) * size
    half, heads = size // 2, q.shape[1] // 2
    if padded == length and valid is None:
        plain = _grouped_causal(q[:, :heads], k[:, :heads], v[:, :heads], None, size, scale, dropout)
        shifted = _shifted_unpadded(q[:, heads:], k[:, heads:], v[:, heads:], size, scale, dropout)
        return torch.cat([plain, shifted], dim=1)
    # Padding, or a length that is no multiple of G: masked slots at the end stand for the missing tokens.
    valid = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device) if valid is None else valid
    q, k, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (q, k, v))
    valid = F.pad(valid, (0, padded - length), value=False)
    plain = _grouped_causal(q[:, :heads], k[:, :heads], v[:, :heads], valid, size, scale, dropout)
    # The shifted heads: G/2 masked slots on each end, so the groups start at G/2 and none wraps around.
    shifted_valid = F.pad(valid, (half, half), value=False)
    q2, k2, v2 = (F.pad(t[:, heads:], (0, 0, half, half)) for t in (q, k, v))
    shifted = _grouped_causal(q2, k2, v2, shifted_valid, size, scale, dropout)[:, :, half : half + padded]
    return torch.cat([plain, shifted], dim=1)[:, :, :length]


def s2_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: S²-Attn in training, sdpa (full attention) otherwise."""
    ratio = getattr(module, GROUP_RATIO_ATTRIBUTE, None)
    if not module.training or ratio is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    length = query.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    fixed = getattr(module, GROUP_SIZE_ATTRIBUTE, None)
    size = fixed or group_size(length, ratio)
    valid = key_validity(attention_mask, length)
    out = shifted_sparse_attention(query, key, value, valid, size, scale, dropout, fixed_grid=fixed is not None)
    return out.transpose(1, 2).contiguous(), None


def enable_s2_attention(model, group_size_ratio: float = 0.25, fixed_group_size: int | None = None) -> str:
    """Train ``model`` (a transformers model whose attention calls the registry) with S²-Attn, groups of
    ``group_size_ratio · L`` of each batch's length L, or of ``fixed_group_size`` tokens whatever the
    batch (an even number: then a row computes the same in any batch, at any padding); returns the
    attention implementation it had, for :func:`disable_s2_attention`."""
    if not 0 < group_size_ratio <= 1:
        raise ValueError(f"group_size_ratio must be in (0, 1] (G = ratio · L; 1 is full attention), got {group_size_ratio}.")
    if fixed_group_size is not None and (fixed_group_size < 2 or fixed_group_size % 2):
        raise ValueError(f"S²-Attn's group size must be an even number >= 2 (half of it is the shift), got {fixed_group_size}.")
    attention = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj") and hasattr(m, "config")]
    if not attention:
        raise ValueError(f"{type(model).__name__} has no attention module with q_proj/o_proj for S²-Attn to run in.")
    previous = model.config._attn_implementation
    _register_with_transformers()
    model.set_attn_implementation(S2_ATTENTION)
    for module in attention:
        setattr(module, GROUP_RATIO_ATTRIBUTE, group_size_ratio)
        setattr(module, GROUP_SIZE_ATTRIBUTE, fixed_group_size)
    return previous


def disable_s2_attention(model, previous: str) -> None:
    model.set_attn_implementation(previous)
    for module in model.modules():
        for attribute in (GROUP_RATIO_ATTRIBUTE, GROUP_SIZE_ATTRIBUTE):
            if hasattr(module, attribute):
                delattr(module, attribute)


def _register_with_transformers() -> None:
    """S²-Attn as an attention implementation transformers can switch to; done on first use, not on import,
    so importing peftlab changes nothing in transformers (and does not load its model machinery, ~1/3 of
    ``import peftlab``'s time)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(S2_ATTENTION, s2_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(S2_ATTENTION, sdpa_mask)
