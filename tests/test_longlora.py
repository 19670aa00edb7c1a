"""LongLoRA (``methods/longlora.py``): S²-Attn in training with one group equals full attention; the
RoPE scale is saved and restored (logits equal after reload, unlike the unscaled model); tied
embeddings stay tied through training, save/load and merge; only LoRA, embeddings and norms train;
delete_adapter gives the original model back; HF peft loads the adapter on a RoPE-scaled base; bad
input is refused. Padded vs unpadded rows under S²-Attn: ``test_s2_attention.py``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert_seq_cls, tiny_gpt2, tiny_llama
from train_fixtures import llama_dir, prompt_dir  # noqa: F401
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.methods import make_method_config
from peftlab.methods.longlora import LongLoraConfig
from peftlab.modules_to_save import TrainedCopy

IDS = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))


def longlora(base=None, **fields) -> PeftModel:
    if "target_length" not in fields:
        fields.setdefault("rope_scale", 1.0)  # the model's own length, said explicitly as LongLoRA asks
    return get_peft_model(base if base is not None else tiny_llama(hidden=32), LongLoraConfig(task_type="CAUSAL_LM", **fields))


def perturbed(model: PeftModel, seed: int = 0) -> PeftModel:
    """Every trainable tensor moved off its init, so the adapter, embeddings and norms all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_ratio_one_is_full_attention_and_eval_is_full_attention():
    model = perturbed(longlora(s2_group_size_ratio=1.0))
    full = logits(model.eval())
    assert (logits(model.train()) - full).abs().max() <= 1e-6
    sparse = perturbed(longlora(s2_group_size_ratio=0.25))
    assert (logits(sparse.train()) - logits(sparse.eval())).abs().max() > 1e-4  # training: groups of L/4


@pytest.mark.parametrize("build", [
    lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)),
    lambda: MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                             max_position_embeddings=32)),
], ids=["qwen2", "mistral"])
def test_qwen2_and_mistral_ratio_one_is_full_attention(build):
    torch.manual_seed(0)
    model = perturbed(longlora(build().eval(), s2_group_size_ratio=1.0, rope_scale=2.0))
    assert (logits(model.train()) - logits(model.eval())).abs().max() <= 1e-6
    sparse = perturbed(longlora(build().eval(), rope_scale=2.0))
    assert (logits(sparse.train()) - logits(sparse.eval())).abs().max() > 1e-4


@pytest.mark.parametrize("length", [6, 10])
def test_a_row_computes_the_same_in_any_batch(length):
    """G is fixed (1/4 of the 32-token context: 8), so a row alone (6 tokens: within one group; 10: two) and
    padded to 24 beside a longer row (3 groups) computes the same for its real tokens, as it does when a batch
    is split across processes."""
    model = perturbed(longlora()).train()
    short = IDS[0, :length]
    batch = torch.stack([torch.nn.functional.pad(short, (0, 24 - length)), IDS[1]])
    mask = torch.tensor([[1] * length + [0] * (24 - length), [1] * 24])
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone = model(input_ids=short[None]).logits
    assert (together[0, :length] - alone[0]).abs().max() <= 1e-5
    assert (together[1] - logits(model, IDS[1:])[0]).abs().max() <= 1e-5
    # The shifted heads split even a short row at G/2: not full attention.
    assert (alone - logits(model.eval(), short[None])).abs().max() > 1e-4


def test_rope_scale_is_saved_and_restored(tmp_path):
    model = perturbed(longlora(rope_scale=2.0)).eval()
    assert model.config.max_position_embeddings == 64 and model.config.rope_parameters["factor"] == 2.0
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["rope_scale"] == 2.0 and saved["s2_group_size_ratio"] == 0.25
    assert saved["modules_to_save"] == ["embed_tokens", "norm"]
    loaded = PeftModel.from_pretrained(tiny_llama(hidden=32), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], LongLoraConfig)
    assert (logits(loaded) - logits(model)).abs().max() == 0
    # The same weights without the scale compute something else: the scale is what was restored.
    unscaled = longlora(rope_scale=1.0)
    unscaled.load_adapter_tensors(load_file(tmp_path / "adapter_model.safetensors"), "default", "test")
    assert (logits(unscaled.eval()) - logits(model)).abs().max() > 1e-3


