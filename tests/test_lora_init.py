"""LoRA's initialisations (``init_lora_weights``) against HF peft: for one seed and config, the
initial A, B and the residual base weight of every adapted layer equal HF's, for every method of
the LoRA family (``WITH_LORA_INITS`` of the method table), on Linear (Llama) and Conv1D (GPT-2).

HF's LoftQ runs on CUDA only (its quantizer device is hard-coded); the oracle here is HF's own
``loftq_init`` with that one line pointed at the CPU, where bitsandbytes quantizes the same bytes.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import textwrap
import warnings

import peft
import peft.tuners.lora.layer as hf_lora_layer
import peft.utils.loftq_utils as hf_loftq
import pytest
import torch

from method_table import WITH_LORA_INITS, MethodCase
from peftlab import LoraConfig, get_peft_model
from peftlab.methods import make_method_config
from peftlab.methods.lora_init import INITS
from peftlab.methods.lora_init.loftq import LoftQConfig
from peftlab.quant import Linear4bit
from tiny_models import tiny_batch, tiny_gpt2, tiny_llama

ATOL = 1e-5
SEED = 7
# Width 64: bitsandbytes' CPU decoder (the LoftQ oracle's) mis-scales rows shorter than a block of 64 (see nf4.py).
MODELS = {
    "llama": (lambda: tiny_llama(hidden=64), "all-linear"),
    "gpt2": (lambda: tiny_gpt2(hidden=64), ["c_attn", "c_proj", "c_fc"]),
}
EXACT_INITS = [True, False, "gaussian", "orthogonal", "pissa", "pissa_niter_4", "olora", "loftq", "mica"]
# MiCA freezes B: refused with DoRA (no such HF variant) and LoRA-FA (A frozen too: nothing would train).
REFUSED = {("dora", "mica"), ("lora_fa", "mica")}
# HF decomposes GPT-2's Conv1D weight as stored ([in, out]): its factors come out transposed (see olora.py, loftq.py).
HF_WRONG_ON_CONV1D = {"olora", "loftq"}


def _hf_loftq_on_cpu():
    """HF's ``loftq_init`` with its quantizer device (hard-coded "cuda"/"xpu") set to the CPU."""
    source = textwrap.dedent(inspect.getsource(hf_loftq.loftq_init.__wrapped__ if hasattr(hf_loftq.loftq_init, "__wrapped__") else hf_loftq.loftq_init))
    assert 'compute_device = "xpu" if is_xpu_available() else "cuda"' in source
    source = source.replace('compute_device = "xpu" if is_xpu_available() else "cuda"', 'compute_device = "cpu"')
    source = source.replace("@torch.no_grad()\n", "")
    namespace = dict(vars(hf_loftq))
    exec(compile(source, hf_loftq.__file__, "exec"), namespace)
    return torch.no_grad()(namespace["loftq_init"])


@pytest.fixture(autouse=True)
def hf_loftq_on_cpu(monkeypatch):
    monkeypatch.setattr(hf_lora_layer, "loftq_init", _hf_loftq_on_cpu())
    # HF's LoraConfig asks for scipy with LoftQ but never imports it: not worth installing for the oracle.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "scipy" else find_spec(name, *a))


def _extra(init) -> dict:
    return {"loftq_config": {"loftq_bits": 4, "loftq_iter": 2}} if init == "loftq" else {}


