"""PiSSA (Meng et al. 2024): the adapter starts as the weight's principal part, the base keeps the rest.

    W = U S Vᵀ,   A = √(S_r/s) V_rᵀ,   B = U_r √(S_r/s),   W_res = W − s·B A

so the model starts unchanged (``s·BA`` is the top-r part ``U_r S_r V_rᵀ``) and training moves the
principal directions, which converges faster than LoRA's zero start (the paper's claim). Dividing
S by the LoRA scale s is HF's (the paper has no scale: s = 1); the product is the paper's for any s.

``"pissa"`` takes the exact SVD; ``"pissa_niter_N"`` the randomized one (``torch.svd_lowrank`` with
N subspace iterations, the paper's "fast SVD"), which draws from the RNG as HF's does.
N = 0 is refused: HF allows it, but without a single iteration the factors are the random first
guess's projection, far from the principal directions the method is about.
"""

from __future__ import annotations

import torch

from peftlab.methods.lora_init import (
    LoraInit, base_weight_fp32, burn_layer_inits, refuse_embedding, refuse_quantized, register_init, set_factors,
    store_base_weight,
)

PREFIX = "pissa_niter_"


def _niter(value: str) -> int | None:
    if value == "pissa":
        return None
    digits = value[len(PREFIX):]
    if not value.startswith(PREFIX) or not digits.isdigit():
        raise ValueError(
            f"init_lora_weights={value!r}: write 'pissa' (exact SVD) or 'pissa_niter_N' with N a whole number of "
            "subspace iterations, e.g. 'pissa_niter_4'."
        )
    if int(digits) == 0:
        raise ValueError(
            "init_lora_weights='pissa_niter_0' runs the randomized SVD with no subspace iteration, which leaves the "
            "factors far from the principal singular vectors PiSSA starts from; use 'pissa_niter_4' (or more), or 'pissa'."
        )
    return int(digits)


class Pissa(LoraInit):
    key = "pissa"
    prefix = "pissa"
    shown = "'pissa', 'pissa_niter_N'"
    changes_base = True

    def reruns_on_load(self, value):
        return _niter(value) is None

    def check_config(self, config, value):
        _niter(value)

    def check_base(self, config, view, path):
        refuse_embedding(config.init_lora_weights, view, path)
        refuse_quantized(
            config.init_lora_weights, view, path,
            "PiSSA rewrites the base to its residual, which a 4-bit weight would round away (HF refuses it too). "
            "Initialise on the full-precision model, then quantize the residual (peftlab.quant.quantize_model).",
        )

    def draw(self, adapter, value):
        burn_layer_inits(adapter)

    @torch.no_grad()
    def from_base(self, adapter, view, config, path, value):
        weight = base_weight_fp32(view)
        r, scale = adapter.r, adapter.scaling
        niter = _niter(value)
        if niter is None:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(weight, r, niter=niter)
            vh = v.t()
        s = s / scale
        a = torch.diag(torch.sqrt(s)) @ vh
        b = u @ torch.diag(torch.sqrt(s))
        set_factors(adapter, a, b)
        store_base_weight(view, weight - scale * b @ a)


register_init(Pissa())