def test_target_length_sets_the_scale_from_the_models_positions(tmp_path):
    model = longlora(target_length=96)  # the tiny model has 32 positions
    assert model.config.max_position_embeddings == 96 and model.config.rope_parameters["factor"] == 3.0
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rope_scale"] == 3.0 and "target_length" not in saved


def tie_holds(model: PeftModel) -> bool:
    base = model.base_model
    return base.lm_head.weight is base.model.embed_tokens.weight


def test_tied_embeddings_stay_tied_through_training_save_load_and_merge(tmp_path):
    model = longlora(tiny_llama(hidden=32, tied=True), rope_scale=2.0)
    assert isinstance(model.base_model.lm_head, TrainedCopy) and tie_holds(model)
    perturbed(model).eval()
    original = model.base_model.lm_head.original_module.weight
    assert original is model.base_model.model.embed_tokens.original_module.weight  # the base stays tied too
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    embedding, head = saved["base_model.model.model.embed_tokens.weight"], saved["base_model.model.lm_head.weight"]
    assert torch.equal(embedding, head) and not torch.equal(embedding, original)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ensure_weight_tying"] is True

    loaded = PeftModel.from_pretrained(tiny_llama(hidden=32, tied=True), tmp_path).eval()
    assert tie_holds(loaded) and (logits(loaded) - logits(model)).abs().max() == 0

    merged_dir = tmp_path / "merged"
    merged = loaded.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and merged.config._attn_implementation != "peftlab_s2"
    merged.save_pretrained(merged_dir)
    reloaded = LlamaForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers: tied and RoPE-scaled
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.config.rope_parameters["rope_type"] == "linear" and reloaded.config.rope_parameters["factor"] == 2.0
    assert (logits(reloaded) - logits(model)).abs().max() <= 1e-5


def test_a_file_whose_tied_tensors_differ_is_refused(tmp_path):
    model = perturbed(longlora(tiny_llama(hidden=32, tied=True)))
    tensors = model.adapter_state_dict("default")
    tensors = {k: v.detach().clone() for k, v in tensors.items()}
    tensors["base_model.model.lm_head.weight"] += 1
    with pytest.raises(ValueError, match="are one tied tensor in this model but differ in the file"):
        model.load_adapter_tensors(tensors, "default", "test file")


def test_training_moves_only_lora_embeddings_and_norms():
    model = longlora(tiny_llama(hidden=32, tied=True), rope_scale=2.0).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert changed == trained
    kinds = {("lora_B" if "lora_B" in n else "lora_A" if "lora_A" in n else n.split(".copies.")[0].rsplit(".", 1)[-1])
             for n in changed}
    assert kinds == {"lora_A", "lora_B", "embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"}
    assert all(any(p in n for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed if "lora_" in n)


def test_delete_adapter_gives_back_the_original_model():
    base = tiny_llama(hidden=32, tied=True)
    expected, attention = logits(base), base.config._attn_implementation
    model = perturbed(longlora(base, rope_scale=4.0))
    with model.disable_adapter():  # the base weights, still with the extended RoPE (the model's, not a layer's)
        assert (logits(model.eval()) - expected).abs().max() > 1e-4
    model.delete_adapter("default")
    assert base.config.max_position_embeddings == 32 and base.config.rope_parameters["rope_type"] == "default"
    assert base.config._attn_implementation == attention
    assert (logits(base.eval()) - expected).abs().max() == 0


def test_hf_peft_loads_the_adapter_on_a_base_with_the_rope_scale(tmp_path):
    peft = pytest.importorskip("peft")
    tiny_llama(hidden=32, tied=True).save_pretrained(tmp_path / "base")
    model = perturbed(longlora(LlamaForCausalLM.from_pretrained(tmp_path / "base"), rope_scale=2.0)).eval()
    model.save_pretrained(tmp_path / "adapter")
    # What an HF user does (README): load the base with the RoPE scale, then the adapter.
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", rope_parameters=rope)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    messages = " ".join(str(w.message) for w in caught)
    assert "rope_scale" in messages and "missing adapter keys" not in messages
    assert (logits(hf) - logits(model)).abs().max() <= 1e-5


def test_unsupported_models_and_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="has none. It runs on RoPE decoders: llama"):
        longlora(tiny_gpt2())
    with pytest.raises(ValueError, match="has none. It runs on RoPE decoders"):
        get_peft_model(tiny_bert_seq_cls(), LongLoraConfig(target_modules=["query"]))
    from transformers import GemmaConfig, GemmaForCausalLM

    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="supported on model types llama .*'gemma'"):
        longlora(gemma, target_modules=["q_proj"])
    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=16))
    with pytest.raises(ValueError, match="sliding-window attention"):
        longlora(mistral)
    dynamic = tiny_llama()
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="RoPE is of type 'dynamic'"):
        longlora(dynamic)
    with pytest.raises(ValueError, match="rope_scale must be a number >= 1"):
        LongLoraConfig(rope_scale=0.5)
    with pytest.raises(ValueError, match="not both"):
        LongLoraConfig(rope_scale=2.0, target_length=64)
    with pytest.raises(ValueError, match=r"s2_group_size_ratio must be in \(0, 1\]"):
        LongLoraConfig(s2_group_size_ratio=0)
    with pytest.raises(ValueError, match="target_length 16 is below the model's 32 positions"):
        longlora(target_length=16)
    model = longlora(rope_scale=2.0)
    with pytest.raises(ValueError, match="takes one LongLoRA adapter"):
        model.add_adapter("second", LongLoraConfig(rope_scale=2.0))
    assert model.config.rope_parameters["factor"] == 2.0 and "second" not in model.peft_config  # nothing half-done
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a LongLoraConfig adapter .* 'rope_scale'"):
        PeftModel.from_pretrained(tiny_llama(hidden=32), tmp_path, config=LoraConfig(target_modules=["q_proj"]))


