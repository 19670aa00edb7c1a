"""The fields every adapter config shares: which modules to adapt, what else to train, the task.

A method's config subclasses :class:`AdapterConfig` and adds its own fields. Field names are HF
peft's, so a user can switch libraries by changing an import, and ``to_hf_dict`` writes exactly
the keys HF peft knows for that ``peft_type`` (peftlab-only fields stay out of the file).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Classification heads that must train in full with any adapter (HF adds the same two names).
SEQ_CLS_HEAD_NAMES = ("classifier", "score")

# HF config fields peftlab lacks whose saved default means "feature off" though it is not None/False.
HF_INERT_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}


@dataclass
class AdapterConfig:
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    #: The ``peft_type`` written to adapter_config.json; set by each method.
    peft_type: ClassVar[str] = ""
    #: Fields that peftlab has and HF peft does not: kept out of adapter_config.json.
    peftlab_only_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if self.task_type is not None:
            self.task_type = str(getattr(self.task_type, "value", self.task_type)).upper()
            if self.task_type not in TASK_TYPES:
                raise ValueError(f"task_type {self.task_type!r} is not one of {', '.join(TASK_TYPES)}")

    def with_classifier_heads(self) -> list[str] | None:
        """``modules_to_save`` plus the classification head names for SEQ_CLS, as HF does."""
        names = list(self.modules_to_save or [])
        if self.task_type == "SEQ_CLS":
            names += [n for n in SEQ_CLS_HEAD_NAMES if n not in names]
        return names or None

    def to_hf_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: HF peft's keys only, sorted on write."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.peftlab_only_fields}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Build from a saved config; keys this class does not know are dropped, with a warning
        unless they hold a "feature off" value (HF writes all its fields, mostly unused)."""
        saved_type = data.get("peft_type", cls.peft_type)
        if saved_type != cls.peft_type:
            raise ValueError(
                f"this adapter config is of a {saved_type} adapter, not {cls.peft_type} ({cls.__name__}); "
                "load it with PeftModel.from_pretrained, which picks the method the file names."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        ignorable = {"peft_type", "peft_version", "auto_mapping"}

        def is_off(key: str) -> bool:
            value = data[key]
            return value is None or value is False or value == {} or value == [] or (
                key in HF_INERT_DEFAULTS and value == HF_INERT_DEFAULTS[key]
            )

        unknown = sorted(k for k in data if k not in known and k not in ignorable and not is_off(k))
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring config keys peftlab does not use: {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)


def default_field(value: Any) -> Any:
    """A dataclass default for mutable values (dicts, lists)."""
    return field(default_factory=lambda: type(value)(value))
