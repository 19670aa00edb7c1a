"""Dynamic-rank DoRA (``dora_rank``) against its definition in methods.md: live components follow the
pruning schedule, pruned components contribute nothing, merge == unmerged, the variance regulariser,
and a pruned adapter that saves, loads and exports whole."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from peftlab import PeftModel, get_peft_model
from peftlab.hooks import TrainingProgress
from peftlab.methods import UnsupportedBaseError
from peftlab.methods.dora_rank import DoraRankConfig, VarianceSum, importance
from peftlab.train.hooks import HookRunner, discover_hooks
from fused_check import fused_gradients_equal_autograd
from tiny_models import logits, max_diff, perturb, tiny_batch, tiny_bert_seq_cls, tiny_llama
from train_fixtures import bert_dir, sentiment_dir, tiny_options  # noqa: F401

TARGETS = ["q_proj", "v_proj", "down_proj"]
TOTAL = 40


def model_with(**fields):
    options = dict(r=2, lora_alpha=4, target_modules=TARGETS, total_step=TOTAL, prune_interval=3, lora_dropout=0.0)
    model = get_peft_model(tiny_llama(), DoraRankConfig(**{**options, **fields}))
    perturb(model)  # c = 0 at init: every component would be equally (un)important
    return model


def live(model) -> int:
    return sum(model.rank_per_layer().values())


def run_schedule(model, steps: int = TOTAL) -> list[int]:
    """The hooks' calls of ``steps`` optimizer steps (no data: the schedule is what is tested)."""
    hooks = HookRunner(discover_hooks(model))
    counts = []
    for step in range(steps):
        progress = TrainingProgress(step, TOTAL, 0.0)
        hooks.on_step_begin(progress)
        hooks.after_backward(progress)
        hooks.after_optimizer_step(progress)
        counts.append(live(model))
    return counts


def test_live_components_follow_the_schedule():
    model = model_with()
    layers = len(TARGETS) * 2
    r0 = math.ceil(1.5 * 2)
    total = layers * r0
    assert live(model) == total and all(rank == r0 for rank in model.rank_per_layer().values())
    counts = run_schedule(model)
    start, end = int(0.15 * TOTAL), int(0.5 * TOTAL)  # steps 6 and 20
    expected, live_now = [], total
    for step in range(TOTAL):
        if start <= step <= end and ((step - start) % 3 == 0 or step == end):
            p = (step - start) / (end - start)
            live_now = total - math.floor(total * (1 - 2 / r0) * p**3 + 1e-9)
        expected.append(live_now)
    assert counts == expected
    assert counts[start - 1] == total and counts[end] == layers * 2  # r = 2 per layer on average at the end
    assert sorted(model.rank_per_layer().values()) != [2] * layers  # the budget moved between layers


def test_pruned_components_contribute_nothing_and_get_no_gradient():
    model = model_with()
    run_schedule(model)
    assert live(model) < 18
    batch = tiny_batch(model)
    before = logits(model, batch)
    with torch.no_grad():
        for _, adapter in model.adapters_of("default"):
            dead = ~adapter.lora_mask
            assert (adapter.lora_c[dead] == 0).all()
            adapter.lora_A[dead] = 5.0
            adapter.lora_B[:, dead] = -5.0
            adapter.lora_c[dead] = 3.0  # even a c that grew back
    assert max_diff(logits(model, batch), before) == 0
    model.train()
    out = model(**batch).logits
    out.pow(2).mean().backward()
    for _, adapter in model.adapters_of("default"):
        dead = ~adapter.lora_mask
        assert not adapter.lora_c.grad[dead].any()
        assert not adapter.lora_A.grad[dead].any() and not adapter.lora_B.grad[:, dead].any()
        assert adapter.lora_c.grad[~dead].abs().min() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_node_gives_the_gradients_of_plain_autograd(dropout):
    """The gated fused node equals plain autograd on ``x Wᵀ + bias + s · x_d (diag(c ⊙ mask) A)ᵀ Bᵀ``
    (fp64, the same dropout mask, one component pruned)."""
    torch.manual_seed(0)
    config = DoraRankConfig(r=2, lora_alpha=4, target_modules=["0"], lora_dropout=dropout, total_step=TOTAL)
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)).double(), config).base_model[0].train()
    adapter = layer.adapters["default"]
    torch.nn.init.normal_(adapter.lora_c)  # c starts at 0: A's and B's gradients would be too
    adapter.prune(torch.tensor([1]))
    params = [adapter.lora_A, adapter.lora_B, adapter.lora_c]
    # diag(c ⊙ mask) A through autograd
    grads = fused_gradients_equal_autograd(layer, "GatedLoraFunction", adapter.update_factors, params, dropout)
    assert grads[3][1] == 0 and grads[3][[0, 2]].abs().min() > 0 and grads[1][1].abs().max() == 0


