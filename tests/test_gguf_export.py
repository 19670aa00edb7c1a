"""GGUF export: names, RoPE row order, metadata and file round trips, refusals (everywhere); and
parity in llama.cpp itself on tiny Llama / Qwen2 / Mistral models (where ``llama_cpp`` is installed)."""

from __future__ import annotations

import copy
import re

import gguf
import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
    Qwen2ForCausalLM,
)

from peftlab import get_peft_model
from peftlab.gguf_export import GGUFExportError, ParityError, UnsupportedArchitectureError, export_gguf, exporter
from peftlab.gguf_export.base_check import check_base_gguf
from peftlab.gguf_export.names import gguf_architecture, gguf_tensor_name, rope_row_order
from peftlab.gguf_export.writer import lora_tensors, model_tensors, write_lora_gguf, write_model_gguf
from peftlab.gguf_export.metadata import add_tokenizer_keys
from peftlab.methods.lora import LoraConfig
from peftlab.output_folder import OutputFolderError
from tiny_models import perturb, tiny_gpt2

HIDDEN = 64  # head_dim 32: a whole q8_0 block per row, and RoPE pairs to reorder
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.", "the quick brown fox", "O Romeo"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's kind, which llama.cpp reads as "gpt2"), trained on a few sentences."""
    backend = ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog", "what is the capital of france", "write a haiku about leaves"] * 5
    backend.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_decoder(kind: str, vocab: int, seed: int = 0, tied: bool = True):
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=tied,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                                 "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    torch.manual_seed(seed)
    model = model_class(config_class(**common)).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a misplaced one shows
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def adapted(kind: str, tokenizer, config=None, seed: int = 0):
    model = get_peft_model(tiny_decoder(kind, len(tokenizer), seed), config or LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb(model)
    return model


# -- names and the RoPE row order -------------------------------------------------------------------


@pytest.mark.parametrize("kind,arch", [("llama", gguf.MODEL_ARCH.LLAMA), ("qwen2", gguf.MODEL_ARCH.QWEN2)])
def test_names_agree_with_gguf_packages_map(kind, arch, tokenizer):
    """Our table against llama.cpp's own (gguf-py's TensorNameMap), for every tensor of the model."""
    model = tiny_decoder(kind, len(tokenizer), tied=False)
    oracle = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    for name in model.state_dict():
        assert gguf_tensor_name(name) == oracle.get_name(name, try_suffixes=(".weight", ".bias")), name


def test_architectures_and_refusal():
    assert gguf_architecture(tiny_decoder("mistral", 300).config) == "llama"  # llama.cpp runs Mistral as llama
    assert gguf_architecture(tiny_decoder("qwen2", 300).config) == "qwen2"
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        gguf_architecture(tiny_gpt2().config)


def _rope_hf(x, theta):  # transformers: dimension i with i + d/2 (rotate_half)
    half = x.shape[-1] // 2
    cos, sin = torch.cos(theta).repeat(2), torch.sin(theta).repeat(2)
    rotated = torch.cat([-x[half:], x[:half]])
    return x * cos + rotated * sin


def _rope_interleaved(x, theta):  # llama.cpp's "normal" RoPE: dimensions 2i and 2i+1
    even, odd = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2] = even * torch.cos(theta) - odd * torch.sin(theta)
    out[1::2] = even * torch.sin(theta) + odd * torch.cos(theta)
    return out


