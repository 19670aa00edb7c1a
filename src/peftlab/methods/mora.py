"""MoRA, high-rank updating with one square matrix (Jiang et al. 2024), method name ``mora``.

One trainable ``M: [r̂, r̂]`` per layer, zero at init, scale 1, between two fixed (parameter-free)
operators that map ``in -> r̂`` and back ``-> out``:

    r̂ = floor(√((in + out) · r) + 0.5)          about LoRA's parameter count at rank r
    h = x Wᵀ + decompress(M · compress(dropout(x)))

Both start from the input wrapped around to ``n = ⌈in / r̂⌉`` whole blocks of r̂
(``x̃_j = x_{j mod in}``; the official code pads with ``x[:pad]``, which is the same thing when
``pad <= in`` and undefined otherwise):

    type 1, "sharing"   compress = sum of the n blocks               -> M -> tile the r̂ values to out
    type 6, "RoPE"      block i rotated by RoPE at position i          -> M on each block
                        (θ_j = 10000^(−2j/r̂), halves rotated as in rotate_half; r̂ rounded down to
                        even, at least 2), the n outputs concatenated  -> truncate or tile to out
                        (blocks past ``⌈out / r̂⌉`` are cut off by the truncation: never computed)

Everything is linear in x, so ``ΔW`` exists as an ``[out, in]`` matrix: merging builds it by
running the update on the identity (``ΔWᵀ = update(I_in)``), which is exact for every
``in``/``out`` (the official type-6 merge fails when ``in <= r̂``). Saved per layer: ``mora_M``.

Training runs base and update as one autograd node (:class:`MoraLinearFunction`): block by block on
views of ``x`` and of the output, adding in place, with RoPE folded into per-block ``M R_i`` (r̂²
work per block instead of passes over the activations). Sharing costs ``N·r̂²`` per layer; RoPE
``N·min(in, out)·r̂``, as much as a LoRA of rank r̂/2 when in = out: inherent to the type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.base import BaseLayerView
from peftlab.config import AdapterConfig
from peftlab.adapter import Adapter
from peftlab.methods.fused import can_fuse
from peftlab.methods.lora_targets import LORA_DEFAULT_TARGET_MODULES
from peftlab.methods.method import ADAPTER_DROPOUT, Method, MethodOption, UnsupportedBaseError
from peftlab.methods.registry import register_method

SHARING, ROPE = 1, 6
_TYPE_NAMES = {"sharing": SHARING, "rope": ROPE}


@dataclass
class MoraConfig(AdapterConfig):
    r: int = 8
    mora_type: int = ROPE
    mora_dropout: float = 0.0

    peft_type = "MORA"
    default_target_modules = LORA_DEFAULT_TARGET_MODULES  # the official code is HF's LoRA with MoRA inside

    def __post_init__(self) -> None:
        # Before the generic type check: the names "sharing" / "rope" are accepted and stored as numbers.
        if isinstance(self.mora_type, str) and self.mora_type.lower() in _TYPE_NAMES:
            self.mora_type = _TYPE_NAMES[self.mora_type.lower()]
        if isinstance(self.mora_type, bool) or self.mora_type not in (SHARING, ROPE):
            raise ValueError(
                f"mora_type={self.mora_type!r} is unknown: use 1 ('sharing': sum the input's blocks, tile the output) "
                "or 6 ('rope': rotate each block by RoPE, the README's choice for small r)."
            )
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if not 0 <= self.mora_dropout < 1:
            raise ValueError(f"mora_dropout must be in [0, 1), got {self.mora_dropout}; 0 turns dropout off.")


def square_rank(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """r̂: the side of M, about LoRA's parameter count ``r · (in + out)`` as ``r̂²``."""
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if mora_type == ROPE:  # RoPE rotates pairs of coordinates
        r_hat = max(2, r_hat // 2 * 2)
    return r_hat


def _tile(z: torch.Tensor, width: int) -> torch.Tensor:
    """``z``'s last dimension repeated and cut to ``width`` (just cut when it is wide enough)."""
    if z.shape[-1] < width:
        z = z.repeat(*([1] * (z.dim() - 1)), math.ceil(width / z.shape[-1]))
    return z[..., :width]


def _add_tiled_(target: torch.Tensor, z: torch.Tensor) -> None:
    """``target += _tile(z, target width)`` in place, chunk by chunk (nothing of target's size is built)."""
    width, step = target.shape[1], z.shape[1]
    for start in range(0, width, step):
        seg = min(step, width - start)
        target[:, start : start + seg] += z[:, :seg]


def _folded(g: torch.Tensor, width: int) -> torch.Tensor:
    """The adjoint of tiling to ``g``'s width: its chunks of ``width`` summed, zero-padded if narrower."""
    if g.shape[1] < width:
        return F.pad(g, (0, width - g.shape[1]))
    out = g[:, :width].clone()
    for start in range(width, g.shape[1], width):
        seg = min(width, g.shape[1] - start)
        out[:, :seg] += g[:, start : start + seg]
    return out


class MoraAdapter(Adapter):
    def __init__(self, base: BaseLayerView, config: MoraConfig) -> None:
        super().__init__()
        self.mora_type = config.mora_type
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r_hat = square_rank(self.in_features, self.out_features, config.r, config.mora_type)
        self.blocks = math.ceil(self.in_features / self.r_hat)
        if self.mora_type == ROPE:  # blocks whose output the truncation to `out` drops are never computed
            self.blocks = min(self.blocks, math.ceil(self.out_features / self.r_hat))
        self.dropout = nn.Dropout(config.mora_dropout) if config.mora_dropout > 0 else None
        dtype = base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32
        self.mora_M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, device=base.device, dtype=dtype))
        width = self.blocks * self.r_hat
        # Non-persistent buffers: moved by .to(), never saved (they follow from the shapes).
        wrap = torch.arange(width, device=base.device) % self.in_features if width > self.in_features else None
        self.register_buffer("wrap_index", wrap, persistent=False)
        cos = signed_sin = None
        if self.mora_type == ROPE:
            # In float64, rounded once to the compute dtype.
            inv_freq = 1.0 / (10000 ** (torch.arange(0, self.r_hat, 2, dtype=torch.float64) / self.r_hat))
            angles = torch.outer(torch.arange(self.blocks, dtype=torch.float64), inv_freq)
            cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(base.device, dtype)  # [blocks, r̂]
            # rotate_half(v) · sin == roll(v, r̂/2) · (−sin, sin)
            signed_sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(base.device, dtype)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_signed_sin", signed_sin, persistent=False)

    def wrapped_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in] -> [..., blocks, r̂]``: the input wrapped around (a view when no wrap is needed)."""
        width = self.blocks * self.r_hat
        x = x.index_select(-1, self.wrap_index) if self.wrap_index is not None else x[..., :width]
        return x.unflatten(-1, (self.blocks, self.r_hat))

    def block_input(self, x2: torch.Tensor, i: int) -> torch.Tensor:
        """Block ``i`` of the wrapped 2-D input: a view of ``x2``, gathered only where it wraps around."""
        start, stop = i * self.r_hat, (i + 1) * self.r_hat
        if stop <= self.in_features:
            return x2[:, start:stop]
        return x2.index_select(1, self.wrap_index[start:stop])

    def add_block_grad_(self, grad_x2: torch.Tensor, i: int, grad_block: torch.Tensor) -> None:
        """The adjoint of :meth:`block_input`, added in place: each wrapped copy of x_j sends its gradient to x_j."""
        start, stop = i * self.r_hat, (i + 1) * self.r_hat
        if stop <= self.in_features:
            grad_x2[:, start:stop] += grad_block
        else:
            grad_x2.index_add_(1, self.wrap_index[start:stop], grad_block)

    def block_matrices(self) -> torch.Tensor:
        """RoPE: ``M R_i`` for every block ``[blocks, r̂, r̂]``, so the rotation costs r̂² per block, not
        a pass over the activations: ``R_i v = v ⊙ cos_i + roll(v, r̂/2) ⊙ (−sin_i, sin_i)``."""
        m = self.mora_M
        rotated = m * self.rope_cos[:, None, :].to(m.dtype)
        return rotated + torch.roll(m * self.rope_signed_sin[:, None, :].to(m.dtype), -(self.r_hat // 2), dims=-1)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``x ΔWᵀ`` through the operators: ``[..., in] -> [..., out]``, never building ΔW."""
        blocks = self.wrapped_blocks(x)
        if self.mora_type == SHARING:
            return _tile(blocks.sum(-2) @ self.mora_M.T, self.out_features)
        return _tile(torch.einsum("...kj,kaj->...ka", blocks, self.block_matrices()).flatten(-2), self.out_features)

    def forward(self, x, base_out, base):
        if x.dtype != self.mora_M.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.mora_M.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return base_out + self.update(x).to(base_out.dtype)

    def fused_forward(self, x: torch.Tensor, base: BaseLayerView) -> torch.Tensor | None:
        """Base plus update as one autograd node, adding in place; None where it does not apply."""
        if (self.dropout is not None and self.training) or not can_fuse(x, base, self.mora_M):
            return None
        weights = self.mora_M if self.mora_type == SHARING else self.block_matrices()
        return MoraLinearFunction.apply(x, weights, self, base)

    def delta_weight(self, base):
        eye = torch.eye(self.in_features, device=self.mora_M.device, dtype=self.mora_M.dtype)
        return self.update(eye).T

    def saved_tensors(self):
        return {"mora_M": self.mora_M}


