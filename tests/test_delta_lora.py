"""Delta-LoRA (``methods/delta_lora.py``) against a reference loop that literally rewrites W after each
optimizer step, on dense (Linear, Conv1D) and 4-bit bases; its fused autograd node against plain
autograd; resume in the middle of a run; the saved rank-2r LoRA in HF peft; bad input.

The table's property suites (``method_table.py``) run it too, with the weight moving from step 0.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train_checkpoint import KillAfter, Killed
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_gpt2, tiny_llama
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401
from transformers.pytorch_utils import Conv1D

import peftlab.train.loop as loop_module
from peftlab import LoraConfig, PeftModel, get_peft_model
from peftlab.cli import main
from peftlab.hooks import TrainingProgress
from peftlab.methods.delta_lora import DeltaLoraConfig, DeltaStartHook
from peftlab.quant import dequantize_model, quantize_model
from peftlab.train import run_training
from peftlab.train.checkpoint import load_checkpoint
from peftlab.train.hooks import HookRunner, discover_hooks

MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}
STEPS = 20
LAMBDA, SCALE = 2.0, 8 / 4  # delta_lambda, lora_alpha / r


def delta_config(targets, start: int, **fields) -> DeltaLoraConfig:
    # init_lora_weights=False: B starts random, so the snapshot B_K A_K is never trivially zero.
    return DeltaLoraConfig(r=4, lora_alpha=8, delta_start_step=start, target_modules=targets, init_lora_weights=False, **fields)


def factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {path: (a.lora_A.detach().clone(), a.lora_B.detach().clone()) for path, a in model.adapters_of("default")}


def rewrite_weight(layer, delta: torch.Tensor) -> None:
    """W += delta on the base layer's own storage (Conv1D keeps W transposed)."""
    weight = layer.base_layer.weight
    with torch.no_grad():
        weight.add_(delta.T if isinstance(layer.base_layer, Conv1D) else delta)


def train_both(ours_base, reference_base, targets, start: int, steps: int = STEPS):
    """Delta-LoRA through its hooks, and the reference: LoRA plus W += λs(B'A' − BA) after each step >= K."""
    ours = get_peft_model(ours_base, delta_config(targets, start)).train()
    reference = get_peft_model(reference_base, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).train()
    with torch.no_grad():
        for (_, mine), (_, theirs) in zip(ours.adapters_of("default"), reference.adapters_of("default")):
            theirs.lora_A.copy_(mine.lora_A)
            theirs.lora_B.copy_(mine.lora_B)
    hooks = HookRunner(discover_hooks(ours))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, reference)]
    for step in range(steps):
        progress = TrainingProgress(step, steps, 0.0)
        batch = tiny_batch(ours, seed=100 + step)
        hooks.on_step_begin(progress)
        for model in (ours, reference):
            model(**batch, labels=batch["input_ids"]).loss.backward()
        before = factors(reference)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        hooks.after_optimizer_step(progress)
        if step >= start:
            after = factors(reference)
            for path, layer in reference.adapted_layers():
                (a0, b0), (a1, b1) = before[path], after[path]
                rewrite_weight(layer, LAMBDA * SCALE * (b1 @ a1 - b0 @ a0))
    return ours.eval(), reference.eval()


def stored_weights(model) -> dict[str, torch.Tensor]:
    return {path: layer.view.weight().detach().clone() for path, layer in model.adapted_layers()}


def moved_weights(model) -> dict[str, torch.Tensor]:
    """The weight each Delta-LoRA layer computes with besides its own s·BA: W_0 + λs(BA − B_K A_K)."""
    out = {}
    for path, layer in model.adapted_layers():
        adapter, view = layer.adapters["default"], layer.view
        out[path] = (view.weight() + adapter.delta_weight(view) - adapter.scaling * adapter.lora_B @ adapter.lora_A).detach()
    return out


