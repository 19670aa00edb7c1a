"""Optimizers and schedules: weight decay on matrices only; warmup, then constant, linear or cosine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftlab.optim import lr_multiplier, make_optimizer, make_scheduler, param_groups


def test_weight_decay_goes_to_trainable_matrices_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    decayed, undecayed = param_groups(model, lr=0.1, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [torch.Size([2, 4])]
    assert undecayed["weight_decay"] == 0.0 and len(undecayed["params"]) == 3  # norm weight and bias, head bias
    assert isinstance(make_optimizer(model, "sgd", lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; choose one of adamw, sgd"):
        make_optimizer(model, "adam", lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model.requires_grad_(False), 0.1, 0.0)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedules_warm_up_then_follow_their_shape(name):
    values = [lr_multiplier(name, total_steps=20, warmup_steps=4)(step) for step in range(20)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    tail = values[4:]
    if name == "constant":
        assert tail == [1.0] * 16
    else:
        assert all(a > b for a, b in zip(tail, tail[1:])) and tail[-1] < 0.1
    if name == "cosine":
        assert values[12] == pytest.approx(0.5)  # half way through the decay


def test_scheduler_drives_the_optimizer():
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model, "adamw", lr=1.0)
    scheduler = make_scheduler(optimizer, "linear", total_steps=4, warmup_steps=0)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_need_cuda(name):
    """bitsandbytes' 8-bit AdamW on a GPU; on CPU an error that says so and names the alternative."""
    model = nn.Linear(4, 2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=rf"'{name}' is bitsandbytes' 8-bit AdamW, which needs a CUDA GPU.*cpu.*Use 'adamw'"):
            make_optimizer(model, name, lr=0.1)
        return
    bnb_optim = pytest.importorskip("bitsandbytes.optim")
    expected = bnb_optim.PagedAdamW8bit if name.startswith("paged") else bnb_optim.AdamW8bit
    assert isinstance(make_optimizer(model.cuda(), name, lr=0.1), expected)


def test_adamw_runs_fused_where_it_can_with_the_per_tensor_loop_steps():
    """Fused AdamW (one kernel per tensor) on plain fp32 CPU tensors, the loop on others (fp16 on
    CPU); the fused steps equal the loop's to rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    twin = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    fused = make_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
    loop = torch.optim.AdamW(param_groups(twin, 1e-2, 0.1), lr=1e-2, foreach=False)
    assert all(group["fused"] for group in fused.param_groups)
    for step in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for net, optimizer in ((model, fused), (twin, loop)):
            net(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    half = make_optimizer(nn.Linear(2, 2).half(), "adamw", lr=1e-2)
    assert not half.param_groups[0]["fused"]
