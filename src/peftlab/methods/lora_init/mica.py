"""MiCA, minor component adaptation (HF peft 0.21; arXiv 2604.01694): B starts as the r left singular
vectors of W with the *smallest* singular values and stays frozen; only A trains, from A = 0.

    W = U S Vᵀ,   B = U[:, −r:] (frozen),   A = 0,   the base unchanged

The update ``s·B A`` then lives in W's least-used output directions, which the method argues
disturb the pre-trained behaviour least. Refused with DoRA (HF has no MiCA + DoRA variant) and with
LoRA-FA (it freezes A: nothing would train).
"""

from __future__ import annotations

import torch

from peftlab.methods.lora_init import (
    LoraInit, base_weight_fp32, burn_layer_inits, refuse_embedding, refuse_quantized, register_init, set_factors,
)


class Mica(LoraInit):
    key = "mica"

    def check_config(self, config, value):
        if config.use_dora:
            raise ValueError("init_lora_weights='mica' with use_dora=True is not supported (HF has no MiCA + DoRA variant).")

    def check_base(self, config, view, path):
        from peftlab.methods.method import UnsupportedBaseError

        refuse_embedding("mica", view, path)
        refuse_quantized("mica", view, path, "MiCA decomposes the weight in full precision (HF refuses 4-bit too).")
        r = config.rank_and_alpha(path)[0]
        if r > min(view.in_features, view.out_features):
            raise UnsupportedBaseError(
                f"init_lora_weights='mica' needs r <= min(in, out); {path} is [{view.out_features}, {view.in_features}] "
                f"and r is {r}."
            )

    def draw(self, adapter, value):
        burn_layer_inits(adapter)

    @torch.no_grad()
    def from_base(self, adapter, view, config, path, value):
        u, _, _ = torch.linalg.svd(base_weight_fp32(view), full_matrices=False)
        set_factors(adapter, torch.zeros_like(adapter.lora_A), u[:, -adapter.r:])
        adapter.frozen_factors = ("lora_B",)


register_init(Mica())
