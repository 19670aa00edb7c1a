"""MoRA against its definition (methods.md): the forward equals ``x (W + ΔW)ᵀ`` with ΔW built densely
from the operators written out as matrices, for both operators and the edge shapes; r̂² parameters
per layer; exact merge/unmerge.

The dense oracle is built here from the paper's description, independently of ``mora.py``:
    ΔW = T · M · C · P            type 1 ("sharing")
    ΔW = D · (I_n ⊗ M) · R · P    type 6 ("RoPE")
with P the wrap-around ``[n·r̂, in]`` selection, C the sum of the n blocks, T the tiling to ``out``,
R the block-diagonal RoPE rotations and D the truncation/tiling of the n·r̂ outputs to ``out``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.base import LinearView
from peftlab.methods import UnsupportedBaseError
from peftlab.methods.mora import MoraAdapter, MoraConfig, square_rank
from peftlab.methods.vera import VeraConfig
from tiny_models import perturb, tiny_llama

# (in, out, r): in < r̂, out < r̂, in != out both ways, in a multiple of r̂, the smallest layer.
SHAPES = [(4, 64, 8), (64, 4, 8), (24, 40, 2), (40, 24, 3), (16, 16, 8), (1, 1, 1), (7, 5, 1)]
TYPES = [1, 6]


def wrap_matrix(n_rows: int, in_features: int) -> torch.Tensor:
    p = torch.zeros(n_rows, in_features, dtype=torch.float64)
    for j in range(n_rows):
        p[j, j % in_features] = 1
    return p


def rope_block(r_hat: int, position: int) -> torch.Tensor:
    """The rotation of one block: pairs (j, j + r̂/2) turned by position · 10000^(−2j/r̂)."""
    half = r_hat // 2
    rot = torch.zeros(r_hat, r_hat, dtype=torch.float64)
    for j in range(r_hat):
        theta = position * 10000 ** (-2 * (j % half) / r_hat)
        rot[j, j] = math.cos(theta)
        if j < half:
            rot[j, j + half] = -math.sin(theta)
        else:
            rot[j, j - half] = math.sin(theta)
    return rot


def dense_delta(m: torch.Tensor, in_features: int, out_features: int, mora_type: int) -> torch.Tensor:
    r_hat = m.shape[0]
    n = math.ceil(in_features / r_hat)
    p = wrap_matrix(n * r_hat, in_features)
    if mora_type == 1:
        compress = torch.cat([torch.eye(r_hat, dtype=torch.float64)] * n, dim=1)
        return wrap_matrix(out_features, r_hat) @ m @ compress @ p
    rotations = torch.block_diag(*[rope_block(r_hat, i) for i in range(n)])
    per_block = torch.block_diag(*[m] * n)
    return wrap_matrix(out_features, n * r_hat) @ per_block @ rotations @ p


def mora_layer(in_features: int, out_features: int, r: int, mora_type: int, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, dtype=torch.float64)
    view = LinearView(linear)
    adapter = MoraAdapter(view, MoraConfig(r=r, mora_type=mora_type))
    with torch.no_grad():
        adapter.mora_M.normal_()
    return linear, view, adapter


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_equals_dense_delta(shape, mora_type):
    in_features, out_features, r = shape
    linear, view, adapter = mora_layer(in_features, out_features, r, mora_type)
    x = torch.randn(3, 5, in_features, dtype=torch.float64)
    delta = dense_delta(adapter.mora_M.detach(), in_features, out_features, mora_type)
    expected = x @ (linear.weight + delta).T + linear.bias
    got = adapter(x, linear(x), view)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.delta_weight(view), delta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_merge_unmerge_exact(shape, mora_type):
    in_features, out_features, r = shape
    linear, view, adapter = mora_layer(in_features, out_features, r, mora_type)
    x = torch.randn(4, in_features, dtype=torch.float64)
    original = linear.weight.detach().clone()
    unmerged = adapter(x, linear(x), view)
    adapter.merge(view)
    torch.testing.assert_close(linear(x), unmerged, rtol=1e-12, atol=1e-12)
    adapter.unmerge(view)
    torch.testing.assert_close(linear.weight, original, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "shape, mora_type, r_hat",
    [((16, 16, 8), 1, 16), ((4, 64, 8), 1, 23), ((4, 64, 8), 6, 22), ((1, 1, 1), 1, 1), ((1, 1, 1), 6, 2),
     ((576, 576, 8), 1, 96), ((576, 1536, 8), 6, 130)],
)
def test_parameter_count_is_r_hat_squared(shape, mora_type, r_hat):
    in_features, out_features, r = shape
    assert square_rank(in_features, out_features, r, mora_type) == r_hat
    adapter = MoraAdapter(LinearView(nn.Linear(in_features, out_features)), MoraConfig(r=r, mora_type=mora_type))
    assert sum(p.numel() for p in adapter.parameters()) == r_hat**2
    assert adapter.mora_M.abs().sum() == 0  # zero init: the model starts unchanged


def test_gradient_reaches_m_only_through_the_update():
    linear, view, adapter = mora_layer(24, 40, 2, 6)
    x = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    adapter(x, linear(x), view).pow(2).sum().backward()
    delta = dense_delta(adapter.mora_M.detach(), 24, 40, 6)
    # d/dx of ‖x (W + ΔW)ᵀ + b‖²: the operators' adjoints are right too.
    expected = 2 * (x.detach() @ (linear.weight + delta).T + linear.bias) @ (linear.weight + delta)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-10)
    assert adapter.mora_M.grad is not None and adapter.mora_M.grad.abs().sum() > 0


@pytest.mark.parametrize("mora_type", TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_forward_and_backward_equal_autograd_on_the_operators(shape, mora_type):
    """The one-node path (in-place tiling and wrapping adjoints) against autograd on the plain update."""
    in_features, out_features, r = shape
    linear, view, adapter = mora_layer(in_features, out_features, r, mora_type)
    linear.requires_grad_(False)
    x = torch.randn(2, 3, in_features, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, out_features, dtype=torch.float64)
    results = []
    for run in (lambda: adapter(x, linear(x), view), lambda: adapter.fused_forward(x, view)):
        out = run()
        (out * weight).sum().backward()
        results.append((out.detach(), x.grad, adapter.mora_M.grad))
        x.grad = adapter.mora_M.grad = None
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    expected = x.detach() @ (linear.weight + dense_delta(adapter.mora_M.detach(), in_features, out_features, mora_type)).T
    torch.testing.assert_close(results[1][0], expected + linear.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [0, 2, 3, "rotate", True, None])
def test_unknown_mora_type_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"mora_type=.* is unknown: use 1 \('sharing'.*or 6 \('rope'"):
        MoraConfig(mora_type=bad)


def test_mora_type_names():
    assert MoraConfig(mora_type="sharing").mora_type == 1
    assert MoraConfig(mora_type="RoPE").mora_type == 6


# -- through the model: bad input ------------------------------------------------------------------


def test_embedding_target_is_refused_by_name():
    with pytest.raises(UnsupportedBaseError, match=r"MoRA cannot adapt model\.embed_tokens, an Embedding"):
        get_peft_model(tiny_llama(), MoraConfig(target_modules=["embed_tokens", "q_proj"]))


def test_a_file_of_one_method_is_not_loaded_as_another(tmp_path):
    """A MoRA folder loads only as MoRA: another method's config is refused, and a config relabelled to
    another peft_type finds none of its tensors (never a silent partial load)."""
    model = get_peft_model(tiny_llama(), MoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    perturb(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a MORA adapter but the config given is VeraConfig \(VERA\)"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=VeraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"holds a MORA adapter, not a LoraConfig"):
        LoraConfig.from_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "VERA", "mora_type": None}))
    with pytest.raises(ValueError, match=r"does not fit this model: missing keys .*vera_lambda"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