def test_merge_equals_unmerged_and_export_keeps_the_live_components(tmp_path):
    model = model_with()
    run_schedule(model)
    model.eval()
    batch = tiny_batch(model)
    expected = logits(model, batch)
    model.merge_adapter()
    assert max_diff(logits(model, batch), expected) <= 1e-5
    model.unmerge_adapter()
    assert max_diff(logits(model, batch), expected) <= 1e-6
    from peftlab.export import build_lora_export

    export = build_lora_export(model)
    assert export.exact and export.rank == max(model.rank_per_layer().values())
    # Saved and loaded: the mask comes back with the tensors.
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.rank_per_layer() == model.rank_per_layer()
    assert max_diff(logits(loaded, batch), expected) == 0


def test_variance_regulariser_until_pruning_ends():
    model = model_with(variance_weight=0.1)
    hook = discover_hooks(model)[0]
    adapters = [adapter for _, adapter in model.adapters_of("default")]
    by_hand = torch.stack([
        (a.lora_A.var(dim=1).sum() + a.lora_B.var(dim=0).sum()) / (2 * a.lora_A.shape[0]) for a in adapters
    ]).mean() * 0.1
    term = hook.extra_loss(TrainingProgress(0, TOTAL, 0.0))
    torch.testing.assert_close(term, by_hand)
    term.backward()
    assert adapters[0].lora_A.grad.abs().max() > 0
    assert hook.extra_loss(TrainingProgress(int(0.5 * TOTAL), TOTAL, 0.0)) is not None
    assert hook.extra_loss(TrainingProgress(int(0.5 * TOTAL) + 1, TOTAL, 0.0)) is None
    assert discover_hooks(model_with(variance_weight=0.0))[0].extra_loss(TrainingProgress(0, TOTAL, 0.0)) is None


def test_importance_of_stacked_layers_is_the_definition_on_each():
    """‖c_i b_i a_iᵀ‖_F / (‖ΔW‖_F + 1e-8) per component, with ΔW built, for layers stacked by shape."""
    gen = torch.Generator().manual_seed(0)
    gates, a, b = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((3, 4), (3, 4, 7), (3, 5, 4)))
    gates[1, 2] = 0  # a pruned component
    scores = importance(gates, a, b)
    for layer in range(3):
        delta = b[layer] @ torch.diag(gates[layer]) @ a[layer]
        for i in range(4):
            part = gates[layer, i] * torch.outer(b[layer][:, i], a[layer][i])
            assert scores[layer, i].item() == pytest.approx((part.norm() / (delta.norm() + 1e-8)).item(), rel=1e-6)
    assert scores[1, 2] == 0


@pytest.mark.parametrize("dim", [1, 2])
def test_variance_sum_and_its_gradient_equal_torch_var(dim):
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    twin = x.detach().clone().requires_grad_(True)
    ours = VarianceSum.apply(x, dim)
    ours.backward(torch.tensor(0.7, dtype=torch.float64))
    reference = twin.var(dim=dim).sum()
    reference.backward(torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, twin.grad, rtol=1e-9, atol=1e-12)


def test_schedule_state_survives_a_resume():
    whole = model_with()
    run_schedule(whole)
    cut = model_with()
    hooks = HookRunner(discover_hooks(cut))
    for step in range(10):
        progress = TrainingProgress(step, TOTAL, 0.0)
        hooks.after_optimizer_step(progress)
    state = copy.deepcopy(hooks.state_dict())
    resumed = model_with()  # fresh adapters: the mask comes from the hook state
    hooks = HookRunner(discover_hooks(resumed))
    hooks.load_state_dict(state)
    for step in range(10, TOTAL):
        hooks.after_optimizer_step(TrainingProgress(step, TOTAL, 0.0))
    assert resumed.rank_per_layer() == whole.rank_per_layer()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match=r"init_r \(3\) must be at least r \(4\)"):
        DoraRankConfig(r=4, init_r=3)
    with pytest.raises(ValueError, match="prune_start <= prune_end"):
        DoraRankConfig(prune_start=0.6, prune_end=0.5)
    with pytest.raises(UnsupportedBaseError, match=r"Embedding layer \(model.embed_tokens\)"):
        get_peft_model(tiny_llama(), DoraRankConfig(target_modules=["embed_tokens"]))
    model = get_peft_model(tiny_llama(), DoraRankConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="set total_step"):
        discover_hooks(model)[0].after_optimizer_step(TrainingProgress(0, 0, 0.0))


def test_a_training_run_prunes_to_r_on_average(bert_dir, sentiment_dir, tmp_path):
    """peftlab's loop fills total_step from the run; the saved adapter holds r live components per layer on average."""
    from peftlab.train import run_training

    run_training(tiny_options(bert_dir, sentiment_dir, tmp_path, method="dora_rank", max_steps=8, r=2, lr=1e-2,
                              save_every=4))
    loaded = PeftModel.from_pretrained(tiny_bert_seq_cls(), tmp_path)
    ranks = loaded.rank_per_layer()
    assert sum(ranks.values()) == 2 * len(ranks) and max(ranks.values()) <= 3