def test_rope_row_order_turns_transformers_rope_into_llama_cpps():
    """Reordered q (or k) rows under llama.cpp's RoPE give transformers' RoPE output, reordered the same way."""
    heads, head_dim = 3, 8
    order = rope_row_order(heads, head_dim)
    assert sorted(order.tolist()) == list(range(heads * head_dim))
    torch.manual_seed(0)
    q = torch.randn(heads * head_dim)
    theta = 7.0 * 10000 ** (-torch.arange(head_dim // 2) * 2 / head_dim)  # position 7
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        hf = _rope_hf(q[rows], theta)
        mine = _rope_interleaved(q[order][rows], theta)
        assert torch.allclose(mine, hf[order[rows] - h * head_dim], atol=1e-6)


# -- files ------------------------------------------------------------------------------------------


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
               for t in reader.tensors}
    return fields, tensors, {t.name: t.tensor_type for t in reader.tensors}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_lora_gguf_round_trip_gives_the_adapters_update_in_llama_cpps_layout(kind, tokenizer, tmp_path):
    model = adapted(kind, tokenizer)
    factors, _ = exporter._lora_factors(model, "default")
    path = tmp_path / "adapter.gguf"
    write_lora_gguf(path, model.base_model.config, lora_tensors(model.base_model.config, factors), 4, "f32", "t")
    fields, tensors, _ = _read(path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 4.0 and fields["general.architecture"] == gguf_architecture(model.base_model.config)
    permuted = kind != "qwen2"
    for path_, layer in model.adapted_layers():
        name = gguf_tensor_name(f"{path_}.weight")
        delta = torch.from_numpy(tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"])
        expected = layer.adapters["default"].delta_weight(layer.view).detach()
        if permuted and name.split(".")[2] in ("attn_q", "attn_k"):
            heads = 2 if "attn_q" in name else 1
            expected = expected[rope_row_order(heads, HIDDEN // 2)]
        assert torch.allclose(delta, expected, atol=1e-6), name


@pytest.mark.parametrize("dtype,tolerance", [("f32", 0.0), ("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 1e-2)])
def test_model_gguf_metadata_and_tensors(dtype, tolerance, tokenizer, tmp_path):
    model = tiny_decoder("qwen2", len(tokenizer))
    config = model.config
    expected = model_tensors(config, model.state_dict())
    path = tmp_path / "m.gguf"
    write_model_gguf(path, config, expected, dtype, "tiny", lambda w: add_tokenizer_keys(w, tokenizer, config))
    fields, tensors, types = _read(path)
    assert fields["general.architecture"] == "qwen2" and fields["qwen2.block_count"] == 2
    assert fields["qwen2.attention.head_count"] == 2 and fields["qwen2.attention.head_count_kv"] == 1
    assert fields["qwen2.embedding_length"] == HIDDEN and fields["qwen2.feed_forward_length"] == 2 * HIDDEN
    assert fields["qwen2.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        assert types[name] == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else getattr(gguf.GGMLQuantizationType, dtype.upper()))
        relative = np.linalg.norm(tensors[name] - want) / np.linalg.norm(want)
        assert relative <= tolerance, name


def test_longlora_merged_gguf_says_its_linear_rope_scale(tokenizer, tmp_path):
    from peftlab.methods.longlora import LongLoraConfig

    model = get_peft_model(tiny_decoder("llama", len(tokenizer)), LongLoraConfig(r=4, target_modules="all-linear", rope_scale=4.0))
    perturb(model)
    export_gguf(model, tokenizer, tmp_path / "x", mode="merged", verify=False)
    fields, _, _ = _read(tmp_path / "x" / "model.gguf")
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 4.0


def test_base_gguf_of_other_weights_is_refused_and_same_quantized_weights_pass(tokenizer, tmp_path):
    model = tiny_decoder("llama", len(tokenizer))
    config = model.config
    expected = model_tensors(config, model.state_dict())
    keys = lambda w: add_tokenizer_keys(w, tokenizer, config)  # noqa: E731
    same, other = tmp_path / "same.gguf", tmp_path / "other.gguf"
    write_model_gguf(same, config, expected, "q8_0", "same", keys)
    write_model_gguf(other, config, model_tensors(config, tiny_decoder("llama", len(tokenizer), seed=1).state_dict()), "f32", "o", keys)
    match = check_base_gguf(same, gguf.GGUFReader(same), "llama", expected)
    assert 0 < match.worst_error < 1e-2 and match.types == {"F32": 5, "Q8_0": 15}
    with pytest.raises(GGUFExportError, match="other weights than the adapter's base"):
        check_base_gguf(other, gguf.GGUFReader(other), "llama", expected)


# -- refusals ---------------------------------------------------------------------------------------


def test_refusals(tokenizer, tmp_path, monkeypatch):
    lora = adapted("llama", tokenizer)
    with pytest.raises(GGUFExportError, match="quantized type"):
        export_gguf(lora, tokenizer, tmp_path / "a", mode="lora", dtype="q8_0", verify=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OutputFolderError, match="already holds something"):
        export_gguf(lora, tokenizer, tmp_path / "full", verify=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    monkeypatch.setattr(exporter, "llama_cpp_available", lambda: False)
    with pytest.raises(GGUFExportError, match="llama_cpp is not installed"):
        export_gguf(lora, tokenizer, tmp_path / "b", verify=True, prompts=PROMPTS)
    saving = adapted("llama", tokenizer, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["embed_tokens"]))
    with pytest.raises(GGUFExportError, match="modules_to_save.*--mode merged"):
        export_gguf(saving, tokenizer, tmp_path / "c", verify=False)
    dora = adapted("llama", tokenizer, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(GGUFExportError, match="not low rank.*--mode merged"):
        export_gguf(dora, tokenizer, tmp_path / "d", verify=False)
    gpt2 = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(UnsupportedArchitectureError):
        export_gguf(gpt2, tokenizer, tmp_path / "e", verify=False)
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_a_lossy_dtype_is_judged_against_its_rounding_of_the_base_alone():
    """q8_0 rounds SmolLM2-135M's base alone by 0.11 of the largest logit: a fixed 0.1 refused every merged q8_0
    export of it, the untrained base included. The bound grows with the base's own difference; f32 never does."""
    from peftlab.gguf_export.verify import TOLERANCES, Parity, failures

    measured = dict(positions=100, top1_agree=96, effect_relative_diff=0.2, base_max_relative_logit_diff=0.11)
    assert failures(Parity(max_relative_logit_diff=0.184, **measured), TOLERANCES["q8_0"]) == []
    problems = failures(Parity(max_relative_logit_diff=0.4, **measured), TOLERANCES["q8_0"])
    assert problems == ["next-token logits differ by up to 0.4 of the largest logit (tolerance 0.33, 3x the base alone's)"]
    wrong_effect = failures(Parity(max_relative_logit_diff=0.1, **{**measured, "effect_relative_diff": 0.9}), TOLERANCES["q8_0"])
    assert len(wrong_effect) == 1 and wrong_effect[0].startswith("the adapter's effect")  # still refused
    f32 = dict(positions=100, top1_agree=100, base_max_relative_logit_diff=0.05)  # a base that differs at f32: a bug
    assert failures(Parity(max_relative_logit_diff=0.05, **f32), TOLERANCES["f32"]) == [
        "next-token logits differ by up to 0.05 of the largest logit (tolerance 0.001)"]


def test_the_peftlab_reference_runs_on_one_torch_thread(tokenizer):
    """Two spinning torch threads made batch-1 generation ~9x slower on the shared 2-core machine."""
    from peftlab.gguf_export.verify import peftlab_reference

    model = adapted("llama", tokenizer)
    seen = []
    model.base_model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reference = peftlab_reference(model, tokenizer, PROMPTS[:1], new_tokens=3)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)
    assert len(reference.prompts[0].continuation) == 3


# -- in llama.cpp -----------------------------------------------------------------------------------


@pytest.fixture()
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_lora_export_runs_in_llama_cpp_as_in_peftlab(kind, tokenizer, tmp_path, llama_cpp):
    model = adapted(kind, tokenizer)
    result = export_gguf(model, tokenizer, tmp_path / "out", mode="lora", dtype="f32", verify=True, prompts=PROMPTS)
    p = result.parity
    assert p["passed"] and p["top1_agreement"] == 1.0 and p["generations_identical"] == p["generations"] == len(PROMPTS)
    assert p["max_relative_logit_diff"] < 1e-4 and p["effect_relative_diff"] < 1e-3
    assert p["effect_top1_changed_engine"] == p["effect_top1_changed_peftlab"] > 0  # the adapter does something, in both
    assert p["base_top1_agree"] == p["positions"] and p["base_max_relative_logit_diff"] < 1e-4  # the base alone, too
    assert p["tokenization_agree"] == p["tokenization_checked"]
    files = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert files == ["Modelfile", "README.md", "adapter.gguf", "base.gguf", "parity.json"]
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in (tmp_path / "out" / "Modelfile").read_text()


def test_the_engine_runs_on_one_thread(tokenizer, tmp_path, llama_cpp):
    """With two threads llama.cpp ran through torch's OpenMP runtime, started with spinning waits: each
    generated token took ~1.7 s instead of 0.06 s on the shared 2-core machine, and --verify took many minutes."""
    from peftlab.gguf_export.verify import Engine

    export_gguf(adapted("llama", tokenizer), tokenizer, tmp_path / "out", verify=False)
    engine = Engine(tmp_path / "out" / "base.gguf", tmp_path / "out" / "adapter.gguf", n_ctx=32, f32_cache=True)
    try:
        assert engine.llm.context_params.n_threads == engine.llm.context_params.n_threads_batch == 1
    finally:
        engine.close()


def test_merged_dora_and_q8_0_run_in_llama_cpp(tokenizer, tmp_path, llama_cpp):
    dora = adapted("llama", tokenizer, LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                   modules_to_save=["embed_tokens"]))
    p = export_gguf(dora, tokenizer, tmp_path / "f32", mode="merged", dtype="f32", verify=True, prompts=PROMPTS).parity
    assert p["passed"] and p["top1_agreement"] == 1.0 and p["generations_identical"] == p["generations"]
    lora = adapted("llama", tokenizer)
    p = export_gguf(lora, tokenizer, tmp_path / "q8", mode="merged", dtype="q8_0", verify=True, prompts=PROMPTS).parity
    assert p["passed"] and p["tolerance"] == "q8_0" and p["top1_agreement"] > 0.9


def test_an_effect_smaller_than_the_f16_bases_rounding_is_refused_with_its_figures_and_f32_passes(tokenizer, tmp_path, llama_cpp):
    model = adapted("llama", tokenizer)
    with torch.no_grad():  # an adapter that barely moves the model: its effect is of the order of f16 rounding
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(1e-3)
    with pytest.raises(ParityError) as error:
        export_gguf(copy.deepcopy(model), tokenizer, tmp_path / "f16", dtype="f16", verify=True, prompts=PROMPTS)
    message = str(error.value)
    assert re.search(r"the adapter's effect .* differs by [\d.e-]+ of its size in peftlab \(tolerance 0.15; the adapter "
                     r"changes the top-1 token at \d+ of \d+ positions, and the base alone differs by up to [\d.e-]+ of "
                     r"the largest logit in llama.cpp\)", message), message
    assert "can be exported with --dtype f32 instead" in message and not (tmp_path / "f16").exists()
    p = export_gguf(model, tokenizer, tmp_path / "f32", dtype="f32", verify=True, prompts=PROMPTS).parity
    assert p["passed"] and p["effect_relative_diff"] < 1e-2


def test_an_adapter_the_engine_reads_wrongly_fails_and_the_family_is_named(tokenizer, tmp_path, monkeypatch, llama_cpp):
    """B's rows left in transformers' order: q/k get the wrong update in llama.cpp; the check names them."""
    from peftlab.gguf_export import diagnose

    def unpermuted(config, factors):
        return {k: v for path, (a, b) in factors.items()
                for k, v in ((f"{gguf_tensor_name(path + '.weight')}.lora_a", a.float().numpy()),
                             (f"{gguf_tensor_name(path + '.weight')}.lora_b", b.float().numpy()))}

    threads = []
    torch_logits = diagnose._torch_logits
    monkeypatch.setattr(exporter, "lora_tensors", unpermuted)
    monkeypatch.setattr(diagnose, "lora_tensors", unpermuted)
    monkeypatch.setattr(diagnose, "_torch_logits", lambda *a: threads.append(torch.get_num_threads()) or torch_logits(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ParityError, match=r"families that differ: attn_[qk] .*attn_[qk] ") as error:
            export_gguf(adapted("llama", tokenizer), tokenizer, tmp_path / "bad", verify=True, prompts=PROMPTS)
    finally:
        torch.set_num_threads(before)
    assert "ffn" not in str(error.value) and not (tmp_path / "bad").exists()
    assert threads and set(threads) == {1}  # torch beside llama.cpp: one thread, as in the check itself


def test_modelfile_translates_chatml_with_its_default_system_prompt(tokenizer):
    from peftlab.gguf_export.modelfile import CHATML_TEMPLATE, modelfile

    chat = copy.deepcopy(tokenizer)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = modelfile(chat, {"model": "base.gguf", "adapter": "adapter.gguf"})
    assert text.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\n")
    assert f'TEMPLATE """{CHATML_TEMPLATE}"""' in text and 'SYSTEM "Be brief."' in text
    assert 'PARAMETER stop "<|endoftext|>"' in text and 'PARAMETER stop "<|im_end|>"' in text
    plain = modelfile(tokenizer, {"model": "/abs/model.gguf"})
    assert plain.startswith("FROM /abs/model.gguf\n# No TEMPLATE") and "ADAPTER" not in plain


def test_cli_export_to_gguf(tokenizer, tmp_path, capsys, monkeypatch):
    from peftlab.cli import main

    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    model = adapted("llama", tokenizer)
    tiny_decoder("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model.save_pretrained(adapter_dir)
    flags = ["export", "--to", "gguf", "--adapter", str(adapter_dir), "--model", str(model_dir), "--task", "causal-lm"]
    assert main([*flags, "--out", str(tmp_path / "g"), "--no-verify"]) == 0
    assert sorted(f.name for f in (tmp_path / "g").iterdir()) == ["Modelfile", "README.md", "adapter.gguf", "base.gguf"]
    assert main([*flags, "--out", str(tmp_path / "g"), "--no-verify"]) == 2
    assert "already holds something" in capsys.readouterr().err
    monkeypatch.setattr(exporter, "llama_cpp_available", lambda: False)
    assert main([*flags, "--out", str(tmp_path / "h"), "--verify"]) == 2
    assert "llama_cpp is not installed" in capsys.readouterr().err and not (tmp_path / "h").exists()
    assert main(["export", "--to", "lora", "--adapter", str(adapter_dir), "--out", str(tmp_path / "l"), "--dtype", "f16"]) == 2
    assert "--dtype apply to --to gguf" in capsys.readouterr().err
