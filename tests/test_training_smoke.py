"""Training end to end: a plain AdamW loop learns a toy task, and HF Trainer trains the wrapped model."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from method_table import METHOD_TABLE, MethodCase
from peftlab import LoraConfig, get_peft_model
from tiny_models import tiny_bert_seq_cls

# rsLoRA at alpha = √r: the same scale (1) as the others. At alpha = r its scale √8 with this learning rate
# sits at the edge of stability: the loss dips to 0.01 and bounces back up, or not, by the draw of A.
METHODS = {"lora": {}, "rslora": {"use_rslora": True, "lora_alpha": 8**0.5}, "dora": {"use_dora": True}}


def contains_five(n: int, seed: int, seq_len: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy task that needs attention: label 1 when token 5 occurs somewhere after position 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 64, (n, seq_len), generator=generator)
    labels = torch.arange(n) % 2
    positions = torch.randint(1, seq_len, (n,), generator=generator)
    ids[labels.bool(), positions[labels.bool()]] = 5
    return ids, labels


@pytest.mark.parametrize("method", list(METHODS))
def test_thirty_adamw_steps_halve_the_loss(method):
    """30 AdamW steps on the adapter (and classifier copy) take a learnable task's loss below half its start."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_bert_seq_cls(),
        LoraConfig(**{"r": 8, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"], "task_type": "SEQ_CLS",
                      **METHODS[method]}),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = contains_five(64, seed=0)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # Unseen examples of the task improve too: the adapter learned the rule, not just these rows.
    held_out_ids, held_out_labels = contains_five(64, seed=1)
    model.eval()
    with torch.no_grad():
        assert model(input_ids=held_out_ids, labels=held_out_labels).loss.item() < losses[0]


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def trainer_dataset(n: int = 16) -> DictDataset:
    """The toy task as a Dataset of dicts; "extra" is no model input, so Trainer must drop it."""
    ids, labels = contains_five(n, seed=2)
    return DictDataset(
        [
            {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label, "extra": torch.tensor(i)}
            for i, (row, label) in enumerate(zip(ids, labels))
        ]
    )


@pytest.mark.parametrize("case", METHOD_TABLE, ids=str)
def test_hf_trainer_trains_the_wrapped_model(tmp_path, case: MethodCase):
    """transformers.Trainer finds `labels` through the wrapped forward's signature, trains only the
    adapter and classifier copy, and its evaluation reports eval_loss."""
    model = get_peft_model(tiny_bert_seq_cls(), case.config(4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    data = trainer_dataset()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    assert trainer.label_names == ["labels"]

    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert any(".adapters.default." in n for n in changed) and any("classifier.copies.default" in n for n in changed)
