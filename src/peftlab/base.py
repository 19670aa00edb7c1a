"""One view of a frozen base layer, whatever its storage.

Adapters see every base layer the same way: a weight of shape ``[out, in]`` and
``y = x Wᵀ + b``. The differences live here and nowhere else:

    nn.Linear     weight stored [out, in]
    GPT-2 Conv1D  weight stored [in, out]   (fan_in_fan_out: the view transposes)
    nn.Embedding  weight stored [num, dim]  (in = num_embeddings, out = dim; input is ids)
    4-bit NF4     packed bytes              (the view dequantises in the compute dtype)

A new storage kind registers a view class with :func:`register_base_view`.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class LossyMergeWarning(UserWarning):
    """An ``add_to_weight`` that the storage could not hold exactly (a 4-bit weight is re-quantized).

    ``max_abs_error`` is the largest difference between the weight stored and the one asked for.
    """

    def __init__(self, message: str, max_abs_error: float):
        super().__init__(message)
        self.max_abs_error = max_abs_error


class BaseLayerView:
    """A frozen layer seen as ``[out, in]``; subclasses say how it is stored."""

    #: True when the layer's input is a tensor of token ids, not activations.
    takes_ids = False
    #: True when the stored weight is the transpose of the [out, in] view (HF's fan_in_fan_out).
    fan_in_fan_out = False

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view where the storage allows one)."""
        raise NotImplementedError

    def trains(self) -> bool:
        """Whether any tensor of the layer itself requires grad (the fused paths need it frozen)."""
        module = self.module
        if module._modules:  # a composite layer: walk it all
            return any(p.requires_grad for p in module.parameters())
        return any(p is not None and p.requires_grad for p in module._parameters.values())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.module(x, *args, **kwargs)

    def forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` without the bias: what DoRA rescales."""
        return F.linear(x, self.weight(x.dtype))

    def project_input(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x Aᵀ`` for ``A: [r, in]``: activations times A, or A's columns looked up by id."""
        return F.linear(x, a)

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """``g W``: the gradient a frozen layer passes to its input (2-D ``grad_out``)."""
        return grad_out @ self.weight(grad_out.dtype)

    def add_to_weight(self, delta: torch.Tensor) -> None:
        """``W += delta`` for an ``[out, in]`` delta, in place and without autograd.

        Storage that cannot hold the sum exactly warns with a :class:`LossyMergeWarning`.
        """
        raise NotImplementedError

    def weight_version(self) -> Hashable:
        """Changes whenever the stored weight changes; lets adapters cache functions of W."""
        weight = self.module.weight
        return id(weight), weight._version


class LinearView(BaseLayerView):
    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    def weight(self, dtype=None):
        w = self.module.weight
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def add_to_weight(self, delta):
        with torch.no_grad():
            self.module.weight.add_(delta.to(self.module.weight.dtype))


class Conv1DView(BaseLayerView):
    """GPT-2's Conv1D: ``y = x @ W + b`` with ``W: [in, out]``; the view is ``Wᵀ``."""

    fan_in_fan_out = True

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1]

    def weight(self, dtype=None):
        w = self.module.weight.T
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def add_to_weight(self, delta):
        with torch.no_grad():
            self.module.weight.add_(delta.T.to(self.module.weight.dtype))


class EmbeddingView(BaseLayerView):
    """``nn.Embedding`` as a linear map from one-hot ids: ``[out, in] = [dim, num]``."""

    takes_ids = True

    @property
    def in_features(self) -> int:
        return self.module.num_embeddings

    @property
    def out_features(self) -> int:
        return self.module.embedding_dim

    @property
    def bias(self):
        return None

    def weight(self, dtype=None):
        w = self.module.weight.T
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        m = self.module
        return F.embedding(ids, table, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def forward_no_bias(self, x):
        return self.module(x)

    def project_input(self, x, a):
        return self._lookup(x, a.T)

    def add_to_weight(self, delta):
        with torch.no_grad():
            self.module.weight.add_(delta.T.to(self.module.weight.dtype))


# Checked in order: the first class that matches wins, so subclasses go before their parents.
_VIEWS: list[tuple[type[nn.Module], Callable[[nn.Module], BaseLayerView]]] = [
    (Conv1D, Conv1DView),
    (nn.Linear, LinearView),
    (nn.Embedding, EmbeddingView),
]


def register_base_view(module_type: type[nn.Module], view: Callable[[nn.Module], BaseLayerView]) -> None:
    """Teach peftlab a new kind of base layer (the 4-bit layer registers itself this way)."""
    _VIEWS.insert(0, (module_type, view))


def supported_types() -> tuple[type[nn.Module], ...]:
    return tuple(t for t, _ in _VIEWS)


def base_view(module: nn.Module) -> BaseLayerView:
    """The view of ``module``; a clear error for layer types no adapter can sit on."""
    for module_type, view in _VIEWS:
        if isinstance(module, module_type):
            return view(module)
    names = ", ".join(t.__name__ for t in supported_types())
    raise TypeError(
        f"cannot adapt a {type(module).__name__}: peftlab adapts {names}. "
        "Choose target_modules that name layers of those types."
    )


def is_linear_like(module: nn.Module) -> bool:
    """Linear, Conv1D or a registered quantized linear: what "all-linear" selects."""
    return isinstance(module, supported_types()) and not isinstance(module, nn.Embedding)