@pytest.mark.filterwarnings("ignore:Delta-LoRA never moves the weight")
@pytest.mark.parametrize("start", [0, 6, 25])  # 25 > STEPS: the weight never moves
@pytest.mark.parametrize("model_name", list(MODELS))
def test_equals_the_reference_loop_that_rewrites_w(model_name, start):
    build, targets = MODELS[model_name]
    # In float64: AdamW divides by √v + eps, so a gradient entry near eps (GPT-2 has some) turns fp32
    # rounding -- which differs between any two correct orders of the sums -- into lr-sized steps.
    base = build().double()
    original = {n: p.clone() for n, p in base.named_parameters()}
    torch.manual_seed(0)
    ours, reference = train_both(copy.deepcopy(base), copy.deepcopy(base), targets, start)
    for (path, mine), (_, theirs) in zip(factors(ours).items(), factors(reference).items()):
        assert max_diff(mine[0], theirs[0]) <= 1e-5 and max_diff(mine[1], theirs[1]) <= 1e-5, path
    mine, theirs, original_w = moved_weights(ours), stored_weights(reference), stored_weights(ours)
    for path in mine:
        assert max_diff(mine[path], theirs[path]) <= 1e-5, path
    moved = max(max_diff(theirs[path], original_w[path]) for path in theirs)
    assert (moved > 1e-3) if start < STEPS else (moved == 0)
    batch = tiny_batch(base, seed=7)
    assert max_diff(logits(ours, batch), logits(reference, batch)) <= 1e-5
    # The stored base weights never change: W_0 plus the low-rank move is how W_t is held.
    base_params = {n.replace(".base_layer", ""): p for n, p in ours.get_base_model().named_parameters() if ".adapters." not in n}
    assert all(torch.equal(base_params[n], original[n]) for n in original)


def _reference_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """The definition: x W_tᵀ + b + s·x Aᵀ Bᵀ with W_t = W_0 + λs(BA − B_K A_K) carrying no gradient to A, B."""
    adapter, view = layer.adapters["default"], layer.view
    a, b = adapter.lora_A, adapter.lora_B
    moved = view.weight().detach() + LAMBDA * SCALE * (b.detach() @ a.detach() - adapter.start_B @ adapter.start_A)
    return F.linear(x, moved, view.bias) + SCALE * (x @ a.T) @ b.T


@pytest.mark.parametrize("path_kind", ["fused", "plain"])
@pytest.mark.parametrize("base_kind", ["llama", "gpt2", "llama-nf4"])
def test_forward_and_gradients_match_the_definition(base_kind, path_kind):
    """Output and gradients (x, A, B) of every moved layer equal plain autograd on the definition, through
    the fused node (the training path) and the plain one (mixed batches, several adapters, autocast)."""
    build, targets = MODELS[base_kind.split("-")[0]]
    base = quantize_model(build(hidden=64)) if base_kind.endswith("nf4") else build()
    model = get_peft_model(base, delta_config(targets, 0))
    perturb(model)  # A, B move away from the snapshot taken at construction (K = 0)
    generator = torch.Generator().manual_seed(3)
    for path, layer in model.adapted_layers():
        adapter, view = layer.adapters["default"], layer.view
        x = torch.randn(2, 3, view.in_features, generator=generator, requires_grad=True)
        upstream = torch.randn(2, 3, view.out_features, generator=generator)
        if path_kind == "fused":
            ours = layer(x)
            assert type(ours.grad_fn).__name__ == "DeltaLoraLinearFunctionBackward", path
        else:
            ours = adapter(x, layer.base_layer(x), view)
        params = [x, adapter.lora_A, adapter.lora_B]
        ours_grads = torch.autograd.grad((ours * upstream).sum(), params)
        reference = _reference_layer(layer, x)
        ref_grads = torch.autograd.grad((reference * upstream).sum(), params)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5, msg=path)
        for name, g, g_ref in zip(["x", "A", "B"], ours_grads, ref_grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"{path} grad {name}")
        assert not adapter.start_A.requires_grad and adapter.start_A.grad is None


