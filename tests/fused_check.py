"""A method's fused low-rank node against plain autograd on the factors it stands for: one fp64
``Linear(12, 10)`` layer, the dropout mask the fused call drew drawn again, outputs at 1e-10 and
the gradients of a loss that weighs every output entry differently at 1e-9."""

from __future__ import annotations

from collections.abc import Callable

import torch

from peftlab.methods.dropout_mask import DropMask


def fused_gradients_equal_autograd(layer, node: str, factors: Callable, params: list, dropout: float) -> tuple:
    """``factors()``: the ``(A, B, s)`` of the update through plain autograd; ``params`` the adapter's
    tensors. Returns the gradients of ``[x] + params``."""
    x = torch.randn(4, 5, 12, dtype=torch.double, requires_grad=True)
    torch.manual_seed(1)
    fused = layer(x)
    assert type(fused.grad_fn).__name__ == f"{node}Backward"  # the method's node ran
    keep = torch.ones(20 * 12, dtype=torch.double)
    if dropout:
        torch.manual_seed(1)  # the mask the fused call drew, drawn again
        keep.fill_(1 / (1 - dropout))[DropMask.sample(20, 12, dropout, x.device).positions] = 0
    a, b, scale = factors()
    w, bias = layer.view.weight(), layer.view.bias
    reference = x @ w.T + bias + scale * ((x * keep.view(4, 5, 12)) @ a.T) @ b.T
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(fused)
    grads = torch.autograd.grad((fused * weights).sum(), [x, *params])
    for got, want in zip(grads, torch.autograd.grad((reference * weights).sum(), [x, *params])):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    return grads
