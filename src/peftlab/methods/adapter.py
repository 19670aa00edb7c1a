"""What a method's adapter module must provide; the layer wrapper calls nothing else.

    output = adapter(x, base_out, base)      # base_out = the frozen layer's output on x
    merge(base) / unmerge(base)              # fold the adapter into the frozen weight and back
    saved_tensors()                          # {HF key suffix: tensor}, e.g. {"lora_A.weight": A}

``base`` is a :class:`peftlab.base.BaseLayerView`: adapters never know whether the layer is a
Linear, a GPT-2 Conv1D, an Embedding or a 4-bit layer.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.base import BaseLayerView


class Adapter(nn.Module):
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayerView) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, base: BaseLayerView) -> torch.Tensor:
        """The ``[out, in]`` change this adapter makes to the frozen weight."""
        raise NotImplementedError

    def merge(self, base: BaseLayerView) -> None:
        base.add_to_weight(self.delta_weight(base))

    def unmerge(self, base: BaseLayerView) -> None:
        base.add_to_weight(-self.delta_weight(base))

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved values in; the caller has checked the keys and shapes."""
        own = self.saved_tensors()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value.to(own[key].dtype))
