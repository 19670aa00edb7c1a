"""LoRA+: create_loraplus_optimizer's groups and learning rates equal HF peft's on the same model
(DoRA magnitudes, embedding adapters and trained copies included), a user's weight_decay is kept,
the training loop's groups, and a ratio <= 0 refused everywhere.
"""

from __future__ import annotations

import copy

import peft
import peft.optimizers
import pytest
import torch

from peftlab import LoraConfig, get_peft_model
from peftlab.methods import make_method_config
from peftlab.optim import make_optimizer
from peftlab.optimizers import create_loraplus_optimizer
from peftlab.train.options import OptionsError, TrainOptions
from tiny_models import tiny_bert_seq_cls

CASES = {
    # LoRA on linear layers and the word embeddings; LayerNorm copies give 1-D tensors in a norm.
    "lora-embedding": dict(target_modules=["query", "value", "word_embeddings"], modules_to_save=["LayerNorm"]),
    # DoRA's magnitude is 1-D: B's rate, decayed.
    "dora": dict(target_modules=["query", "value", "dense"], use_dora=True),
}


def both_models(case: str):
    """The same tiny BERT (SEQ_CLS: the classifier head trains too) in HF peft and in peftlab."""
    options = dict(r=4, lora_alpha=8, task_type="SEQ_CLS", **CASES[case])
    base = tiny_bert_seq_cls()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(options)))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**copy.deepcopy(options)))
    return theirs, ours


def groups_by_file_key(optimizer, saved: dict[str, torch.Tensor]) -> list[tuple[float, float, list[str]]]:
    """Each group as (lr, weight_decay, the adapter-file keys of its tensors): the same names in both libraries."""
    key_of = {tensor.data_ptr(): key for key, tensor in saved.items()}
    return [
        (group["lr"], group["weight_decay"], sorted(key_of[p.data_ptr()] for p in group["params"]))
        for group in optimizer.param_groups
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_groups_and_learning_rates_equal_hf_peft(case):
    theirs, ours = both_models(case)
    kwargs = dict(lr=2e-4, loraplus_lr_ratio=16, loraplus_lr_embedding=1e-5, betas=(0.8, 0.9))
    hf_optimizer = peft.optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, **kwargs)
    our_optimizer = create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs)
    hf_groups = groups_by_file_key(hf_optimizer, peft.get_peft_model_state_dict(theirs, save_embedding_layers=False))
    our_groups = groups_by_file_key(our_optimizer, ours.adapter_state_dict("default"))
    assert our_groups == hf_groups
    assert all(g["betas"] == (0.8, 0.9) for g in our_optimizer.param_groups)
    # The comparison covers every kind of tensor: A, B, 1-D ones (magnitudes or norms) and embeddings.
    keys = {key for _, _, group in our_groups for key in group}
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert any("magnitude" in k for k in keys) if case == "dora" else any("lora_embedding_B" in k for k in keys)
    assert [lr for lr, _, _ in our_groups] == [2e-4, 1e-5, 2e-4 * 16, 2e-4 * 16]


def test_a_users_weight_decay_is_kept_where_hf_drops_it():
    theirs, ours = both_models("lora-embedding")
    hf_optimizer = peft.optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    our_optimizer = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    assert [g["weight_decay"] for g in hf_optimizer.param_groups] == [0.0, 0.0, 0.0, 0.0]
    assert [g["weight_decay"] for g in our_optimizer.param_groups] == [0.1, 0.1, 0.1, 0.0]  # no decay: norms, biases
    explicit = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1,
                                         loraplus_weight_decay=0.01)
    assert [g["weight_decay"] for g in explicit.param_groups] == [0.01, 0.01, 0.01, 0.0]  # HF's name wins


@pytest.mark.parametrize("method", ["loraplus", "dora", "lora_fa"])
def test_the_training_loop_uses_loraplus_groups(method):
    """make_optimizer (peftlab train) gives B λ·lr with the loraplus method or any LoRA-family method
    plus a ratio; trained copies (the classifier) keep the base rate."""
    ratio = None if method == "loraplus" else 4.0
    config = make_method_config(method, r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                **({"loraplus_lr_ratio": ratio} if ratio else {}))
    ratio = ratio or 16.0
    model = get_peft_model(tiny_bert_seq_cls(), config)
    optimizer = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expected = 1e-3 * ratio if "lora_B" in name or "magnitude" in name else 1e-3
        assert lr_of[id(param)] == expected, name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in model.parameters())
    assert TrainOptions(method=method, loraplus_lr_ratio=2.0).adapter_options()["loraplus_lr_ratio"] == 2.0


def test_a_ratio_that_is_not_positive_is_refused():
    _, ours = both_models("dora")
    message = r"loraplus_lr_ratio must be a positive number \(B's learning rate over A's; the paper uses 16\), got 0"
    with pytest.raises(ValueError, match=message):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive number"):
        LoraConfig(loraplus_lr_ratio=-1.0)
    with pytest.raises(OptionsError, match="loraplus_lr_ratio must be positive, got -2.0"):
        TrainOptions(method="lora", loraplus_lr_ratio=-2.0)


def test_the_ratio_stays_out_of_the_adapter_file(tmp_path):
    model = get_peft_model(tiny_bert_seq_cls(), make_method_config("loraplus", target_modules=["query"]))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in text and "loraplus" not in text
