"""Which tensors get weight decay: matrices do; biases, norms and vectors such as DoRA's magnitude do
not, as in BERT's and HF Trainer's recipes. The optimizer (:mod:`peftlab.optim`) groups the model's
tensors this way, and so does a method's adapter by default (``Method.param_groups``).
"""

from __future__ import annotations

from torch import nn


def decay_groups(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> list[dict]:
    """Matrices decayed, the rest (biases, norms, vectors) not; empty groups left out."""
    decayed = [p for _, p in named if p.ndim >= 2]
    undecayed = [p for _, p in named if p.ndim < 2]
    groups = [
        {"params": decayed, "lr": lr, "weight_decay": weight_decay},
        {"params": undecayed, "lr": lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
