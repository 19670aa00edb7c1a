"""Losses and metrics of a batch, and evaluation over a dataset: accuracy or perplexity.

The loss is computed here from the logits, as a sum with a count, not by the model: the loop
needs sums to normalise over a whole step across micro-batches and processes, and the same
numbers give the running training accuracy.

A causal LM's output layer runs only where a label is predicted (:func:`scored_logits_only`):
on instruction data most positions are a prompt or padding, whose logits (the vocabulary wide,
the largest tensor of the step) the loss never reads. The logits it does compute are those of
the full computation, row for row, so the loss and gradients are the same.

    seq-cls     count = examples,            correct = argmax == label
    causal-lm   count = label tokens (!= -100, after the one-token shift), correct = next token
"""

from __future__ import annotations

import contextlib
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
    """Totals from a model's full logits (causal LM: ``[batch, length, vocab]``, shifted here)."""
    logits = logits.float()
    if task == "causal-lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    return _totals(logits, labels)


def _totals(logits: torch.Tensor, labels: torch.Tensor) -> BatchTotals:
    loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        scored = labels != IGNORE_INDEX
        correct = int((logits.argmax(-1)[scored] == labels[scored]).sum())
    return BatchTotals(loss_sum, int(scored.sum()), correct)


def forward_totals(model: nn.Module, batch: dict[str, torch.Tensor], task: str, device: torch.device,
                   bf16: bool = False) -> BatchTotals:
    """The model run on ``batch`` and the loss totals of its output; causal LM: the output layer
    computes only the logits a label is predicted from (:func:`scored_logits_only`)."""
    labels = batch["labels"].to(device)
    if task != "causal-lm":
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**model_inputs(batch, device)).logits
        return batch_totals(task, logits, labels)
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    with scored_logits_only(model, scored) as selection:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**model_inputs(batch, device)).logits
    if not selection.applied or logits.shape[:-1] != (int(scored.sum()),):
        return batch_totals(task, logits, labels)  # an output layer not reached by the hook: the full logits
    return _totals(logits.float(), targets[scored])


@dataclass
class _Selection:
    applied: bool = False


@contextlib.contextmanager
def scored_logits_only(model: nn.Module, scored: torch.Tensor) -> Iterator[_Selection]:
    """While inside, ``model``'s output layer (``get_output_embeddings()``) gets only the hidden
    states at the positions ``scored`` marks, ``scored[b, t]`` standing for position ``t`` of row
    ``b`` (which predicts token ``t + 1``): the model's logits come out as ``[scored.sum(), vocab]``,
    in row-major order. ``applied`` says whether it did; a model without such a layer, or one that
    does not call it on ``[batch, length, hidden]`` states, gives its full logits instead."""
    selection = _Selection()
    head = _output_layer(model)
    if head is None:
        yield selection
        return

    def select(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if selection.applied or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 \
                or tuple(hidden.shape[:2]) != (scored.shape[0], scored.shape[1] + 1):
            return None
        selection.applied = True
        return (hidden[:, :-1][scored.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield selection
    finally:
        handle.remove()


def _output_layer(model: nn.Module) -> nn.Module | None:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DistributedDataParallel
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    get_output = getattr(base, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return head if isinstance(head, nn.Module) else None


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
            result = forward_totals(model, batch, task, processes.device, bf16)
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
