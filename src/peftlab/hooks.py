"""The calls a training loop makes into a method, at fixed points of each optimizer step.

One optimizer step, with the hook calls in order::

    on_step_begin(progress)              per-step state, e.g. DyLoRA's sampled rank (drawn from
                                         progress.generator(): the same on every process and on resume)
    for each micro-batch:
        loss = data loss + extra_loss(progress) / grad_accum      regularisers
        loss.backward()
    (gradients all-reduced across processes, then clipped)
    after_backward(progress)             gradients are present: importance scores (AdaLoRA)
    optimizer.step()
    after_optimizer_step(progress)       weight or mask updates (Delta-LoRA, AdaLoRA's budget)
    scheduler.step(); zero_grad()

peftlab's loop (:mod:`peftlab.train.loop`) and the HF ``Trainer`` callback
(:mod:`peftlab.train.callback`) call them at the same points, so a hook sees the same gradients in
both. A hook with state that must survive a resume (moving averages, masks) gives
``state_dict``/``load_state_dict`` of tensors and plain values.

A method hands its hooks to the loop through :meth:`peftlab.methods.method.Method.training_hooks`.
This module imports nothing from the training package, so a method file can subclass
:class:`TrainingHook` without pulling the loop in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TrainingProgress:
    step: int  # optimizer steps done before this one
    total_steps: int  # 0 where the loop does not say (a custom loop calling update_and_allocate)
    epoch: float
    seed: int = 0  # the run's seed: the same in every process

    def generator(self, stream: int = 0) -> torch.Generator:
        """Random numbers for this step that every DDP process draws alike and a resumed run draws
        again (seeded by ``(seed, step, stream)`` only, never by the global RNG): DyLoRA's rank."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) * 101 + stream)


class TrainingHook:
    """Override what the method needs; every call defaults to doing nothing."""

    #: Whether the hook still works when each process holds only a shard of every tensor between
    #: steps (``--strategy fsdp``): true for a hook that sets per-step values (DyLoRA's rank), false
    #: for one that reads or rewrites whole weights or gradients (AdaLoRA's importance, pruning).
    #: Unknown: false, and FSDP2 refuses the method rather than run it on shards.
    works_on_shards: bool = False

    def on_step_begin(self, progress: TrainingProgress) -> None:
        pass

    def extra_loss(self, progress: TrainingProgress) -> torch.Tensor | None:
        return None

    def after_backward(self, progress: TrainingProgress) -> None:
        pass

    def after_optimizer_step(self, progress: TrainingProgress) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
