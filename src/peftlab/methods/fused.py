"""Fused autograd functions for a frozen linear layer plus a low-rank (LoRA/DoRA) path.

Autograd on the plain formula pays, per layer, a copy of the base output (``addmm`` cannot add
in place into a tensor autograd gave it) and an extra add of the two input gradients. Here:

    forward   out = base(x);  u = x Aᵀ;  out += s · u Bᵀ             (in place)
    backward  gu = s · g B;   gx = g W;  gx += gu A                   (in place)
              gA = guᵀ x;     gB = s · gᵀ u

which is the least work LoRA can do: five skinny products and nothing else over ``[N, out]``
beyond the frozen layer's own. The frozen weight is never saved: the backward asks the base view
for ``g W`` (a 4-bit base dequantises again instead of keeping a full-size copy alive). The input
``x`` is kept only for ``gA``: with A frozen (LoRA-FA) the node keeps ``u`` ([N, r]) and no ``x``.
DoRA adds ``y = g ⊙ z + b`` on top, with ``z = x Wᵀ + s · u Bᵀ`` and a detached row norm.

Dropout on the adapter input (``x_d = x ⊙ keep / (1-p)``, mask drawn as in ``dropout_mask.py``):

    LoRA  u = x_d Aᵀ, gA = guᵀ x_d with x_d kept in place of x (as HF keeps it, without HF's
          [N, in] mask; making it again in backward cost a multiply and a scatter over [N, in]), and
          gx = g W + (gu A ⊙ keep) / (1-p), the dropped entries restored to g W.
    DoRA  as HF and the official code: out = base(x) + (g - 1) ⊙ x_d Wᵀ + g ⊙ s · x_d Aᵀ Bᵀ,
          whose second product with W, in forward and in backward, is the least that
          formulation needs (x_d is kept: backward needs it for gA and ``x_d Wᵀ`` for gm).
"""

from __future__ import annotations

import torch

from peftlab.base import BaseLayerView
from peftlab.methods.dropout_mask import DropMask


def can_fuse(x: torch.Tensor, view: BaseLayerView, *params: torch.Tensor) -> bool:
    """The fused path needs one dtype end to end, no autocast, and a frozen base."""
    if view.takes_ids or torch.is_autocast_enabled(x.device.type):
        return False
    if any(p.dtype != x.dtype for p in params) or view.dtype != x.dtype:
        return False
    return not view.trains()


def sample_mask(x2: torch.Tensor, dropout: float) -> DropMask | None:
    """The dropout mask of a 2-D adapter input (None without dropout)."""
    return DropMask.sample(x2.shape[0], x2.shape[1], dropout, x2.device) if dropout > 0 else None


def add_low_rank_input_grad(grad_x: torch.Tensor, grad_u: torch.Tensor, a: torch.Tensor, mask: DropMask | None):
    """``grad_x + grad_u A`` (2-D, in place where it can) for ``u = dropout(x) Aᵀ``: through the mask,
    the dropped entries keep the frozen layer's gradient alone."""
    if mask is None:
        return grad_x.addmm_(grad_u, a)
    grad_x = grad_x.contiguous()
    base_only = grad_x.view(-1)[mask.positions]
    grad_x.addmm_(grad_u, a, alpha=mask.keep_scale)
    grad_x.view(-1)[mask.positions] = base_only
    return grad_x


def _lowrank_param_grads(ctx, grad_z: torch.Tensor, x2: torch.Tensor, a, b, u):
    """``gu``, ``gA``, ``gB`` of ``s · (x2 Aᵀ) Bᵀ`` given its gradient ``grad_z`` (all 2-D)."""
    scale = ctx.scale
    grad_u = torch.mm(grad_z, b).mul_(scale)
    grad_a = torch.mm(grad_u.t(), x2) if ctx.needs_input_grad[1] else None
    # (uᵀ g)ᵀ, not gᵀ u: the same product, 2-3x faster on CPU with g's rows contiguous.
    grad_b = torch.mm(u.t(), grad_z).mul_(scale).t() if ctx.needs_input_grad[2] else None
    return grad_u, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, scale: float, view: BaseLayerView, dropout: float = 0.0):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = view.forward(x)
        mask = sample_mask(x2, dropout)
        x_in = x2 if mask is None else mask.apply(x2)
        u = torch.mm(x_in, a.t())
        out.view(-1, out.shape[-1]).addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(x_in if ctx.needs_input_grad[1] else None, a, b, u)
        ctx.scale, ctx.view, ctx.x_shape, ctx.mask = scale, view, x.shape, mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_in, a, b, u = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_u, grad_a, grad_b = _lowrank_param_grads(ctx, g2, x_in, a, b, u)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = add_low_rank_input_grad(ctx.view.input_grad(g2), grad_u, a, ctx.mask).view(ctx.x_shape)
        return grad_x, grad_a, grad_b, None, None, None


class DoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, magnitude, norm, scale: float, view: BaseLayerView, dropout: float = 0.0):
        x2 = x.reshape(-1, x.shape[-1])
        mask = sample_mask(x2, dropout)
        row_scale = magnitude / norm
        with torch.no_grad():
            if mask is None:
                z = view.forward_no_bias(x)
                base_out = None
            else:
                base_out = view.forward(x)
                x2 = mask.apply(x2)
                z = view.forward_no_bias(x2)
        z2 = z.view(-1, z.shape[-1])
        u = torch.mm(x2, a.t())
        if mask is None:
            z2.addmm_(u, b.t(), alpha=scale)
            bias = view.bias
            out = torch.addcmul(bias, z, row_scale) if bias is not None else z * row_scale
        else:  # base(x) + (g - 1) ⊙ x_d Wᵀ + g ⊙ s · u Bᵀ  =  base(x) - x_d Wᵀ + g ⊙ z_d
            out = base_out
            out.view(-1, out.shape[-1]).sub_(z2)
            z2.addmm_(u, b.t(), alpha=scale)
            out.view(-1, out.shape[-1]).addcmul_(z2, row_scale)
        ctx.save_for_backward(x2, a, b, u, z2, row_scale, norm)
        ctx.scale, ctx.view, ctx.x_shape, ctx.mask = scale, view, x.shape, mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, a, b, u, z2, row_scale, norm = ctx.saved_tensors
        mask: DropMask | None = ctx.mask
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_m = grad_z = None
        if ctx.needs_input_grad[3]:
            grad_z = torch.mul(g2, z2)
            grad_m = grad_z.sum(0).div_(norm)
        grad_z = torch.mul(g2, row_scale, out=grad_z)  # into the [N, out] buffer gm used: one allocation less
        grad_u, grad_a, grad_b = _lowrank_param_grads(ctx, grad_z, x2, a, b, u)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mask is None:
                grad_x = ctx.view.input_grad(grad_z)
                grad_x.addmm_(grad_u, a)
            else:  # g W through the clean input, plus the dropped-out input's gradient through the mask
                through_mask = ctx.view.input_grad(g2 * (row_scale - 1))
                through_mask.addmm_(grad_u, a)
                grad_x = ctx.view.input_grad(g2)
                grad_x.add_(mask.zero_dropped(through_mask), alpha=mask.keep_scale)
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_a, grad_b, grad_m, None, None, None, None
