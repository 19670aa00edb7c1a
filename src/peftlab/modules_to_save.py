"""``modules_to_save``: modules trained in full, one copy per adapter, the original kept frozen.

A classifier head is the usual case: a new head is random, so it must train with the adapter and
be saved with it. Each adapter gets its own copy, so switching adapters switches heads too.
"""

from __future__ import annotations

import copy
from typing import Sequence, cast

import torch
from torch import nn

from peftlab.layer import _row_adapters  # the per-row adapter names of the forward in flight


class TrainedCopy(nn.Module):
    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str, weight: torch.Tensor | None = None) -> None:
        """A trained copy for adapter ``name``; with ``weight``, the copy's weight is that tensor (an
        output embedding tied to the input embedding's trained copy) instead of a copy of its own."""
        memo = {} if weight is None else {id(self.original_module.weight): weight}
        trained = copy.deepcopy(self.original_module, memo)
        trained.requires_grad_(True)
        self.copies[name] = trained

    def trained_weight(self, name: str) -> torch.Tensor:
        """The weight of adapter ``name``'s copy (typed: ``nn.ModuleDict`` returns a plain Module)."""
        return cast(torch.Tensor, self.copies[name].weight)

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    def current(self) -> nn.Module:
        if self.disabled or self.active not in self.copies:
            return self.original_module
        return self.copies[self.active]

    def forward(self, *args, **kwargs):
        rows = None if self.disabled else _row_adapters.get()
        if rows is None:
            return self.current()(*args, **kwargs)
        return self._forward_mixed(rows, *args, **kwargs)

    def _forward_mixed(self, rows: Sequence[str], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One adapter per row of the batch: each row goes through its adapter's copy (the original
        for "__base__" rows and for adapters without a copy here)."""
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows.")
        out = None
        for name in dict.fromkeys(rows):
            module = self.copies[name] if name in self.copies else self.original_module
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            part = module(x[index], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[index] = part
        return out

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.copies[name].state_dict(keep_vars=True))

    def __getattr__(self, name: str):
        # Code that reads the head's attributes (``model.score.weight``, ``out_features``) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)