def test_plain_lora_export_is_refused_since_it_would_drop_the_rope_scale(tmp_path):
    from peftlab.export import ExportError

    with pytest.raises(ExportError, match="plain LoRA files already, plus 'rope_scale'"):
        longlora(rope_scale=2.0).save_pretrained(tmp_path, as_lora=True)
    assert not any(tmp_path.iterdir())


def test_registered_options_reach_the_config():
    config = make_method_config("longlora", rope_scale=2.0, s2_group_size_ratio=0.5)
    assert isinstance(config, LongLoraConfig) and config.lora_alpha == 16 and config.ensure_weight_tying


def test_cli_train_eval_merge_with_an_extended_context(llama_dir, prompt_dir, tmp_path, capsys):
    from test_cli import run_cli

    adapter = tmp_path / "adapter"
    flags = ["--model", str(llama_dir), "--task", "causal-lm", "--dataset", str(prompt_dir), "--batch-size", "8"]
    # 48 tokens: beyond the tiny model's 32 positions, within the 64 that --rope-scale 2 gives.
    code, out, _ = run_cli(capsys, "train", *flags, "--method", "longlora", "--rope-scale", "2", "--max-length", "48",
                           "--out", str(adapter), "--max-steps", "2", "--lr", "1e-2")
    assert code == 0
    trained = json.loads(out)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["rope_scale"] == 2.0 and saved["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    code, out, _ = run_cli(capsys, "eval", "--adapter", str(adapter), "--dataset", str(prompt_dir), "--max-length", "48")
    assert code == 0 and json.loads(out)["eval_perplexity"] == pytest.approx(trained["eval_perplexity"], rel=1e-5)

    merged_dir = tmp_path / "merged"
    assert run_cli(capsys, "merge", "--adapter", str(adapter), "--out", str(merged_dir))[0] == 0
    merged = LlamaForCausalLM.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), adapter).eval()
    ids = IDS[:, :20] % merged.config.vocab_size
    assert merged.config.max_position_embeddings == 64 and (logits(merged, ids) - logits(adapted, ids)).abs().max() <= 1e-5

    code, _, err = run_cli(capsys, "train", *flags, "--method", "longlora", "--rope-scale", "2", "--max-length", "80",
                           "--out", str(tmp_path / "long"))
    assert code == 2 and "above the model's limit of 64 positions" in err
    code, _, err = run_cli(capsys, "train", *flags, "--method", "longlora", "--rope-scale", "0.5", "--out", str(tmp_path / "x"))
    assert code == 2 and "rope_scale must be >= 1, got 0.5" in err
    code, _, err = run_cli(capsys, "train", *flags, "--method", "lora", "--rope-scale", "2", "--out", str(tmp_path / "y"))
    assert code == 2 and "has no option 'rope_scale'" in err