def test_disable_unmerge_and_delete_give_back_the_original_base():
    build, targets = MODELS["llama"]
    base = build()
    torch.manual_seed(0)
    model, _ = train_both(copy.deepcopy(base), copy.deepcopy(base), targets, start=3, steps=8)
    batch = tiny_batch(base, seed=7)
    trained, original = logits(model, batch), logits(base, batch)
    assert max_diff(trained, original) > 1e-3
    with model.disable_adapter():
        assert max_diff(logits(model, batch), original) == 0  # W_0 itself, not W_t
    model.merge_adapter()
    assert max_diff(logits(model, batch), trained) <= 1e-5
    model.unmerge_adapter()
    restored = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters() if ".adapters." not in n}
    assert max(max_diff(restored[n], p) for n, p in base.named_parameters()) <= 1e-6
    model.delete_adapter("default")
    assert max_diff(logits(model.get_base_model(), batch), original) <= 1e-6


def load_in_hf(base, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory))
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    return model.eval()


@pytest.mark.parametrize("variant", ["plain", "rank_pattern", "embedding"])
def test_saved_rank_2r_lora_reproduces_the_trained_model_in_hf_peft(tmp_path, variant):
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"] + (["embed_tokens"] if variant == "embedding" else [])
    fields = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}} if variant == "rank_pattern" else {}
    model = get_peft_model(copy.deepcopy(base), delta_config(targets, 2, **fields)).train()
    hooks = HookRunner(discover_hooks(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(6):
        hooks.on_step_begin(TrainingProgress(step, 6, 0.0))
        batch = tiny_batch(base, seed=step)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == ("LORA", 8, 8, 0.0)
    # One rank for every module (serving engines take no rank_pattern): v_proj's 2·2 zero-padded to 8.
    assert saved["rank_pattern"] == saved["alpha_pattern"] == {}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(t.shape[0] == 8 for k, t in tensors.items() if "lora_A" in k or "lora_embedding_A" in k)
    assert "exact" in (tmp_path / "README.md").read_text()

    batch = tiny_batch(base, seed=7)
    trained = logits(model, batch)
    theirs = load_in_hf(base, tmp_path)
    assert max_diff(logits(theirs, batch), trained) <= 1e-5
    assert max_diff(trained, logits(base, batch)) > 1e-3
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(ours.peft_config["default"]) is LoraConfig
    assert max_diff(logits(ours, batch), trained) <= 1e-6


def test_on_a_4bit_base_it_equals_the_reference_on_the_dequantised_weights_and_reloads_exactly(tmp_path):
    """W cannot be rewritten in 4 bits: the move lives in the low-rank factors. The reference rewrites the
    dequantised dense copy; the saved LoRA reloads on a fresh 4-bit base with the very same logits."""
    build, targets = MODELS["llama"]
    quantized = quantize_model(build(hidden=64)).double()  # computes in float64: see the test above
    dense = dequantize_model(copy.deepcopy(quantized))
    torch.manual_seed(0)
    ours, reference = train_both(copy.deepcopy(quantized), dense, targets, start=4)
    batch = tiny_batch(ours, seed=7)
    assert max_diff(logits(ours, batch), logits(reference, batch)) <= 1e-5
    ours.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path)
    assert max_diff(logits(reloaded, batch), logits(ours, batch)) == 0


N = 5  # the run is cut after this step


def delta_options(bert_dir, sentiment_dir, out, **changes):
    return tiny_options(bert_dir, sentiment_dir, out, method="delta_lora", max_steps=2 * N, grad_accum=2, lr=1e-2,
                        warmup_ratio=0.2, target_modules=["query", "value"], **changes)


@pytest.mark.parametrize("start,quantize", [(3, None), (7, None), (3, "nf4")])
def test_resume_in_the_middle_equals_the_uninterrupted_run(bert_dir, sentiment_dir, tmp_path, monkeypatch, start, quantize):
    """Cut after step 5 (after K = 3: the snapshot must come back from the checkpoint; before K = 7: it
    must be taken after the resume), then resumed: the same losses and the same saved adapter."""
    options = dict(delta_start_step=start, quantize=quantize)
    whole = run_training(delta_options(bert_dir, sentiment_dir, tmp_path / "whole", **options))
    discover = loop_module.discover_hooks
    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: discover(model) + [KillAfter(N)])
    with pytest.raises(Killed):
        run_training(delta_options(bert_dir, sentiment_dir, tmp_path / "cut", save_every=N, **options))
    hook_state = load_checkpoint(tmp_path / "cut").hooks["0"]
    assert {bool(layer["moving"]) for layer in hook_state.values()} == {start <= N}
    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: discover(model) + [KillAfter(-1)])
    resumed = run_training(delta_options(bert_dir, sentiment_dir, tmp_path / "cut", resume=str(tmp_path / "cut"), **options))
    assert resumed["train_loss_curve"] == pytest.approx(whole["train_loss_curve"], abs=1e-6)
    a, b = load_file(tmp_path / "whole/adapter_model.safetensors"), load_file(tmp_path / "cut/adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    moved_half = [t[:, 8:] for k, t in a.items() if "lora_B" in k]  # r = 8: the columns of -λs·B_K
    assert all(t.abs().max() > 0 for t in moved_half)


def test_cli_train_and_eval(bert_dir, sentiment_dir, tmp_path, capsys):
    out = tmp_path / "delta"
    flags = ["--model", str(bert_dir), "--dataset", str(sentiment_dir), "--batch-size", "8", "--max-length", "16"]
    assert main(["train", *flags, "--out", str(out), "--method", "delta_lora", "--max-steps", "3", "--delta-lambda", "1.5"]) == 0
    trained = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"]) == ("LORA", 16)  # the run default r = 8, saved at rank 2r
    assert json.loads((out / "metrics.json").read_text())["options"]["delta_start_step"] == 0
    assert main(["eval", "--adapter", str(out), "--dataset", str(sentiment_dir), "--max-length", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-6)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,message", [
    ({"lora_dropout": 0.1}, "Delta-LoRA takes no dropout on the adapter path.*set it to 0"),
    ({"delta_start_step": -1}, "delta_start_step must be a non-negative integer"),
    ({"delta_start_step": 2.5}, "delta_start_step must be an integer"),
    ({"delta_lambda": -1.0}, "delta_lambda must be a non-negative number"),
    ({"use_dora": True}, "no DoRA variant"),
])
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        DeltaLoraConfig(**fields)


