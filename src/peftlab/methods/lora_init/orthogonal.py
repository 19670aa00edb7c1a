"""``init_lora_weights="orthogonal"`` (HF's, after datta0.github.io/posts/rethink-lora-init):
one random orthogonal ``Q`` (r×r, QR of a Gaussian); A takes its odd rows, B its even rows,

    A = (G₁ Q[0::2])ᵀ / 10      G₁ ~ N(0, 1)  [in, r/2]
    B = G₂ᵀ Q[1::2] / 10        G₂ ~ N(0, 1)  [r/2, out]

so the rows of A and the columns of B start in orthogonal subspaces and ``BA = 0`` while neither
factor is zero (both get gradients from the first step). r must be even. On an Embedding HF keeps
its default (A = 0, B ~ N(0, 1)); so does peftlab.
"""

from __future__ import annotations

import torch

from peftlab.methods.lora_init import LoraInit, burn_layer_inits, draw_default, register_init


class Orthogonal(LoraInit):
    key = "orthogonal"

    def check_config(self, config, value):
        odd = sorted({r for r in [config.r, *config.rank_pattern.values()] if r % 2})
        if odd:
            raise ValueError(
                f"init_lora_weights='orthogonal' needs an even rank (A and B each take half of an orthogonal r×r "
                f"matrix), got r={odd[0]}; use r={odd[0] + 1} or another init."
            )

    @torch.no_grad()
    def draw(self, adapter, value):
        if adapter.is_embedding:
            draw_default(adapter, value)
            return
        burn_layer_inits(adapter)
        r = adapter.r
        q, _ = torch.linalg.qr(torch.randn(r, r))
        in_features, out_features = adapter.lora_A.shape[1], adapter.lora_B.shape[0]
        a = torch.randn(in_features, r // 2).mm(q[0::2, :]).T / 10.0
        b = torch.randn(r // 2, out_features).T.mm(q[1::2, :]) / 10.0
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)


register_init(Orthogonal())
