"""Fused autograd functions for a frozen linear layer plus a low-rank (LoRA/DoRA) path.

Autograd on the plain formula pays, per layer, a copy of the base output (``addmm`` cannot add
in place into a tensor autograd gave it) and an extra add of the two input gradients. Here:

    forward   out = base(x);  u = x Aᵀ;  out += s · u Bᵀ             (in place)
    backward  gu = s · g B;   gx = g W;  gx += gu A                   (in place)
              gA = guᵀ x;     gB = s · gᵀ u

which is the least work LoRA can do: five skinny products and nothing else over ``[N, out]``
beyond the frozen layer's own. The frozen weight is never saved: the backward asks the base view
for ``g W`` (a 4-bit base dequantises again instead of keeping a full-size copy alive).
DoRA adds ``y = g ⊙ z + b`` on top, with ``z = x Wᵀ + s · u Bᵀ`` and a detached row norm.
"""

from __future__ import annotations

import torch

from peftlab.base import BaseLayerView


def can_fuse(x: torch.Tensor, view: BaseLayerView, *params: torch.Tensor) -> bool:
    """The fused path needs one dtype end to end, no autocast, and a frozen base."""
    if view.takes_ids or torch.is_autocast_enabled(x.device.type):
        return False
    if any(p.dtype != x.dtype for p in params) or view.dtype != x.dtype:
        return False
    return not any(p.requires_grad for p in view.module.parameters())


def _lowrank_backward(ctx, grad_z: torch.Tensor, x2: torch.Tensor, a, b, u):
    """Gradients of ``z = x Wᵀ + s · (x Aᵀ) Bᵀ`` given ``dL/dz``, all 2-D."""
    scale = ctx.scale
    grad_u = torch.mm(grad_z, b).mul_(scale)
    grad_x = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = ctx.view.input_grad(grad_z)
        grad_x.addmm_(grad_u, a)
    if ctx.needs_input_grad[1]:
        grad_a = torch.mm(grad_u.t(), x2)
    if ctx.needs_input_grad[2]:
        grad_b = torch.mm(grad_z.t(), u).mul_(scale)
    return grad_x, grad_a, grad_b


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, scale: float, view: BaseLayerView):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = view.forward(x)
        u = torch.mm(x2, a.t())
        out.view(-1, out.shape[-1]).addmm_(u, b.t(), alpha=scale)
        ctx.save_for_backward(x2, a, b, u)
        ctx.scale, ctx.view, ctx.x_shape = scale, view, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, a, b, u = ctx.saved_tensors
        grad_x, grad_a, grad_b = _lowrank_backward(ctx, grad_out.reshape(-1, grad_out.shape[-1]), x2, a, b, u)
        return (grad_x.view(ctx.x_shape) if grad_x is not None else None), grad_a, grad_b, None, None


class DoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, magnitude, norm, scale: float, view: BaseLayerView):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            z = view.forward_no_bias(x)
        z2 = z.view(-1, z.shape[-1])
        u = torch.mm(x2, a.t())
        z2.addmm_(u, b.t(), alpha=scale)
        row_scale = magnitude / norm
        bias = view.bias
        out = torch.addcmul(bias, z, row_scale) if bias is not None else z * row_scale
        ctx.save_for_backward(x2, a, b, u, z2, row_scale, norm)
        ctx.scale, ctx.view, ctx.x_shape = scale, view, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, a, b, u, z2, row_scale, norm = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_m = (g2 * z2).sum(0).div_(norm) if ctx.needs_input_grad[3] else None
        grad_x, grad_a, grad_b = _lowrank_backward(ctx, g2 * row_scale, x2, a, b, u)
        grad_x = grad_x.view(ctx.x_shape) if grad_x is not None else None
        return grad_x, grad_a, grad_b, grad_m, None, None, None
