"""OLoRA (Büyükakyüz 2024): the adapter starts as the first r columns of W's QR factorisation.

    W = Q R,   B = Q[:, :r] (orthonormal columns),   A = R[:r],   W_res = W − s·B A

so the model starts unchanged and B starts orthonormal, which the paper finds to converge faster.
HF decomposes the weight as stored: for GPT-2's Conv1D (stored [in, out]) that gives factors of
the transposed shapes; peftlab decomposes the [out, in] view on every layer kind, as the paper means.
On a 4-bit base the weight is dequantised and the residual re-quantized with the layer's settings (as HF).
"""

from __future__ import annotations

import torch

from peftlab.methods.lora_init import (
    LoraInit, base_weight_fp32, burn_layer_inits, refuse_embedding, register_init, set_factors, store_base_weight,
)


class Olora(LoraInit):
    key = "olora"
    changes_base = True

    def check_base(self, config, view, path):
        refuse_embedding("olora", view, path)

    def draw(self, adapter, value):
        burn_layer_inits(adapter)

    @torch.no_grad()
    def from_base(self, adapter, view, config, path, value):
        weight = base_weight_fp32(view)
        q, r_factor = torch.linalg.qr(weight)
        a, b = r_factor[: adapter.r].contiguous(), q[:, : adapter.r].contiguous()
        set_factors(adapter, a, b)
        store_base_weight(view, weight - adapter.scaling * b @ a)


register_init(Olora())