class MoraLinearFunction(torch.autograd.Function):
    """``out = base(x) + update(x)`` block by block on views of ``x`` and of the output, in place:
    autograd on ``update`` would gather, tile, zero and scatter several activation-sized tensors.
    Only a block that wraps around the end of ``x`` is gathered.

    ``weights`` is M (sharing) or the per-block ``M R_i`` (RoPE, whose gradient autograd carries on to
    M). Sharing keeps only the compressed ``[N, r̂]`` input for backward; RoPE keeps ``x``.
    """

    @staticmethod
    def forward(ctx, x, weights, adapter: MoraAdapter, view: BaseLayerView):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = view.forward(x)
        out2 = out.view(-1, out.shape[-1])
        r_hat, width = adapter.r_hat, adapter.blocks * adapter.r_hat
        if adapter.mora_type == SHARING:
            compressed = adapter.block_input(x2, 0).clone()
            for i in range(1, adapter.blocks):
                compressed += adapter.block_input(x2, i)
            _add_tiled_(out2, compressed @ weights.T)
            ctx.save_for_backward(compressed, weights)
        elif out2.shape[1] <= width:  # each block lands on its own columns of the output
            for i in range(adapter.blocks):
                seg = min(r_hat, out2.shape[1] - i * r_hat)
                out2[:, i * r_hat : i * r_hat + seg].addmm_(adapter.block_input(x2, i), weights[i, :seg].T)
            ctx.save_for_backward(x2, weights)
        else:  # the concatenated blocks are tiled across a wider output
            z = torch.cat([adapter.block_input(x2, i) @ weights[i].T for i in range(adapter.blocks)], dim=1)
            _add_tiled_(out2, z)
            ctx.save_for_backward(x2, weights)
        ctx.adapter, ctx.view, ctx.x_shape = adapter, view, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        adapter = ctx.adapter
        saved, weights = ctx.saved_tensors
        r_hat, width = adapter.r_hat, adapter.blocks * adapter.r_hat
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = ctx.view.input_grad(g) if ctx.needs_input_grad[0] else None
        grad_weights = None
        if adapter.mora_type == SHARING:
            grad_z = _folded(g, r_hat)
            if ctx.needs_input_grad[1]:
                grad_weights = grad_z.T @ saved
            if grad_x is not None:
                grad_compressed = grad_z @ weights
                for i in range(adapter.blocks):
                    adapter.add_block_grad_(grad_x, i, grad_compressed)
        else:
            grad_z = g if g.shape[1] <= width else _folded(g, width)
            if ctx.needs_input_grad[1]:
                grad_weights = torch.zeros_like(weights)
            for i in range(adapter.blocks):
                seg = min(r_hat, grad_z.shape[1] - i * r_hat)
                g_i = grad_z[:, i * r_hat : i * r_hat + seg]
                if grad_weights is not None:
                    grad_weights[i, :seg] = g_i.T @ adapter.block_input(saved, i)
                if grad_x is not None:
                    adapter.add_block_grad_(grad_x, i, g_i @ weights[i, :seg])
        return (grad_x.view(ctx.x_shape) if grad_x is not None else None), grad_weights, None, None


class MoraMethod(Method):
    config_class = MoraConfig
    options = {
        "r": MethodOption(int, "LoRA rank whose parameter count M matches (r̂ ≈ √((in+out)·r))", "positive", lambda v: v > 0),
        "mora_type": MethodOption(int, "1: sharing, 6: RoPE", "1 or 6", lambda v: v in (SHARING, ROPE)),
        "mora_dropout": ADAPTER_DROPOUT,
    }
    #: M starts at zero with scale 1, like LoRA's B: LoRA's rate (the paper uses LoRA's settings).
    run_defaults = {"lr": 1e-3, "r": 8}

    def check_base(self, config, view, path):
        if view.takes_ids:
            raise UnsupportedBaseError(
                f"MoRA cannot adapt {path}, an Embedding: its operators act on activations. Remove it from target_modules."
            )

    def adapter_numel(self, config, view, path):
        return square_rank(view.in_features, view.out_features, config.r, config.mora_type) ** 2

    def make_adapter(self, config, view, path, state):
        return MoraAdapter(view, config)


register_method(MoraMethod("mora"))
