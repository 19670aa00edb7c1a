"""How the training loop finds the hooks of a model's methods and calls them.

The hook protocol itself (:class:`~peftlab.hooks.TrainingHook`, the call order in a step) lives in
:mod:`peftlab.hooks`, so method files import it without importing this package. A method hands
its hooks over in :meth:`~peftlab.methods.method.Method.training_hooks` (the default collects each
layer's ``Adapter.training_hooks()``). Only the active adapters' hooks run. LoRA and DoRA have none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.hooks import TrainingHook, TrainingProgress
from peftlab.model import PeftModel

__all__ = ["HookRunner", "TrainingHook", "TrainingProgress", "discover_hooks"]


def discover_hooks(model: nn.Module) -> list[TrainingHook]:
    """The hooks of the model's active adapters, adapter by adapter."""
    if not isinstance(model, PeftModel):
        return []  # full fine-tuning: no adapters, no hooks
    return [hook for name in model.active_adapters for hook in model.method_of(name).training_hooks(model, name)]


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
