"""``modules_to_save``: modules trained in full, one copy per adapter, the original kept frozen.

A classifier head is the usual case: a new head is random, so it must train with the adapter and
be saved with it. Each adapter gets its own copy, so switching adapters switches heads too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class TrainedCopy(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        trained = copy.deepcopy(self.original_module)
        trained.requires_grad_(True)
        self.copies[name] = trained

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def current(self) -> nn.Module:
        if self.disabled or self.active not in self.copies:
            return self.original_module
        return self.copies[self.active]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.copies[name].state_dict(keep_vars=True))

    def __getattr__(self, name: str):
        # Code that reads the head's attributes (``model.score.weight``, ``out_features``) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)
