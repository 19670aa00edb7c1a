"""The training hooks a method can need, and how the loop finds them.

One optimizer step of the loop, with the hook calls in order::

    on_step_begin(progress)              per-step state, e.g. DyLoRA's sampled rank
    for each micro-batch:
        loss = data loss + extra_loss(progress) / grad_accum      regularisers
        loss.backward()
    (gradients all-reduced across processes, then clipped)
    after_backward(progress)             gradients are present: importance scores (AdaLoRA)
    optimizer.step()
    after_optimizer_step(progress)       weight or mask updates (Delta-LoRA, AdaLoRA's budget)
    scheduler.step(); zero_grad()

The HF ``Trainer`` calls its callbacks at the same points (see :mod:`peftlab.train.callback`), so
a hook sees the same gradients in both. A hook with state that must survive a resume
(moving averages, masks) gives ``state_dict``/``load_state_dict`` of tensors and plain values.

Where hooks come from: a method's adapter module or config defines ``training_hooks()``::

    class AdaLoraConfig(LoraConfig):
        def training_hooks(self, model) -> list[TrainingHook]: ...   # one hook for the whole model
    class DyLoraAdapter(Adapter):
        def training_hooks(self) -> list[TrainingHook]: ...           # one per adapted layer

Only the active adapters' hooks run. LoRA and DoRA define none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.model import PeftModel


@dataclass(frozen=True)
class TrainingProgress:
    step: int  # optimizer steps done before this one
    total_steps: int
    epoch: float


class TrainingHook:
    """Override what the method needs; every call defaults to doing nothing."""

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


def discover_hooks(model: nn.Module) -> list[TrainingHook]:
    """The hooks of the model's active adapters: their configs' first, then each layer's."""
    if not isinstance(model, PeftModel):
        return []  # full fine-tuning: no adapters, no hooks
    hooks: list[TrainingHook] = []
    for name in model.active_adapters:
        config = model.peft_config[name]
        if hasattr(config, "training_hooks"):
            hooks += config.training_hooks(model)
    for _, layer in model.adapted_layers():
        for name in model.active_adapters:
            if name in layer.adapters and hasattr(layer.adapters[name], "training_hooks"):
                hooks += layer.adapters[name].training_hooks()
    return hooks


class HookRunner:
    """Calls every hook at each point of the step; sums the extra loss terms."""

    def __init__(self, hooks: list[TrainingHook]) -> None:
        self.hooks = hooks

    def on_step_begin(self, progress: TrainingProgress) -> None:
        for hook in self.hooks:
            hook.on_step_begin(progress)

    def extra_loss(self, progress: TrainingProgress) -> torch.Tensor | None:
        terms = [term for hook in self.hooks if (term := hook.extra_loss(progress)) is not None]
        return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None

    def after_backward(self, progress: TrainingProgress) -> None:
        for hook in self.hooks:
            hook.after_backward(progress)

    def after_optimizer_step(self, progress: TrainingProgress) -> None:
        for hook in self.hooks:
            hook.after_optimizer_step(progress)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): hook.state_dict() for i, hook in enumerate(self.hooks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state) != len(self.hooks):
            raise ValueError(
                f"the checkpoint holds the state of {len(state)} training hooks but this model has {len(self.hooks)}; "
                "resume with the same method and options as the saved run."
            )
        for i, hook in enumerate(self.hooks):
            hook.load_state_dict(state[str(i)])
