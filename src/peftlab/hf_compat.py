"""HF peft's other public names, so that code written for ``peft`` runs with ``peftlab`` by changing
the import:

    TaskType, PeftType, PeftConfig                      enums and the config base class
    PeftModelForCausalLM, ...ForSequenceClassification  the task classes get_peft_model returns
    AutoPeftModel, AutoPeftModelForCausalLM, ...        base model + adapter from the adapter folder
    get_peft_model_state_dict, set_peft_model_state_dict, inject_adapter_in_model
    prepare_model_for_kbit_training                     for peftlab's own 4-bit base (peftlab.quant)

Deliberate differences from HF peft are listed in the README.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import torch
from torch import nn

from peftlab import io
from peftlab.checkpointing import enable_activation_checkpointing
from peftlab.config import AdapterConfig
from peftlab.model import (  # the task classes are the model's; HF users import them from here
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: HF's name for the config base class.
PeftConfig = AdapterConfig

class TaskType(str, enum.Enum):
    """The task an adapter is trained for (``LoraConfig(task_type=TaskType.CAUSAL_LM)``), as HF's: the values
    of ``peftlab.config.TASK_TYPES`` (a test holds the two equal)."""

    SEQ_CLS = "SEQ_CLS"
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftTypeName(str):
    """One ``peft_type``: a string (``PeftType.LORA == "LORA"``) with HF's enum ``name``/``value``."""

    @property
    def name(self) -> str:
        return str(self)

    @property
    def value(self) -> str:
        return str(self)


class _PeftTypeRegistry(type):
    # Members come from the method registry at each access, so methods registered later are covered.
    def __getattr__(cls, name: str) -> PeftTypeName:
        from peftlab.methods import PEFT_TYPES

        if name in PEFT_TYPES:
            return PeftTypeName(name)
        raise AttributeError(f"PeftType has no {name!r}: peftlab's methods are {', '.join(sorted(PEFT_TYPES))}.")

    def __iter__(cls) -> Iterator[PeftTypeName]:
        from peftlab.methods import PEFT_TYPES

        return iter([PeftTypeName(name) for name in sorted(PEFT_TYPES)])

    def __contains__(cls, name: object) -> bool:
        from peftlab.methods import PEFT_TYPES

        return name in PEFT_TYPES


class PeftType(metaclass=_PeftTypeRegistry):
    """The ``peft_type`` of each registered method (``PeftType.LORA``), as HF's enum."""


# -- the task classes ----------------------------------------------------------------------------


# -- AutoPeftModel -------------------------------------------------------------------------------

#: The transformers Auto class of the base model, by task_type (None: AutoModel).
_AUTO_BASE_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


class AutoPeftModel:
    """``AutoPeftModel.from_pretrained(adapter_dir)``: the base model named by the adapter's
    ``base_model_name_or_path`` (a local folder, an offline alias or a hub id), quantized as the
    adapter was trained, with the adapter loaded. The task classes check the adapter's task."""

    task_type: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_dir).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **base_kwargs: Any,
    ) -> PeftModel:
        import transformers

        from peftlab.assets import resolve_model

        folder = Path(pretrained_model_name_or_path)
        config = AdapterConfig.from_pretrained(folder)
        task_type = cls.task_type or config.task_type
        if cls.task_type is not None and config.task_type not in (None, cls.task_type):
            right = next((c.__name__ for c in AUTO_PEFT_MODEL_CLASSES if c.task_type == config.task_type), "AutoPeftModel")
            raise ValueError(f"{folder} holds an adapter trained for task_type={config.task_type}; load it with {right}, not {cls.__name__}.")
        if not config.base_model_name_or_path:
            raise ValueError(f"{folder}/adapter_config.json names no base model (base_model_name_or_path); load the base yourself and use PeftModel.from_pretrained.")
        auto_class = getattr(transformers, _AUTO_BASE_CLASSES.get(task_type or "", "AutoModel"))
        if task_type == "SEQ_CLS" and "num_labels" not in base_kwargs:
            # The adapter holds the trained head; the base's own head (any size) is replaced by it.
            base_kwargs.update(num_labels=saved_num_labels(folder) or 2, ignore_mismatched_sizes=True)
        base = auto_class.from_pretrained(resolve_model(config.base_model_name_or_path), **base_kwargs)
        if io.read_adapter_metadata(folder).get(io.QUANTIZATION_KEY) == io.QUANTIZATION_NF4:
            from peftlab.quant import quantize_model

            quantize_model(base)
        return PeftModel.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=is_trainable)


