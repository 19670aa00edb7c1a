"""DyLoRA against its definition (methods.md): LoRA at the step's rank b with scale alpha/b, only
component b learning in frozen mode, set_rank(b) == LoRA of the first b components, a merge that
remembers its rank, and a rank per step that every process and a resumed run draw alike."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

import peftlab.train.loop as loop_module
from peftlab import LoraConfig, get_peft_model
from peftlab.export import build_lora_export
from peftlab.hooks import TrainingProgress
from peftlab.methods.dylora import DyLoraConfig
from peftlab.train import run_training
from peftlab.train.hooks import HookRunner, discover_hooks
from fused_check import fused_gradients_equal_autograd
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
R, ALPHA = 6, 12


def dylora(**fields):
    model = get_peft_model(tiny_llama(), DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, **fields))
    perturb(model)
    return model


def lora_from_first(model, rank: int, alpha: float = ALPHA):
    """A plain LoRA adapter of rank ``rank`` holding the DyLoRA adapter's first ``rank`` components."""
    lora = get_peft_model(tiny_llama(), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    with torch.no_grad():
        for (path, ours), (_, theirs) in zip(model.adapters_of("default"), lora.adapters_of("default")):
            theirs.lora_A.copy_(ours.lora_A[:rank])
            theirs.lora_B.copy_(ours.lora_B[:, :rank])
    return lora


def lm_loss(model, batch):
    out = model(**batch).logits
    return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


def train(model, steps: int, seed: int = 0):
    """AdamW steps with the model's training hooks at their points, as peftlab's loop calls them."""
    model.train()
    hooks = HookRunner(discover_hooks(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        progress = TrainingProgress(step, steps, 0.0, seed)
        hooks.on_step_begin(progress)
        lm_loss(model, tiny_batch(model, seed=step)).backward()
        hooks.after_backward(progress)
        optimizer.step()
        hooks.after_optimizer_step(progress)
        optimizer.zero_grad()
    return model.eval()


def test_rank_fixed_at_r_trains_exactly_as_lora_with_scale_alpha_over_r():
    ours = dylora(min_rank=R, frozen=False)
    theirs = lora_from_first(ours, R)
    batch = tiny_batch(ours, seed=99)
    assert max_diff(logits(ours, batch), logits(theirs, batch)) <= 1e-6
    train(ours, 6), train(theirs, 6)
    assert max_diff(logits(ours, batch), logits(theirs, batch)) <= 1e-6
    for (_, a), (_, b) in zip(ours.adapters_of("default"), theirs.adapters_of("default")):
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
def test_frozen_mode_trains_component_b_only(fused):
    model = dylora(lora_dropout=0.0 if fused else 0.1).train()
    sampler = discover_hooks(model)[0]
    progress = next(TrainingProgress(s, 10, 0.0) for s in range(100)
                    if int(torch.randint(1, R + 1, (), generator=TrainingProgress(s, 10, 0.0).generator())) == 4)
    sampler.on_step_begin(progress)
    assert all(adapter.step_rank == 4 for _, adapter in model.adapters_of("default"))
    lm_loss(model, tiny_batch(model)).backward()
    for _, adapter in model.adapters_of("default"):
        ga, gb = adapter.lora_A.grad, adapter.lora_B.grad
        assert ga[:3].abs().max() == 0 and gb[:, :3].abs().max() == 0  # components below b: frozen
        assert ga[3].abs().max() > 0 and gb[:, 3].abs().max() > 0  # component b learns
        assert ga[4:].abs().max() == 0 and gb[:, 4:].abs().max() == 0  # components above b: unused
    sampler.after_optimizer_step(progress)
    assert all(adapter.step_rank is None for _, adapter in model.adapters_of("default"))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rank", [1, 4, R])
def test_frozen_fused_node_gives_the_gradients_of_the_detached_formula(rank, dropout):
    """The fused frozen-mode node equals plain autograd on ``x Wᵀ + bias + (alpha/b) · x_d A'ᵀ B'ᵀ``
    with ``A'``, ``B'`` the first b components, those below b detached (fp64, the same dropout mask)."""
    torch.manual_seed(0)
    config = DyLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], lora_dropout=dropout)
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)).double(), config).base_model[0]
    adapter = layer.adapters["default"]
    torch.nn.init.normal_(adapter.lora_B)  # B starts at 0: A's gradient would be too
    layer.train()
    adapter.step_rank = rank
    params = [adapter.lora_A, adapter.lora_B]
    # the detached-below-b factors of the autograd path
    grads = fused_gradients_equal_autograd(layer, "NewestComponentLoraFunction", lambda: adapter.factors_at(rank), params, dropout)
    others = torch.arange(R) != rank - 1
    assert grads[1][rank - 1].abs().min() > 0 and not grads[1][others].any() and not grads[2][:, others].any()


def test_step_rank_uses_scale_alpha_over_b():
    model = dylora(frozen=False).train()
    for _, adapter in model.adapters_of("default"):
        adapter.step_rank = 3
    batch = tiny_batch(model)
    with torch.no_grad():
        ours = model(**batch).logits
    assert max_diff(ours, logits(lora_from_first(model, 3), batch)) <= 1e-6


