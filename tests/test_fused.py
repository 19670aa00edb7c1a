"""The fused LoRA/DoRA autograd functions give the gradients of the plain formulas."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab import LoraConfig, get_peft_model


def _reference_output(layer, x, use_dora):
    """The method's formula written out with plain autograd (norm detached for DoRA)."""
    adapter = layer.adapters["default"]
    view = layer.view
    w = view.weight()
    a, b, s = adapter.lora_A, adapter.lora_B, adapter.scaling
    bias = view.bias if view.bias is not None else 0
    low_rank = s * (x @ a.T) @ b.T
    if not use_dora:
        return x @ w.T + bias + low_rank
    norm = torch.linalg.norm(w + s * b @ a, dim=1).detach()
    return (adapter.lora_magnitude_vector / norm) * (x @ w.T + low_rank) + bias


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_gradients_match_plain_autograd(kind, use_dora):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    model = nn.Sequential(base).double()
    peft = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=use_dora, init_lora_weights=False))
    layer = peft.base_model[0]
    x = torch.randn(2, 5, 12, dtype=torch.double, requires_grad=True)
    fused = layer(x)
    assert fused.grad_fn is not None and "Function" in type(fused.grad_fn).__name__  # the fused node ran
    params = [x] + [p for p in layer.adapters["default"].parameters()]
    grads_fused = torch.autograd.grad(fused.pow(2).sum(), params)
    reference = _reference_output(layer, x, use_dora)
    grads_ref = torch.autograd.grad(reference.pow(2).sum(), params)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads_fused, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_fused_path_steps_aside_under_dropout_and_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5))
    x = torch.randn(4, 8)
    out = peft.base_model[0](x)
    assert "LoraLinearFunction" not in type(out.grad_fn).__name__
    peft.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert peft.base_model[0](x).dtype == torch.bfloat16
