"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024), method name ``dora``.

    W' = m ⊙ (W + s·BA) / ‖W + s·BA‖        norm per output row, detached in backward (§4.3)
    h  = g ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b,      g = m / ‖W + s·BA‖

The row norms come without an ``[out, in]`` temporary:

    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s · B_i · (W Aᵀ)_i + s² · B_i (A Aᵀ) B_iᵀ

``‖W_i‖²`` is cached until the frozen weight changes (merge, Delta-LoRA); the rest costs one
``[out, in] × [in, r]`` product per step. ``m`` starts at the row norms of ``W + s·BA`` (of ``W``
with the default ``B = 0``), so the model starts unchanged.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from peftlab.base import BaseLayerView
from peftlab.methods.fused import DoraLinearFunction, can_fuse
from peftlab.methods.lora import LoraAdapter, add_low_rank
from peftlab.methods.lora_variant import LoraVariant, register_lora_variant
from peftlab.methods.method import UnsupportedBaseError


class DoraAdapter(LoraAdapter):
    def __init__(self, base: BaseLayerView, r, alpha, dropout, use_rslora, init) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora, init)
        self._row_sq_cache: tuple[tuple, torch.Tensor] | None = None
        self._merged_scale: torch.Tensor | None = None
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(base).to(self.lora_A.dtype))

    def after_base_init(self, base: BaseLayerView) -> None:
        # As HF: the magnitude is the row norm of the started weight W_res + s·BA (LoftQ's differs from W's).
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm(base))

    def _weight_row_sq(self, base: BaseLayerView, weight: torch.Tensor) -> torch.Tensor:
        key = (base.weight_version(), weight.dtype, weight.device)
        if self._row_sq_cache is None or self._row_sq_cache[0] != key:
            self._row_sq_cache = (key, weight.to(_accumulation_dtype(weight)).pow(2).sum(1))
        return self._row_sq_cache[1]

    @torch.no_grad()
    def weight_norm(self, base: BaseLayerView) -> torch.Tensor:
        """``‖W + s·BA‖`` per output row, in fp32 (fp64 for fp64 weights), outside autograd."""
        w = base.weight()
        acc = _accumulation_dtype(w)
        a, b, s = self.lora_A, self.lora_B, self.scaling
        wa = w @ (a if a.dtype == w.dtype else a.to(w.dtype)).T  # [out, r]: the one product over W
        wa, a, b = (t if t.dtype == acc else t.to(acc) for t in (wa, a, b))
        # Σ_j B_ij (2s·(W Aᵀ)_ij + s²·(B A Aᵀ)_ij): the cross and low-rank terms in one addmm and one row dot
        terms = torch.addmm(wa, b, a @ a.T, beta=2 * s, alpha=s * s)
        sq = torch.linalg.vecdot(b, terms).add_(self._weight_row_sq(base, w))
        return sq.clamp_min_(0).sqrt_()

    def forward(self, x, base_out, base):
        x = self._adapter_input(x)
        bias = base.bias
        if self.dropout is not None and self.training:
            # As HF: both terms see the dropped-out input; the base output keeps the clean one.
            plain = base.forward_no_bias(x)
        else:
            plain = base_out if bias is None else base_out - bias
        scale = (self.lora_magnitude_vector / self.weight_norm(base)).to(plain.dtype)
        u = base.project_input(x, self.lora_A)
        adapted = add_low_rank(plain, u, self.lora_B, self.scaling) * scale
        if self.dropout is not None and self.training:
            return base_out + (adapted - plain)
        return adapted if bias is None else adapted + bias

    def fused_forward(self, x, base):
        if not can_fuse(x, base, self.lora_A, self.lora_B):
            return None
        m = self.lora_magnitude_vector
        norm = self.weight_norm(base).to(m.dtype)
        return DoraLinearFunction.apply(x, self.lora_A, self.lora_B, m, norm, self.scaling, base, self.active_dropout())

    def delta_weight(self, base):
        """``W' − W``: the change merging makes (it builds ``[out, in]``, which merging must)."""
        w = base.weight().float()
        scale = (self.lora_magnitude_vector.float() / self.weight_norm(base))[:, None]
        return scale * (w + super().delta_weight(base).float()) - w

    def low_rank(self, base):
        return None  # W' − W rescales every row of W: full rank

    def merge(self, base):
        scale = (self.lora_magnitude_vector.detach().float() / self.weight_norm(base))[:, None]
        self._merged_scale = scale
        w = base.weight().float()
        base.add_to_weight(scale * (w + super().delta_weight(base).detach().float()) - w)

    def unmerge(self, base):
        if self._merged_scale is None:
            raise RuntimeError("unmerge called on a DoRA adapter that was never merged.")
        w = base.weight().float()
        base.add_to_weight(w / self._merged_scale - super().delta_weight(base).detach().float() - w)
        self._merged_scale = None

    def saved_tensors(self):
        return {**super().saved_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}


def _accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class DoraVariant(LoraVariant):
    """``LoraConfig(use_dora=True)``: DoRA's layer, one magnitude per output row more, no Embedding."""

    adapter_class = DoraAdapter

    def applies(self, config) -> bool:
        return config.use_dora

    def check_base(self, config, view, path) -> None:
        if view.takes_ids:
            raise UnsupportedBaseError(
                f"DoRA on an Embedding layer ({path}) is not supported; target linear layers, or use LoRA for embeddings."
            )

    def extra_numel(self, config, view) -> int:
        return view.out_features

    def rename_saved_keys(self, tensors):
        # Older HF versions wrote DoRA's magnitude with a ".weight" suffix.
        return {re.sub(r"lora_magnitude_vector\.weight$", "lora_magnitude_vector", k): v for k, v in tensors.items()}


register_lora_variant(DoraVariant())