@pytest.mark.parametrize("flags,message", [
    (["--lora-dropout", "0.1"], "Delta-LoRA takes no dropout"),
    (["--delta-start-step", "-1"], "delta_start_step must be a non-negative integer"),
])
def test_bad_flags_are_one_line_errors(bert_dir, sentiment_dir, tmp_path, capsys, flags, message):
    argv = ["train", "--model", str(bert_dir), "--dataset", str(sentiment_dir), "--out", str(tmp_path), "--method", "delta_lora",
            "--max-length", "16"]
    assert main(argv + flags) == 2
    assert message in capsys.readouterr().err


def test_loading_the_file_as_delta_lora_says_how_to_load_it(tmp_path):
    model = get_peft_model(tiny_llama(), delta_config(["q_proj"], 0))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DeltaLoraConfig adapters are saved as the plain LoRA adapter their trained model equals: leave config out"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=delta_config(["q_proj"], 0))


def test_hooks_that_missed_step_k_refuse_and_a_run_too_short_warns():
    model = get_peft_model(tiny_llama(), delta_config(["q_proj"], 3))
    adapters = dict(model.adapters_of("default"))
    with pytest.warns(UserWarning, match="never moves the weight in this run: delta_start_step=3 but the run has 3 steps"):
        DeltaStartHook(adapters, 3).on_step_begin(TrainingProgress(0, 3, 0.0))
    with pytest.raises(RuntimeError, match="should have started moving at step 3, but its hooks first ran at step 5"):
        DeltaStartHook(adapters, 3).on_step_begin(TrainingProgress(5, 10, 0.0))
