"""The fused LoRA/DoRA autograd functions give the gradients of the plain formulas."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab import LoraConfig, get_peft_model
from peftlab.methods.adalora import AdaLoraConfig
from peftlab.methods.dropout_mask import DropMask, drop_positions
from peftlab.quant.linear4bit import Linear4bit


def _reference_output(layer, x, use_dora, keep=None):
    """The method's formula written out with plain autograd (norm detached for DoRA).

    ``keep`` is a dropout mask already scaled by 1 / (1 - p); with it, DoRA is HF's formulation:
    ``base(x) + (g - 1) ⊙ x_d Wᵀ + g ⊙ s · x_d Aᵀ Bᵀ``.
    """
    adapter = layer.adapters["default"]
    view = layer.view
    w = view.weight()
    a, b, s = adapter.lora_A, adapter.lora_B, adapter.scaling
    bias = view.bias if view.bias is not None else 0
    x_d = x if keep is None else x * keep
    low_rank = s * (x_d @ a.T) @ b.T
    if not use_dora:
        return x @ w.T + bias + low_rank
    g = adapter.lora_magnitude_vector / torch.linalg.norm(w + s * b @ a, dim=1).detach()
    if keep is None:
        return g * (x @ w.T + low_rank) + bias
    return x @ w.T + bias + (g - 1) * (x_d @ w.T) + g * low_rank


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


def _double_base(kind: str) -> nn.Module:
    if kind == "nf4":  # QLoRA's base: NF4 storage, fp64 compute
        layer = Linear4bit.from_module(nn.Linear(12, 10), compute_dtype=torch.float64)
        layer.bias.data = layer.bias.data.double()
        return layer
    return (nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)).double()


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_fused_dropout_gradients_match_plain_autograd_with_the_same_mask(kind, use_dora):
    torch.manual_seed(0)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=use_dora, init_lora_weights=False,
                        lora_dropout=0.3)
    layer = get_peft_model(nn.Sequential(_double_base(kind)), config).base_model[0]
    x = torch.randn(4, 5, 12, dtype=torch.double, requires_grad=True)
    torch.manual_seed(1)
    fused = layer(x)
    assert "LinearFunction" in type(fused.grad_fn).__name__  # dropout no longer leaves the fused path
    torch.manual_seed(1)  # the mask the fused call drew, drawn again
    mask = DropMask.sample(20, 12, 0.3, x.device)
    assert 0 < len(mask.positions) < 240
    keep = torch.full((20 * 12,), 1 / 0.7, dtype=torch.double)
    keep[mask.positions] = 0
    reference = _reference_output(layer, x, use_dora, keep.view(4, 5, 12))
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    params = [x] + list(layer.adapters["default"].parameters())
    weights = torch.randn_like(fused)  # a loss whose gradient differs per output entry
    grads_fused = torch.autograd.grad((fused * weights).sum(), params)
    grads_ref = torch.autograd.grad((reference * weights).sum(), params)
    for got, want in zip(grads_fused, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_fused_path_steps_aside_under_autocast_and_no_dropout_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(4, 8)
    peft.eval()
    assert torch.equal(peft.base_model[0](x), peft.base_model[0](x))  # eval: no dropout, deterministic
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = peft.base_model[0](x)
    assert out.dtype == torch.bfloat16 and "LoraLinearFunction" not in type(out.grad_fn).__name__


def test_drop_mask_has_the_bernoulli_distribution():
    torch.manual_seed(0)
    rows, cols, p = 1000, 400, 0.3
    mask = DropMask.sample(rows, cols, p, torch.device("cpu"))
    dropped = torch.zeros(rows * cols, dtype=torch.bool)
    dropped[mask.positions] = True
    positions = mask.positions
    assert bool((positions[1:] > positions[:-1]).all()) and 0 <= int(positions[0]) and int(positions[-1]) < rows * cols
    n = rows * cols
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(int(dropped.sum()) - n * p) < 5 * sigma
    # Independence of neighbours (within and across rows): P(both dropped) = p².
    both = int((dropped[1:] & dropped[:-1]).sum())
    assert abs(both - (n - 1) * p * p) < 5 * ((n - 1) * p * p * (1 - p * p)) ** 0.5
    per_column = dropped.view(rows, cols).float().mean(0)  # no column is favoured
    assert float((per_column - p).abs().max()) < 5 * (p * (1 - p) / rows) ** 0.5


def test_drop_positions_draw_more_gaps_when_the_first_ones_fall_short():
    torch.manual_seed(0)
    short = drop_positions(10_000, 0.5, torch.device("cpu"), gaps_per_draw=7)
    torch.manual_seed(0)
    ample = drop_positions(10_000, 0.5, torch.device("cpu"))
    assert len(short) > 4000 and bool((short[1:] > short[:-1]).all()) and int(short[-1]) < 10_000
    assert abs(len(short) - len(ample)) < 500


def test_adalora_with_dropout_runs_fused_and_matches_plain_autograd_with_the_same_mask():
    torch.manual_seed(0)
    config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["0"], lora_dropout=0.3,
                           init_lora_weights=False, total_step=100)
    layer = get_peft_model(nn.Sequential(nn.Linear(12, 10)).double(), config).base_model[0]
    adapter = layer.adapters["default"]
    x = torch.randn(20, 12, dtype=torch.double, requires_grad=True)
    torch.manual_seed(1)
    fused = layer(x)
    assert "LoraLinearFunction" in type(fused.grad_fn).__name__
    torch.manual_seed(1)
    keep = torch.full((240,), 1 / 0.7, dtype=torch.double)
    keep[DropMask.sample(20, 12, 0.3, x.device).positions] = 0
    x_d = x * keep.view(20, 12)
    w, bias = layer.view.weight(), layer.view.bias
    reference = x @ w.T + bias + adapter.scaling * (x_d @ (adapter.lora_A * adapter.lora_E).T) @ adapter.lora_B.T
    params = [x, adapter.lora_A, adapter.lora_E, adapter.lora_B]
    weights = torch.randn_like(fused)
    for got, want in zip(torch.autograd.grad((fused * weights).sum(), params),
                         torch.autograd.grad((reference * weights).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
