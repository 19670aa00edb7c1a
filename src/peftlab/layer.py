"""The wrapper that replaces a targeted module: the frozen layer plus its named adapters.

    AdaptedLayer
      base_layer   the original module, untouched (its parameter names stay the model's)
      adapters     {name: Adapter}

It decides which adapters run: the active ones, none while disabled, the merged ones never
(they are already in the weight), or a different one per row of the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence, cast

import torch
from torch import nn

from peftlab.base import BaseLayerView, base_view
from peftlab.adapter import Adapter

BASE_ROW = "__base__"

# Per-row adapter names of the forward in flight; set by PeftModel around one call.
_row_adapters: contextvars.ContextVar[Sequence[str] | None] = contextvars.ContextVar("row_adapters", default=None)


@contextlib.contextmanager
def rows_use_adapters(names: Sequence[str] | None) -> Iterator[None]:
    token = _row_adapters.set(names)
    try:
        yield
    finally:
        _row_adapters.reset(token)


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    @property
    def view(self) -> BaseLayerView:
        # A view only wraps its module: one per base layer object spares a type lookup per forward.
        view = self.__dict__.get("_view")
        if view is None or view.module is not self.base_layer:
            view = self.__dict__["_view"] = base_view(self.base_layer)
        return view

    def add(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter

    def adapter(self, name: str) -> Adapter:
        """The adapter called ``name`` (typed: ``nn.ModuleDict`` returns a plain Module)."""
        return cast(Adapter, self.adapters[name])

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it.")
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    def merge(self, names: Sequence[str]) -> None:
        view = self.view
        for name in names:
            if name in self.adapters and name not in self.merged:
                self.adapter(name).merge(view)
                self.merged.append(name)

    def unmerge(self) -> None:
        view = self.view
        while self.merged:  # last merged first, so each unmerge sees the weight it was merged into
            self.adapter(self.merged.pop()).unmerge(view)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = None if self.disabled else _row_adapters.get()
        names = [] if self.disabled else [n for n in self.active if n in self.adapters and n not in self.merged]
        view = self.view
        if len(names) == 1 and rows is None and not args and not kwargs:
            # The common training case: one adapter; let it run base and adapter as one node.
            fused = self.adapter(names[0]).fused_forward(x, view)
            if fused is not None:
                return fused
        out = self.base_layer(x, *args, **kwargs)
        if rows is not None:
            return self._forward_mixed(x, out, rows)
        for name in names:
            out = self.adapters[name](x, out, view)
        return out

    def _forward_mixed(self, x: torch.Tensor, out: torch.Tensor, rows: Sequence[str]) -> torch.Tensor:
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows.")
        if self.merged:
            raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call unmerge_adapter() first.")
        view = self.view
        result = out.clone()
        for name in dict.fromkeys(rows):
            if name == BASE_ROW or name not in self.adapters:
                continue  # "__base__" rows, and adapters that do not cover this layer, keep the base output
            index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            result[index] = self.adapters[name](x[index], out[index], view)
        return result