def build_pair(case: MethodCase, model_name: str, init, rank: int = 4, **fields):
    """(HF's model, peftlab's model), both built from one base after the same seed."""
    build, targets = MODELS[model_name]
    base = build()
    options = {**case.rank_fields(rank), "target_modules": targets, "init_lora_weights": init, **_extra(init), **fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        hf = peft.get_peft_model(copy.deepcopy(base), getattr(peft, case.hf)(**case.hf_fields, **options))
        torch.manual_seed(SEED)
        ours = get_peft_model(copy.deepcopy(base), make_method_config(case.name, **options))
    return hf, ours


def base_weights(model) -> dict[str, torch.Tensor]:
    """The frozen weights of the adapted layers as [out, in], by module path."""
    return {path: layer.view.weight(torch.float32) for path, layer in model.adapted_layers()}


def hf_base_weights(hf, paths) -> dict[str, torch.Tensor]:
    out = {}
    for path in paths:
        layer = hf.base_model.model.get_submodule(path).get_base_layer()
        weight = layer.weight.float()
        out[path] = weight.T if type(layer).__name__ == "Conv1D" else weight
    return out


def assert_same_start(hf, ours):
    theirs = peft.get_peft_model_state_dict(hf)
    mine = ours.adapter_state_dict("default")
    assert set(mine) == set(theirs)
    for key, value in mine.items():
        assert value.shape == theirs[key].shape, key
        torch.testing.assert_close(value.float(), theirs[key].float(), atol=ATOL, rtol=0, msg=key)
    mine_w = base_weights(ours)
    for path, weight in hf_base_weights(hf, mine_w).items():
        torch.testing.assert_close(mine_w[path], weight, atol=ATOL, rtol=0, msg=path)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("init", EXACT_INITS, ids=str)
@pytest.mark.parametrize("case", WITH_LORA_INITS, ids=str)
def test_start_equals_hf(case, init, model_name):
    if model_name == "gpt2" and init in HF_WRONG_ON_CONV1D:
        pytest.skip("HF's factors are transposed on Conv1D; test_start_keeps_the_model covers peftlab's")
    if (case.name, init) in REFUSED:
        pytest.skip("refused: test_mica_refusals")
    # s = 1 (alpha / r, or alpha / √r for rsLoRA): there LoftQ's start is HF's (see loftq.py)
    hf, ours = build_pair(case, model_name, init, lora_alpha=2 if case.hf_fields.get("use_rslora") else 4)
    assert_same_start(hf, ours)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_start_keeps_the_model(init, model_name):
    """The base-rewriting inits start exactly where the model was: W_res + s·BA = W, and the same logits."""
    build, targets = MODELS[model_name]
    base = build()
    batch = tiny_batch(base)
    expected = base(**batch).logits
    before = {path: m.weight.detach().clone() for path, m in base.named_modules() if hasattr(m, "weight")}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    for path, layer in model.adapted_layers():
        adapter = layer.adapters["default"]
        w = before[path].T if layer.view.fan_in_fan_out else before[path]
        torch.testing.assert_close(layer.view.weight() + adapter.delta_weight(layer.view), w, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(**batch).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_bfloat16_base_equals_hf(init):
    """On a bfloat16 model the decomposition runs in float32 and the residual is rounded once to bfloat16, as HF.
    HF then rounds A and B to bfloat16 too (it casts the adapter to the base's dtype before upcasting it), so
    its start is off by that rounding; peftlab keeps them in float32, and HF's are peftlab's rounded."""
    base = tiny_llama(hidden=64).to(torch.bfloat16)
    options = dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], init_lora_weights=init, **_extra(init))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options), autocast_adapter_dtype=True)
        torch.manual_seed(SEED)
        ours = get_peft_model(copy.deepcopy(base), LoraConfig(**options))
    theirs = peft.get_peft_model_state_dict(hf)
    for key, value in ours.adapter_state_dict("default").items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.to(torch.bfloat16).float(), theirs[key].float(), atol=0, rtol=0, msg=key)
    mine_w = base_weights(ours)
    for path, weight in hf_base_weights(hf, mine_w).items():
        torch.testing.assert_close(mine_w[path], weight, atol=0, rtol=0, msg=path)
        assert ours.get_submodule(path).base_layer.weight.dtype == torch.bfloat16


