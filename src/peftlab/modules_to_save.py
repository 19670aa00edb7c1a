"""``modules_to_save``: modules trained in full, one copy per adapter, the original kept frozen.

A classifier head is the usual case: a new head is random, so it must train with the adapter and
be saved with it. Each adapter gets its own copy, so switching adapters switches heads too.

A model that ties its output embedding to its input embedding needs care when either trains: with
``ensure_weight_tying`` the output layer's copy holds the input copy's very tensor; without it, HF's
warning that the two will differ; and in files, the tied keys must hold one value.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Sequence, cast

import torch
from torch import nn

from peftlab import io
from peftlab.config import AdapterConfig
from peftlab.layer import AdaptedLayer, _row_adapters  # the per-row adapter names of the forward in flight


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


# -- a tied input/output embedding (HF's ensure_weight_tying, peft#2777) ------------------------------------


def tie_output_embedding_copy(model: nn.Module, adapter_name: str, trained_copy_at: Callable[[str], TrainedCopy]) -> None:
    """HF's ``ensure_weight_tying``: where the model ties its output embedding to its input embedding
    and the input embedding trains as a copy, the output layer gets a copy holding that same trained
    tensor, so the two stay one (in training, in the files, and after merge_and_unload)."""
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    inputs, outputs = (get_input() if get_input else None), (get_output() if get_output else None)
    if not isinstance(inputs, TrainedCopy) or adapter_name not in inputs.copies or outputs is None:
        return
    original = outputs.original_module if isinstance(outputs, TrainedCopy) else outputs
    if getattr(original, "weight", None) is not inputs.original_module.weight:
        return  # not tied: nothing to keep together
    path = next(p for p, m in model.named_modules() if m is outputs)
    copy = trained_copy_at(path)
    if adapter_name in copy.copies:
        copy.remove(adapter_name)
    copy.add(adapter_name, weight=inputs.trained_weight(adapter_name))

def warn_untied_embedding(model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
    """HF peft's warning (peft#2777): the model ties its output embedding to its input embedding and the
    adapter trains one of them (``modules_to_save``) or adapts it (``target_modules``) without the other,
    so after training they differ -- no longer the tied pair the base model was."""
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    ends = input_end, output_end = tuple(get() if get else None for get in (get_input, get_output))
    if input_end is None or output_end is None:
        return
    inputs, outputs = _unwrapped(input_end), _unwrapped(output_end)
    if getattr(outputs, "weight", None) is not getattr(inputs, "weight", object()):
        return  # not tied
    tied = [path for path, module in model.named_modules() if module in ends and _holds(module, adapter_name)]
    if not tied:
        return
    remedy = ("set ensure_weight_tying=True to keep them one" if hasattr(config, "ensure_weight_tying")
              else f"{config.peft_type} has no ensure_weight_tying to keep them one")
    warnings.warn(
        f"The model ties its output embedding to its input embedding (tie_word_embeddings=True) and adapter "
        f"{adapter_name!r} trains or adapts {' and '.join(tied)} on its own, so the two will differ after "
        f"training (a problem when merging the adapter or converting the model to other formats); {remedy}. "
        "See https://github.com/huggingface/peft/issues/2777",
        stacklevel=4,
    )


def embedding_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input and output embedding weights under the keys HF peft saves them with."""
    weights = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, getter, lambda: None)()
        path = next((p for p, m in model.named_modules() if m is layer), None) if layer is not None else None
        if path is not None:
            inner = f"{path}.base_layer" if isinstance(layer, AdaptedLayer) else path
            weights[f"{io.KEY_PREFIX}{inner}.weight"] = model.get_submodule(inner).weight
    return weights


def _unwrapped(module: nn.Module) -> nn.Module:
    """The base model's own module under a trained copy or an adapted layer."""
    if isinstance(module, TrainedCopy):
        return module.original_module
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _holds(module: nn.Module, adapter_name: str) -> bool:
    """Whether ``module`` trains a copy for, or is adapted by, ``adapter_name``."""
    if isinstance(module, TrainedCopy):
        return adapter_name in module.copies
    return isinstance(module, AdaptedLayer) and adapter_name in module.adapters


def check_tied_tensors_agree(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], source: str) -> None:
    """Keys that are one tensor in the model (a tied embedding and output layer) must hold one value in
    the file; otherwise whichever loaded last would win, silently."""
    first_key: dict[int, str] = {}
    for key, tensor in expected.items():
        other = first_key.setdefault(id(tensor), key)
        if other != key and not torch.equal(saved[other], saved[key]):
            raise ValueError(
                f"{source}: {other} and {key} are one tied tensor in this model but differ in the file; it was "
                "saved from a model whose embeddings were not tied. Load it on an untied base, or re-save it tied."
            )