@pytest.mark.parametrize("rank", [1, 3, R])
def test_set_rank_equals_lora_of_the_first_components(tmp_path, rank):
    model = dylora().eval()
    batch = tiny_batch(model)
    model.set_rank(rank)
    expected = logits(lora_from_first(model, rank), batch)
    assert max_diff(logits(model, batch), expected) <= 1e-6
    model.merge_adapter()
    assert max_diff(logits(model, batch), expected) <= 1e-5
    model.unmerge_adapter()
    model.save_pretrained(tmp_path, as_lora=True)  # plain LoRA at the chosen rank
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == rank


def test_export_at_any_trained_rank_is_exact_whatever_rank_is_set():
    model = dylora().eval()
    model.set_rank(2)
    export = build_lora_export(model, rank=5)
    assert export.exact and export.rank == 5
    expected = lora_from_first(model, 5)
    for path, adapter in expected.adapters_of("default"):
        a = export.tensors[f"base_model.model.{path}.lora_A.weight"]
        b = export.tensors[f"base_model.model.{path}.lora_B.weight"]
        torch.testing.assert_close(b @ a, adapter.delta_weight(None), atol=1e-6, rtol=0)


def test_unmerge_restores_the_weight_merged_at_another_rank():
    """The official code's pitfall: merge at one rank, unmerge at another corrupts W. Here the merge
    records its rank: set_rank is refused while merged, and unmerge removes what was merged."""
    model = dylora().eval()
    weights = {path: layer.base_layer.weight.detach().clone() for path, layer in model.adapted_layers()}
    model.set_rank(4)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"set_rank\(2\): adapter 'default' is merged at rank 4; unmerge_adapter\(\) first"):
        model.set_rank(2)
    for _, adapter in model.adapters_of("default"):
        adapter.rank = 2  # even if the rank were changed underneath
    model.unmerge_adapter()
    for path, layer in model.adapted_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[path], atol=1e-6, rtol=0)


def test_bad_ranks_are_refused():
    model = dylora()
    for rank in (0, R + 1, -1, 2.0, True):
        with pytest.raises(ValueError, match=rf"set_rank\({rank!r}\): a DyLoRA adapter runs at ranks 1..{R}"):
            model.set_rank(rank)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="the lora method trains one fixed rank"):
        lora.set_rank(2)
    with pytest.raises(ValueError, match=r"min_rank \(5\) must be at most r \(4\)"):
        DyLoraConfig(r=4, min_rank=5)
    with pytest.raises(ValueError, match=rf"export rank {R + 1} is above the dylora adapter's rank {R}"):
        build_lora_export(model, rank=R + 1)


def test_step_rank_is_the_same_in_every_process_and_on_resume():
    """The draw depends on (seed, step) only: not on the process's RNG, which DDP seeds per rank."""
    draws = []
    for process_seed in (0, 1):
        torch.manual_seed(process_seed)
        draws.append([int(torch.randint(1, R + 1, (), generator=TrainingProgress(s, 50, 0.0, 7).generator()))
                      for s in range(50)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) == R  # every rank is drawn
    other_seed = [int(torch.randint(1, R + 1, (), generator=TrainingProgress(s, 50, 0.0, 8).generator())) for s in range(50)]
    assert other_seed != draws[0]


def test_resumed_run_matches_the_whole_run_and_eval_takes_a_rank(bert_dir, sentiment_dir, tmp_path, monkeypatch, capsys):
    from test_train_checkpoint import N, Killed, KillAfter

    options = dict(method="dylora", max_steps=2 * N, lr=1e-2, r=4, lora_alpha=8.0)
    whole = run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "whole", **options))
    found = loop_module.discover_hooks
    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: found(model) + [KillAfter(N)])
    with pytest.raises(Killed):
        run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "cut", save_every=N, **options))
    monkeypatch.setattr(loop_module, "discover_hooks", lambda model: found(model) + [KillAfter(-1)])
    resumed = run_training(tiny_options(bert_dir, sentiment_dir, tmp_path / "cut", resume=str(tmp_path / "cut"), **options))
    assert resumed["train_loss_curve"] == pytest.approx(whole["train_loss_curve"], abs=1e-6)

    # peftlab eval --rank: the trained adapter at any rank; at r it is the run's own final evaluation.
    from peftlab.cli import main

    def evaluate(*flags: str) -> tuple[int, dict | str]:
        code = main(["eval", "--adapter", str(tmp_path / "whole"), "--dataset", str(sentiment_dir), "--max-length", "16", *flags])
        captured = capsys.readouterr()
        return code, (json.loads(captured.out) if code == 0 else captured.err)

    at_r, at_1 = evaluate("--rank", str(4)), evaluate("--rank", "1")
    assert at_r[0] == 0 and at_r[1]["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-5)
    assert at_1[0] == 0 and at_1[1]["eval_loss"] != pytest.approx(whole["eval_loss"], abs=1e-5)
    code, err = evaluate("--rank", "0")
    assert code == 2 and "set_rank(0): a DyLoRA adapter runs at ranks 1..4" in err