def test_pissa_takes_the_principal_part():
    """A and B span W's top-r singular directions; the residual holds the rest of the spectrum."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], init_lora_weights="pissa"))
    path, layer = next(model.adapted_layers())
    w = layer.view.weight() + layer.adapters["default"].delta_weight(layer.view)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(layer.view.weight())[:12], s[4:], atol=1e-5, rtol=0)


def test_olora_b_starts_orthonormal():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_fc"], init_lora_weights="olora"))
    for _, layer in model.adapted_layers():
        b = layer.adapters["default"].lora_B
        assert b.shape == (layer.view.out_features, 4)
        torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)


def test_loftq_follows_the_paper_at_any_scale():
    """HF sets B A = L R whatever s; peftlab sets s·B A = L R (the paper's start deq(Q) + L R)."""
    hf, ours = build_pair(MethodCase("lora", lambda *_: 0), "llama", "loftq", lora_alpha=16)  # s = 4
    theirs = peft.get_peft_model_state_dict(hf)
    for path, layer in ours.adapted_layers():
        adapter = layer.adapters["default"]
        hf_product = theirs[f"base_model.model.{path}.lora_B.weight"] @ theirs[f"base_model.model.{path}.lora_A.weight"]
        torch.testing.assert_close(adapter.delta_weight(layer.view), hf_product, atol=ATOL, rtol=0)
    mine_w = base_weights(ours)
    for path, weight in hf_base_weights(hf, mine_w).items():
        torch.testing.assert_close(mine_w[path], weight, atol=0, rtol=0)


def test_loftq_on_conv1d_decomposes_the_out_in_view():
    """On GPT-2, peftlab's LoftQ equals HF's algorithm run on each layer's [out, in] weight."""
    base = tiny_gpt2(hidden=64)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_fc"], init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=2)))
    oracle = _hf_loftq_on_cpu()
    for path, layer in model.adapted_layers():
        qweight, a, b = oracle(base.get_submodule(path).weight.T.contiguous(), num_bits=4, reduced_rank=4, num_iter=2)
        adapter = layer.adapters["default"]
        torch.testing.assert_close(adapter.lora_A.data, a, atol=ATOL, rtol=0)
        torch.testing.assert_close(adapter.lora_B.data, b, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.view.weight(), qweight, atol=0, rtol=0)


def test_loftq_base_quantizes_to_bitsandbytes_bytes():
    """The LoftQ base stored in 4 bits (quantize_model, no double quantization) holds exactly the codes
    bitsandbytes gives HF's LoftQ weight, and dequantises to it unchanged."""
    import bitsandbytes as bnb

    from peftlab.quant import quantize_model

    hf, ours = build_pair(MethodCase("lora", lambda *_: 0), "llama", "loftq", lora_alpha=4)
    before = base_weights(ours)
    quantize_model(ours.base_model, double_quant=False)
    for path, layer in ours.adapted_layers():
        assert isinstance(layer.base_layer, Linear4bit)
        torch.testing.assert_close(layer.view.weight(torch.float32), before[path], atol=0, rtol=0)
        hf_weight = hf.base_model.model.get_submodule(path).get_base_layer().weight.data
        packed = bnb.nn.Params4bit(hf_weight, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        assert torch.equal(layer.base_layer.packed, packed.data)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_dora_magnitude_is_the_started_weights_norm(init):
    hf, ours = build_pair(MethodCase("dora", lambda *_: 0, hf_fields={"use_dora": True}), "llama", init, lora_alpha=4)
    assert_same_start(hf, ours)  # includes lora_magnitude_vector


def test_every_registered_init_is_tested():
    """A new init in lora_init/ joins the HF comparison here (or says why it cannot)."""
    tested = {"pissa" if isinstance(v, str) and v.startswith("pissa") else v for v in EXACT_INITS} | {"eva", "corda"}  # test_lora_init_eva.py, test_lora_init_corda.py
    assert {init.key for init in INITS.values()} == tested


def test_olora_on_a_4bit_base_requantizes_the_residual():
    """As HF on a bitsandbytes base: QR of the dequantised weight, the residual re-quantized with the layer's settings."""
    from peftlab.quant import quantize_model
    from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4

    base = quantize_model(tiny_llama())
    before = {path: m.dequantize(torch.float32) for path, m in base.named_modules() if isinstance(m, Linear4bit)}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="olora"))
    for path, layer in model.adapted_layers():
        q, r = torch.linalg.qr(before[path])
        adapter = layer.adapters["default"]
        torch.testing.assert_close(adapter.lora_B.data, q[:, :4], atol=ATOL, rtol=0)
        torch.testing.assert_close(adapter.lora_A.data, r[:4], atol=ATOL, rtol=0)
        residual = before[path] - adapter.delta_weight(layer.view)
        expected = dequantize_nf4(quantize_nf4(residual, blocksize=64, double_quant=True), torch.float32)
        assert torch.equal(layer.view.weight(torch.float32), expected)


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal"])
def test_random_starts_on_a_4bit_base_equal_hfs(init):
    """The random starts do not read the weight: on peftlab's NF4 base they are HF's (same seed, same draws)."""
    from peftlab.quant import quantize_model

    base = tiny_llama(hidden=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init))
    torch.manual_seed(SEED)
    ours = get_peft_model(quantize_model(copy.deepcopy(base)), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init))
    theirs = peft.get_peft_model_state_dict(hf)
    for key, value in ours.adapter_state_dict("default").items():
        torch.testing.assert_close(value, theirs[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_embedding_starts_equal_hfs(init):
    """HF's Embedding convention and draws: randn A and B, then (True) A = 0 and B ~ N(0, 1) again."""
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(SEED)
        hf = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=init))
    torch.manual_seed(SEED)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=init))
    theirs = peft.get_peft_model_state_dict(hf)
    for key, value in ours.adapter_state_dict("default").items():
        torch.testing.assert_close(value, theirs[key], atol=0, rtol=0, msg=key)


