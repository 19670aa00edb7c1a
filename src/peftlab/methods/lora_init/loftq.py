"""LoftQ (Li et al. 2023): start the adapter at the quantization error, so QLoRA starts where LoRA does.

    R₀ = W;  for t = 1..T:  Q_t = NF4(W − L_{t−1} R_{t−1}),  L_t R_t = SVD_r(W − deq(Q_t))
    base ← deq(Q_T),   s·B A = L_T R_T

``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=T))`` on
the full-precision model, as HF: the frozen weight becomes ``deq(Q_T)`` (NF4, blocks of 64, no double
quantization, byte for byte bitsandbytes' ``Params4bit(compress_statistics=False)``), which
``peftlab.quant.quantize_model(model, double_quant=False)`` then stores as exactly those codes.

Where HF and the paper differ, peftlab follows the paper:
* HF sets ``A = R, B = L`` whatever the LoRA scale s, so the start is ``deq(Q) + s·LR`` and is
  LoftQ's only when ``lora_alpha == r``; peftlab divides both by √s, so ``s·BA = LR`` for any s
  (equal to HF's tensors at s = 1).
* HF decomposes the weight as stored, which for GPT-2's Conv1D ([in, out]) gives transposed factors;
  peftlab works on the [out, in] view of every layer kind.
Only 4-bit NF4 is available (HF also offers 8-bit through bitsandbytes' int8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peftlab.methods.lora_init import (
    LoraInit, base_weight_fp32, burn_layer_inits, refuse_embedding, refuse_quantized, register_init, set_factors,
    store_base_weight,
)
from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4

#: HF's LoftQ quantizer: NF4 in blocks of 64 without double quantization.
LOFTQ_BLOCKSIZE = 64


@dataclass
class LoftQConfig:
    """HF's ``LoftQConfig``: the quantization bits and the number of alternating steps."""

    loftq_bits: int = 4
    loftq_iter: int = 1


def check_loftq_config(settings: dict) -> None:
    unknown = sorted(set(settings) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {unknown}; it takes loftq_bits and loftq_iter (LoftQConfig).")
    bits, iters = settings.get("loftq_bits", 4), settings.get("loftq_iter", 1)
    if bits != 4:
        raise ValueError(
            f"loftq_config: loftq_bits={bits!r} cannot apply: peftlab quantizes to 4-bit NF4 only (its QLoRA base); "
            "use LoftQConfig(loftq_bits=4)."
        )
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq_config: loftq_iter must be a whole number of alternating steps >= 1, got {iters!r}.")


def low_rank_split(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L [out, r], R [r, in])`` with ``L R`` the best rank-r approximation, √S on each side (HF's split)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    return dequantize_nf4(quantize_nf4(weight, blocksize=LOFTQ_BLOCKSIZE, double_quant=False), torch.float32)


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, rank: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(deq(Q), L, R)`` of ``iterations`` LoftQ steps on a float32 ``[out, in]`` weight."""
    target = weight
    for step in range(iterations):
        dequantized = nf4_round_trip(target)
        low, high = low_rank_split(weight - dequantized, rank)
        if step + 1 < iterations:
            target = weight - low @ high
    return dequantized, low, high


class LoftQ(LoraInit):
    key = "loftq"
    changes_base = True

    def check_config(self, config, value):
        if not config.loftq_config:
            raise ValueError(
                "init_lora_weights='loftq' needs loftq_config: pass loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)."
            )
        check_loftq_config(config.loftq_config)

    def check_base(self, config, view, path):
        refuse_embedding("loftq", view, path)
        refuse_quantized(
            "loftq", view, path,
            "LoftQ quantizes the weight itself and needs it in full precision; build the adapter on the unquantized "
            "model, then quantize it with peftlab.quant.quantize_model(model, double_quant=False), or train with "
            "`peftlab train --method qlora --method-option init_lora_weights=loftq`.",
        )

    def draw(self, adapter, value):
        burn_layer_inits(adapter)

    def from_base(self, adapter, view, config, path, value):
        weight = base_weight_fp32(view)
        dequantized, low, high = loftq_factors(weight, adapter.r, config.loftq_config.get("loftq_iter", 1))
        root = math.sqrt(adapter.scaling)  # the paper's start deq(Q) + L R for any LoRA scale (see above)
        set_factors(adapter, high / root, low / root)
        store_base_weight(view, dequantized)


register_init(LoftQ())
