"""Export to plain LoRA (``save_pretrained(as_lora=True)``): every method's adapter loads in HF peft
as an ordinary LoRA adapter, with no warning, and gives the same logits where its update is low
rank; where it is not (DoRA), the reported error is the one measured on the loaded weights.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

from method_table import METHOD_TABLE, MethodCase
from peftlab import LoraConfig, get_peft_model
from peftlab.export import SERVING_MAX_RANKS, ExportError, LossyExportWarning, build_lora_export
from peftlab.methods import Method, register_method, unregister_method
from peftlab.adapter import Adapter
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_bert_seq_cls, tiny_gpt2, tiny_llama

ATOL = 1e-5
MODELS = {
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")),
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")),
    "bert": (tiny_bert_seq_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def trained(case: MethodCase, model_name: str, rank: int = 4, **fields):
    build, options = MODELS[model_name]
    model = get_peft_model(build(), case.config(rank, **copy.deepcopy(options), **fields)).eval()
    perturb(model)
    return model


def is_low_rank(model) -> bool:
    return all(f is not None for f in model.method_of("default").as_low_rank(model, "default").values())


def load_in_hf(base_builder, directory):
    """HF peft loads the folder as plain LoRA; any warning about it (missing keys, unknown fields) fails.
    Deprecation notices between HF libraries (peft calling a renamed transformers API) are not about the file."""
    base = base_builder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    assert [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))] == []
    assert isinstance(model.peft_config["default"], peft.LoraConfig)
    return model


def assert_plain_lora_files(directory, rank: int) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == rank and config["lora_alpha"] == rank
    assert config["bias"] == "none" and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert not config["use_dora"] and not config["use_rslora"]
    for key, tensor in load_file(directory / "adapter_model.safetensors").items():
        copies = tuple(f".{name}." for name in config["modules_to_save"] or [])  # a SEQ_CLS head, as HF saves it
        assert key.endswith(("lora_A.weight", "lora_B.weight")) or any(c in key for c in copies), key
        if key.endswith("lora_A.weight"):
            assert tensor.shape[0] == rank
        if key.endswith("lora_B.weight"):
            assert tensor.shape[1] == rank


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("case", METHOD_TABLE, ids=str)
def test_every_method_exports_as_plain_lora_that_hf_peft_loads(tmp_path, case, model_name):
    model = trained(case, model_name)
    build = MODELS[model_name][0]
    batch = tiny_batch(model)
    expected = logits(model, batch)
    assert max_diff(expected, logits(build(), batch)) > 1e-3  # the adapter changes the output
    if is_low_rank(model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an exact export warns of nothing
            model.save_pretrained(tmp_path, as_lora=True)
        rank = max(f[0].shape[0] for f in model.method_of("default").as_low_rank(model, "default").values())
        assert_plain_lora_files(tmp_path, rank)
        assert "exact" in (tmp_path / "README.md").read_text()
        assert max_diff(logits(load_in_hf(build, tmp_path), batch), expected) <= ATOL
        return
    # Not low rank: a truncated SVD, and the error it reports is the one measured on what HF loaded.
    with pytest.warns(LossyExportWarning, match="truncated SVD") as caught:
        model.save_pretrained(tmp_path, as_lora=True, rank=2)
    assert_plain_lora_files(tmp_path, 2)
    loaded = load_in_hf(build, tmp_path)
    report = build_lora_export(model, rank=2).errors
    measured = {}
    for path, layer in model.adapted_layers():
        delta = layer.adapters["default"].delta_weight(layer.view).detach().float()
        theirs = loaded.base_model.model.get_submodule(path).get_delta_weight("default").float()
        theirs = theirs.T if layer.view.__class__.__name__ == "Conv1DView" else theirs
        measured[path] = ((delta - theirs).norm() / delta.norm()).item()
    assert set(report) == set(measured)
    for path, error in measured.items():
        assert report[path].relative == pytest.approx(error, rel=1e-4, abs=1e-6)
    worst = max(measured.values())
    assert f"{worst:.4g}" in str(caught[0].message) and f"{worst:.4g}" in (tmp_path / "README.md").read_text()
    # At full rank the SVD is exact: the same files give the adapter's logits.
    full = max(min(layer.view.in_features, layer.view.out_features) for _, layer in model.adapted_layers())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyExportWarning)
        model.save_pretrained(tmp_path / "full", as_lora=True, rank=full)
    assert max_diff(logits(load_in_hf(build, tmp_path / "full"), batch), expected) <= 1e-4


def test_per_module_ranks_and_scales_become_one_r_and_alpha(tmp_path):
    """rank_pattern/alpha_pattern/rsLoRA: smaller ranks zero-padded, every scale folded into B."""
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
        rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"down_proj": 5},
    )
    model = get_peft_model(tiny_llama(), config).eval()
    perturb(model)
    batch = tiny_batch(model)
    model.save_pretrained(tmp_path, as_lora=True)
    assert_plain_lora_files(tmp_path, 6)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    a = saved["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
    assert a[2:].abs().max() == 0  # rank 2 padded with zero rows to 6
    assert max_diff(logits(load_in_hf(tiny_llama, tmp_path), batch), logits(model, batch)) <= ATOL


def test_embedding_adapter_exports_with_hf_embedding_keys(tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=3, lora_alpha=5, target_modules=["wte", "c_attn"])).eval()
    perturb(model)
    batch = tiny_batch(model)
    model.save_pretrained(tmp_path, as_lora=True)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("lora_embedding_" in k for k in keys) == 2
    assert max_diff(logits(load_in_hf(tiny_gpt2, tmp_path), batch), logits(model, batch)) <= ATOL


def test_export_below_the_adapter_rank_is_the_best_approximation(tmp_path):
    """LoRA r=4 exported at 2: lossy, and the error is the Eckart-Young bound of each ΔW."""
    model = trained(MethodCase("lora", lambda *_: 0), "llama")
    with pytest.warns(LossyExportWarning):
        model.save_pretrained(tmp_path, as_lora=True, rank=2)
    export = build_lora_export(model, rank=2)
    for path, layer in model.adapted_layers():
        s = torch.linalg.svdvals(layer.adapters["default"].delta_weight(layer.view).detach())
        assert export.errors[path].relative == pytest.approx((s[2:].norm() / s.norm()).item(), rel=1e-4)


def test_max_rank_of_a_serving_engine(tmp_path):
    model = trained(MethodCase("lora", lambda *_: 0), "llama", rank=4)
    build_lora_export(model, max_rank=8)  # within vLLM's limit: written as is
    with pytest.raises(ExportError, match=r"max_rank 12 is not a rank limit .*8, 16, 32"):
        model.save_pretrained(tmp_path, as_lora=True, max_rank=12)
    big = trained(MethodCase("lora", lambda *_: 0), "llama", rank=10)
    with pytest.raises(ExportError, match=r"rank 10, above the serving limit max_rank 8: give --rank 8"):
        big.save_pretrained(tmp_path, as_lora=True, max_rank=8)
    with pytest.warns(LossyExportWarning):
        big.save_pretrained(tmp_path, as_lora=True, rank=8, max_rank=8)
    assert_plain_lora_files(tmp_path, 8)
    assert 8 in SERVING_MAX_RANKS and 12 not in SERVING_MAX_RANKS


def test_bad_export_ranks_are_refused_and_nothing_is_written(tmp_path):
    lora = trained(MethodCase("lora", lambda *_: 0), "llama", rank=4)
    with pytest.raises(ExportError, match=r"export rank 5 is above the lora adapter's rank 4"):
        lora.save_pretrained(tmp_path, as_lora=True, rank=5)
    with pytest.raises(ExportError, match="positive integer"):
        lora.save_pretrained(tmp_path, as_lora=True, rank=0)
    dora = trained(MethodCase("dora", lambda *_: 0), "llama")
    with pytest.raises(ExportError, match=r"dora adapter's update is not low rank .* give a rank"):
        dora.save_pretrained(tmp_path, as_lora=True)
    with pytest.raises(ValueError, match=r"as_lora=True\) only"):
        lora.save_pretrained(tmp_path, rank=2)
    assert list(tmp_path.iterdir()) == []


class _GateAdapter(Adapter):
    """Scales the layer's output: no weight update exists, so no LoRA can express it."""

    def __init__(self, view):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.ones(view.out_features))

    def forward(self, x, base_out, base):
        return base_out * self.gate

    def saved_tensors(self):
        return {"gate": self.gate}


class _GateMethod(Method):
    config_class = type("GateConfig", (LoraConfig,), {"peft_type": "TEST_GATE"})

    def make_adapter(self, config, view, path, state):
        return _GateAdapter(view)


def test_a_method_with_no_weight_update_cannot_be_exported(tmp_path):
    register_method(_GateMethod("test_gate"))
    try:
        model = get_peft_model(tiny_llama(), _GateMethod.config_class(target_modules=["q_proj"]))
        with pytest.raises(ExportError, match=r"test_gate adapter cannot be exported as LoRA: its _GateAdapter at "
                                              r"model.layers.0.self_attn.q_proj .* no weight update"):
            model.save_pretrained(tmp_path, as_lora=True, rank=2)
    finally:
        unregister_method("test_gate")
