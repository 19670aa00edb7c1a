"""S²-Attn (``methods/s2_attention.py``): one group is full attention; the attention pattern (read off
with identity values) keeps every query causal and inside its own group, shifted heads included, with
no wrap-around; right-padded rows give their real tokens' unpadded results; bad input is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_llama

from peftlab.methods.s2_attention import (
    disable_s2_attention,
    enable_s2_attention,
    group_size,
    key_validity,
    shifted_sparse_attention,
)


def qkv(batch: int = 2, heads: int = 4, length: int = 16, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64) for _ in range(3)]


def test_one_group_is_full_causal_attention():
    q, k, v = qkv()
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for size in (16, 32):  # G = L, and G > L
        assert (shifted_sparse_attention(q, k, v, None, size, q.shape[-1] ** -0.5) - full).abs().max() <= 1e-6


def attention_pattern(length: int, size: int, heads: int = 4) -> torch.Tensor:
    """[H, L, L]: the weight of key j in query i's output, read off with identity values (v_j = e_j)."""
    q, k, _ = qkv(batch=1, heads=heads, length=length)
    identity = torch.eye(length, dtype=torch.float64).expand(1, heads, length, length)
    return shifted_sparse_attention(q, k, identity, None, size, 0.3)[0]


@pytest.mark.parametrize("length,size", [(16, 4), (24, 8), (10, 4)])
def test_queries_attend_causally_inside_their_group_only(length, size):
    heads, half = 4, size // 2
    pattern = attention_pattern(length, size, heads)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    plain = (j <= i) & (i // size == j // size)
    shifted = (j <= i) & ((i + half) // size == (j + half) // size)
    for head in range(heads):
        allowed = plain if head < heads // 2 else shifted
        assert torch.equal(pattern[head] > 0, allowed), head
        torch.testing.assert_close(pattern[head].sum(-1), torch.ones(length, dtype=torch.float64))
    # No wrap-around: in the shifted heads the first tokens form their own group; the tail never reaches them.
    assert pattern[heads - 1, : half, half:].abs().max() == 0
    assert pattern[heads - 1, -1, : length - size].abs().max() == 0


@pytest.mark.parametrize("length,size", [(16, 4), (24, 8), (8, 2)])
def test_the_mask_free_path_equals_the_masked_one_with_gradients(length, size):
    """Unpadded, L a multiple of G: sdpa's causal kernel on the groups (no mask tensor) computes what the
    masked path computes (forced here by an all-true ``valid``), gradients included."""
    fast_inputs = [t.requires_grad_() for t in qkv(length=length)]
    masked_inputs = [t.detach().clone().requires_grad_() for t in fast_inputs]
    fast = shifted_sparse_attention(*fast_inputs, None, size, 0.3)
    masked = shifted_sparse_attention(*masked_inputs, torch.ones(2, length, dtype=torch.bool), size, 0.3)
    torch.testing.assert_close(fast, masked, rtol=0, atol=1e-12)
    weights = torch.randn_like(fast)
    (fast * weights).sum().backward()
    (masked * weights).sum().backward()
    for ours, reference in zip(fast_inputs, masked_inputs):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=1e-12)


def test_a_length_off_the_group_grid_equals_right_padding():
    q, k, v = qkv(length=10)
    padded = [F.pad(t, (0, 0, 0, 2)) for t in (q, k, v)]
    valid = torch.tensor([[True] * 10 + [False] * 2] * 2)
    ours = shifted_sparse_attention(q, k, v, None, 4, 0.3)
    reference = shifted_sparse_attention(*padded, valid, 4, 0.3)[:, :, :10]
    assert (ours - reference).abs().max() <= 1e-12


@pytest.mark.parametrize("length", [3, 6, 8])
def test_fixed_grid_within_one_group_is_the_padded_grid(length):
    """On a fixed grid (LongLoRA's G) a sequence up to G long computes what it does padded to 2G on that grid:
    the shifted heads split at G/2, and nothing depends on the padding."""
    q, k, v = qkv(length=length)
    padded = [F.pad(t, (0, 0, 0, 16 - length)) for t in (q, k, v)]
    valid = torch.tensor([[True] * length + [False] * (16 - length)] * 2)
    ours = shifted_sparse_attention(q, k, v, None, 8, 0.3, fixed_grid=True)
    reference = shifted_sparse_attention(*padded, valid, 8, 0.3)[:, :, :length]
    assert (ours - reference).abs().max() <= 1e-12


def s2_llama(ratio: float):
    model = tiny_llama(hidden=32)
    enable_s2_attention(model, ratio)
    return model.train()  # the tiny config has no dropout


def test_through_a_model_one_group_equals_sdpa_and_eval_is_sdpa():
    ids = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    full = tiny_llama(hidden=32).train()
    with torch.no_grad():
        expected = full(input_ids=ids).logits
        assert (s2_llama(1.0)(input_ids=ids).logits - expected).abs().max() <= 1e-6
        sparse = s2_llama(0.25)
        assert (sparse(input_ids=ids).logits - expected).abs().max() > 1e-4  # training: groups of 4
        assert (sparse.eval()(input_ids=ids).logits - expected).abs().max() == 0  # inference: full attention
        disable_s2_attention(sparse, "sdpa")
        assert (sparse.train()(input_ids=ids).logits - expected).abs().max() == 0


def test_padded_and_unpadded_rows_of_one_batch_agree_on_real_tokens():
    model = s2_llama(0.25)  # G = 4 for both lengths: group_size(16) == group_size(10)
    assert group_size(16, 0.25) == group_size(10, 0.25) == 4
    generator = torch.Generator().manual_seed(1)
    short, full = torch.randint(3, 64, (10,), generator=generator), torch.randint(3, 64, (16,), generator=generator)
    batch = torch.stack([F.pad(short, (0, 6), value=0), full])
    mask = torch.tensor([[1] * 10 + [0] * 6, [1] * 16])
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone_short = model(input_ids=short[None]).logits
        alone_full = model(input_ids=full[None]).logits
    assert (together[0, :10] - alone_short[0]).abs().max() <= 1e-5
    assert (together[1] - alone_full[0]).abs().max() <= 1e-5


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"group_size_ratio must be in \(0, 1\]"):
        enable_s2_attention(tiny_llama(), 0.0)
    with pytest.raises(ValueError, match="has no attention module with q_proj/o_proj"):
        enable_s2_attention(torch.nn.Linear(2, 2), 0.25)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="group size must be an even number >= 2"):
        shifted_sparse_attention(q, k, v, None, 5, 0.3)
    left_padded = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    left_padded[..., 0] = False  # the first key hidden for every query: left padding
    left_padded[..., 0, 0] = True
    with pytest.raises(ValueError, match="right-padded rows of one sequence each"):
        key_validity(left_padded, 4)