def test_mica_trains_a_only_from_zero():
    model = get_peft_model(tiny_llama(hidden=64), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="mica"))
    for path, layer in model.adapted_layers():
        adapter = layer.adapters["default"]
        assert not adapter.lora_A.any() and adapter.lora_A.requires_grad and not adapter.lora_B.requires_grad
        u = torch.linalg.svd(layer.view.weight(), full_matrices=False)[0]
        torch.testing.assert_close(adapter.lora_B.data, u[:, -4:], atol=ATOL, rtol=0)


def test_mica_refusals():
    with pytest.raises(ValueError, match="mica.*use_dora=True is not supported"):
        LoraConfig(init_lora_weights="mica", use_dora=True)
    with pytest.raises(ValueError, match="lora_fa.*does not run init_lora_weights='mica'"):
        get_peft_model(tiny_llama(), make_method_config("lora_fa", r=4, target_modules=["q_proj"], init_lora_weights="mica"))


# -- bad input ------------------------------------------------------------------------------------


def test_unknown_init_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"init_lora_weights='pisa'.*True, False, 'corda', 'eva', 'gaussian', 'loftq', 'mica', 'olora', 'orthogonal', 'pissa', 'pissa_niter_N'"):
        LoraConfig(init_lora_weights="pisa")


@pytest.mark.parametrize("value", ["pissa_niter_0", "pissa_niter_", "pissa_niter_x", "pissa_fast"])
def test_pissa_niter_must_be_a_positive_count(value):
    with pytest.raises(ValueError, match="pissa_niter_4"):
        LoraConfig(init_lora_weights=value)


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(ValueError, match="even rank.*r=3"):
        LoraConfig(r=3, init_lora_weights="orthogonal")


def test_loftq_needs_a_config_that_applies():
    with pytest.raises(ValueError, match="needs loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits=8 cannot apply.*4-bit NF4"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=8))
    with pytest.raises(ValueError, match="loftq_iter must be.*>= 1, got 0"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_iter": 0})
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        assert LoraConfig(loftq_config=LoftQConfig()).loftq_config == {}  # HF drops it too


def test_loftq_on_a_4bit_base_asks_for_the_full_precision_one():
    from peftlab.methods import UnsupportedBaseError
    from peftlab.quant import quantize_model

    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig())
    with pytest.raises(UnsupportedBaseError, match="loftq.*needs it in full precision.*quantize_model"):
        get_peft_model(quantize_model(tiny_llama()), config)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_pissa_refuses_a_4bit_base(init):
    from peftlab.methods import UnsupportedBaseError
    from peftlab.quant import quantize_model

    with pytest.raises(UnsupportedBaseError, match="4-bit.*full-precision model"):
        get_peft_model(quantize_model(tiny_llama()), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))


def test_base_rewriting_inits_refuse_embeddings():
    from peftlab.methods import UnsupportedBaseError

    with pytest.raises(UnsupportedBaseError, match="Embedding layer.*embed_tokens"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights="olora"))


@pytest.mark.parametrize("name", ["vera", "mora", "adalora", "dylora", "dora_rank"])
def test_methods_without_lora_inits_refuse_them(name):
    from method_table import METHOD_CASES

    case = METHOD_CASES[name]
    with pytest.raises((TypeError, ValueError), match="init_lora_weights"):
        get_peft_model(tiny_llama(), case.config(4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_delta_lora_refuses_base_rewriting_inits():
    from peftlab.methods.delta_lora import DeltaLoraConfig

    config = DeltaLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(ValueError, match="delta_lora.*does not run init_lora_weights='pissa'"):
        get_peft_model(tiny_llama(), config)
