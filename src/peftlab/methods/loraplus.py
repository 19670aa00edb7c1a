"""LoRA+ (Hayou et al. 2024), method name ``loraplus``: LoRA whose B learns faster than A.

    η_B = λ · η_A,   λ = loraplus_lr_ratio (the paper: 2⁴ = 16)

The adapter is LoRA's; only the optimizer groups change. ``loraplus`` is LoRA with λ = 16 and a
smaller base learning rate (A's); any LoRA-family method takes ``--loraplus-lr-ratio`` (the
config field ``loraplus_lr_ratio``, peftlab's own, not written to adapter_config.json).

The groups are HF peft's (``create_loraplus_optimizer``), by the rule of the LoRA+ authors' code:

    A        every other trainable tensor (lora_A, matrices of trained copies)   η,      decay
    embedding  both factors of an adapter on an nn.Embedding                      η_emb,  decay
    B        lora_B and 1-D tensors (DoRA's magnitude, biases, norms)             λ·η,    decay
    B, no decay  those of them in a LayerNorm or named ``bias``                   λ·η,    no decay

In ``peftlab train`` the groups cover the adapter's own tensors; trained copies (classifier heads,
``modules_to_save``) keep the base learning rate, as without LoRA+.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names

from peftlab.methods.lora import LoraMethod
from peftlab.methods.lora_variant import LoraVariant, register_lora_variant
from peftlab.methods.registry import register_method

if TYPE_CHECKING:
    from peftlab.model import PeftModel

#: The paper's ratio, the ``loraplus`` method's default.
PAPER_RATIO = 16.0
#: HF's learning rate for adapters on embeddings.
EMBEDDING_LR = 1e-6

def check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(
            f"loraplus_lr_ratio must be a positive number (B's learning rate over A's; the paper uses 16), got {ratio!r}."
        )


def loraplus_param_groups(
    model: PeftModel, named: Iterable[tuple[str, nn.Parameter]], lr: float, ratio: float,
    lr_embedding: float = EMBEDDING_LR, weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """HF's four groups, in HF's order (empty ones kept), over ``named`` (names as in
    ``model.named_parameters()``)."""
    check_ratio(ratio)
    embedding = {id(p) for _, layer in model.adapted_layers() if layer.view.takes_ids for p in layer.adapters.parameters()}
    decayed = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in named:
        if id(param) in embedding:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["B" if name in decayed else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": lr * ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * ratio},
    ]


class LoraPlusVariant(LoraVariant):
    """``LoraConfig(loraplus_lr_ratio=...)`` on any LoRA-family method: HF's four optimizer groups."""

    def applies(self, config) -> bool:
        return config.loraplus_lr_ratio is not None

    def check_config(self, config) -> None:
        check_ratio(config.loraplus_lr_ratio)

    def param_groups(self, model, named, lr, weight_decay, config):
        return loraplus_param_groups(model, named, lr, config.loraplus_lr_ratio, config.loraplus_lr_embedding, weight_decay)


register_lora_variant(LoraPlusVariant())


def create_loraplus_optimizer(
    model: PeftModel, optimizer_cls: type[torch.optim.Optimizer], lr: float, loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = EMBEDDING_LR, **kwargs: Any,
) -> torch.optim.Optimizer:
    """HF peft's ``create_loraplus_optimizer``: ``optimizer_cls`` over every trainable tensor of
    ``model`` in the LoRA+ groups (see the module docstring), other ``kwargs`` passed on.

    One difference, on purpose: a ``weight_decay`` passed here is applied to the decayed groups.
    HF peft drops it silently (its groups take ``loraplus_weight_decay``, default 0, and override the
    optimizer's default). ``loraplus_weight_decay``, HF's name, still wins where given.
    """
    weight_decay = kwargs.pop("loraplus_weight_decay", kwargs.get("weight_decay", 0.0))
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = loraplus_param_groups(model, named, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes

        # As HF: embeddings keep 32-bit optimizer state.
        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


# A smaller base rate than LoRA's 1e-3: with λ = 16, B then learns at 3.2e-3 (HF's advice: LoRA's
# rate halved or less; the paper's GPT-2/RoBERTa runs use η_A of 1e-4 to 5e-4).
register_method(LoraMethod("loraplus", preset={"loraplus_lr_ratio": PAPER_RATIO}, run_defaults={"lr": 2e-4}))
