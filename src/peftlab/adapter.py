"""What a method's adapter module must provide; the layer wrapper calls nothing else.

    output = adapter(x, base_out, base)      # base_out = the frozen layer's output on x
    merge(base) / unmerge(base)              # fold the adapter into the frozen weight and back
    saved_tensors()                          # {HF key suffix: tensor}, e.g. {"lora_A.weight": A}
    load_saved_tensors(tensors)              # the inverse; override it if a saved tensor is computed
    trainable_parameters()                   # what trains while the adapter is active (default: all)
    training_hooks()                         # per-layer TrainingHooks (default: none)
    low_rank(base)                           # the update as exact factors (A, B), or None
    fused_forward(x, base)                   # base and adapter as one autograd node, or None

``base`` is a :class:`peftlab.base.BaseLayerView`: adapters never know whether the layer is a
Linear, a GPT-2 Conv1D, an Embedding or a 4-bit layer.
"""

from __future__ import annotations

import torch
from torch import nn

from peftlab.base import BaseLayerView
from peftlab.hooks import TrainingHook


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

    def low_rank(self, base: BaseLayerView) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update as exact factors ``(A [k, in], B [out, k])`` with ``delta_weight == B @ A``
        (every scale folded into ``B``), detached; None when the update is not low rank (the export
        to plain LoRA then takes a truncated SVD of ``delta_weight``, at a rank the user gives)."""
        return None

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved values into the tensors ``saved_tensors()`` returns; the caller has checked the
        keys and shapes. A saved tensor that is computed (not a parameter or buffer of this module)
        would take the copy and drop it: refused, so such an adapter must override this."""
        own = self.saved_tensors()
        stored = {id(t) for t in self.parameters()} | {id(t) for t in self.buffers()}
        computed = sorted(key for key in tensors if id(own[key]) not in stored)
        if computed:
            raise TypeError(
                f"{type(self).__name__} saves {', '.join(computed)} as a computed tensor, so copying the file's "
                "values into it would load nothing; the adapter must override load_saved_tensors."
            )
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value.to(own[key].dtype))

    def fused_forward(self, x: torch.Tensor, base: BaseLayerView) -> torch.Tensor | None:
        """The layer's whole output (frozen layer plus this adapter) from one fused autograd node, or None
        where the adapter has no such node for this input (the layer then runs the base, then ``forward``).
        The layer asks for it when this adapter alone runs on the batch (the common training case)."""
        return None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train while this adapter is active; the others never do."""
        return list(self.parameters())

    def training_hooks(self) -> list[TrainingHook]:
        return []