def saved_num_labels(adapter: str | os.PathLike) -> int | None:
    """The class count of the classifier saved with an adapter, when one 2-D head weight shows it."""
    from peftlab.config import SEQ_CLS_HEAD_NAMES

    heads = [
        tensor.shape[0] for key, tensor in io.read_adapter_weights(Path(adapter)).items()
        if tensor.ndim == 2 and key.endswith(".weight") and any(f".{h}." in key for h in SEQ_CLS_HEAD_NAMES)
    ]
    return heads[0] if len(heads) == 1 else None


def _auto_class(task_type: str, name: str) -> type[AutoPeftModel]:
    return type(f"AutoPeftModelFor{name}", (AutoPeftModel,), {"task_type": task_type, "__module__": __name__})


AutoPeftModelForSequenceClassification = _auto_class("SEQ_CLS", "SequenceClassification")
AutoPeftModelForCausalLM = _auto_class("CAUSAL_LM", "CausalLM")
AutoPeftModelForSeq2SeqLM = _auto_class("SEQ_2_SEQ_LM", "Seq2SeqLM")
AutoPeftModelForTokenClassification = _auto_class("TOKEN_CLS", "TokenClassification")
AutoPeftModelForQuestionAnswering = _auto_class("QUESTION_ANS", "QuestionAnswering")
AutoPeftModelForFeatureExtraction = _auto_class("FEATURE_EXTRACTION", "FeatureExtraction")
AUTO_PEFT_MODEL_CLASSES = (
    AutoPeftModelForSequenceClassification, AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForTokenClassification, AutoPeftModelForQuestionAnswering, AutoPeftModelForFeatureExtraction,
)


# -- state dicts and injection -------------------------------------------------------------------


class LoadResult(NamedTuple):
    """What ``set_peft_model_state_dict`` returns, as torch's ``load_state_dict``; peftlab refuses any
    missing or unexpected key instead of reporting it, so both lists are empty."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default", **_: Any
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under HF PEFT file keys; also for a model from ``inject_adapter_in_model``."""
    if isinstance(model, PeftModel):
        model._check_known(adapter_name)
        return model.adapter_state_dict(adapter_name)
    # An injected model's keys are its own module paths, without the PeftModel's prefix (as in HF).
    tensors = _injected_view(model, adapter_name).adapter_state_dict(adapter_name)
    return {key.removeprefix(io.KEY_PREFIX): tensor for key, tensor in tensors.items()}


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default", **_: Any
) -> LoadResult:
    """Load tensors written by ``get_peft_model_state_dict`` (or read from an adapter file); every key
    and shape must fit, and no value may be NaN or infinite."""
    if not isinstance(model, PeftModel):
        model = _injected_view(model, adapter_name)
        prefix = io.KEY_PREFIX
        peft_model_state_dict = {k if k.startswith(prefix) else prefix + k: v for k, v in peft_model_state_dict.items()}
    model._check_known(adapter_name)
    model.load_adapter_tensors(peft_model_state_dict, adapter_name, "the state dict")
    return LoadResult([], [])


def _injected_view(model: nn.Module, adapter_name: str) -> PeftModel:
    """The PeftModel that ``inject_adapter_in_model`` built around ``model``."""
    owner = getattr(model, "_peftlab_owner", None)
    if owner is None or adapter_name not in owner.peft_config:
        raise ValueError(f"the model holds no adapter named {adapter_name!r}; add one with get_peft_model or inject_adapter_in_model.")
    return owner


def inject_adapter_in_model(peft_config: AdapterConfig, model: nn.Module, adapter_name: str = "default", **_: Any) -> nn.Module:
    """Put the adapter's layers into ``model`` in place and return ``model`` itself (no wrapper);
    the base parameters are frozen, as in HF."""
    owner = get_peft_model(model, peft_config, adapter_name)
    object.__setattr__(model, "_peftlab_owner", owner)  # not a submodule: no cycle in named_modules()
    return model


def prepare_model_for_kbit_training(
    model: PreTrainedModel, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> PreTrainedModel:
    """Ready a 4-bit base (``peftlab.quant.quantize_model``) for adapter training, as HF does for
    bitsandbytes: freeze every parameter, keep the full-precision ones (norms, embeddings, heads)
    in float32 for stable training, and turn on gradient checkpointing with inputs that require
    grad, so adapters inside checkpointed blocks get gradients."""
    from peftlab.quant import is_quantized

    if isinstance(model, PeftModel):
        raise ValueError("prepare_model_for_kbit_training takes the base model, before get_peft_model.")
    model.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    quantized = is_quantized(model)
    if quantized and use_gradient_checkpointing:
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}  # HF's default
        enable_activation_checkpointing(model, kwargs)
    return model
