"""Losses and metrics of a batch, and evaluation over a dataset: accuracy or perplexity.

The loss is computed here from the logits, as a sum with a count, not by the model: the loop
needs sums to normalise over a whole step across micro-batches and processes, and the same
numbers give the running training accuracy.

    seq-cls     count = examples,            correct = argmax == label
    causal-lm   count = label tokens (!= -100, after the one-token shift), correct = next token
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.data import IGNORE_INDEX
from peftlab.data.datasets import Rows
from peftlab.train.distributed import Processes


@dataclass
class BatchTotals:
    loss_sum: torch.Tensor  # differentiable
    count: int
    correct: int


def label_count(task: str, labels: torch.Tensor) -> int:
    """How many terms the loss of this batch sums: examples, or label tokens for causal LM."""
    if task == "causal-lm":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return labels.shape[0]


def batch_totals(task: str, logits: torch.Tensor, labels: torch.Tensor) -> BatchTotals:
    logits = logits.float()
    if task == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        scored = labels != IGNORE_INDEX
        correct = int((logits.argmax(-1)[scored] == labels[scored]).sum())
    return BatchTotals(loss_sum, int(scored.sum()), correct)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch without its labels (the loss is ours), on ``device``. A packed batch (position ids,
    no attention mask: see :mod:`peftlab.data.packing`) runs without a KV cache, the case in which
    transformers reads restarting position ids as separate examples."""
    inputs: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False
    return inputs


def shard_batches(
    data: Rows, collate: Callable, processes: Processes, batch_size: int, lockstep: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """This process's contiguous share of ``data``, collated in batches of ``batch_size``.

    ``lockstep``: every process yields as many batches as the one with the most (a sharded
    model's forward is a collective); the extra ones repeat an example with every label ignored,
    so they count for nothing.
    """
    mine = processes.shard(range(len(data)))
    starts = range(0, len(mine), batch_size)
    for start in starts:
        yield collate([data[i] for i in mine[start : start + batch_size]])
    if lockstep and len(data):
        most = math.ceil(math.ceil(len(data) / processes.world_size) / batch_size)
        for _ in range(most - len(starts)):
            padding = collate([data[mine[0] if mine else 0]])
            padding["labels"].fill_(IGNORE_INDEX)
            yield padding


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    task: str,
    processes: Processes,
    bf16: bool = False,
) -> dict[str, float]:
    """Metrics over this process's ``batches``, summed over all processes.

    seq-cls: ``eval_accuracy`` and ``eval_loss``; causal-lm: ``eval_loss`` (mean per token),
    ``eval_perplexity`` = exp(eval_loss), ``eval_token_accuracy`` and ``eval_tokens`` (tokens scored).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    try:
        for batch in batches:
            with torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**model_inputs(batch, processes.device)).logits
            result = batch_totals(task, logits, batch["labels"].to(processes.device))
            totals += torch.tensor([float(result.loss_sum), result.count, result.correct], dtype=torch.float64)
    finally:
        model.train(was_training)
    loss_sum, count, correct = processes.sum(totals).tolist()
    if count == 0:
        raise ValueError("the evaluation set has nothing to score: no examples, or no response tokens for causal LM.")
    loss = loss_sum / count
    if task == "causal-lm":
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else math.inf,
                "eval_token_accuracy": correct / count, "eval_tokens": int(count)}
    return {"eval_accuracy": correct / count, "eval_loss": loss}
