"""The fields every adapter config shares: which modules to adapt, what else to train, the task.

A method's config subclasses :class:`AdapterConfig` and adds its own fields. Field names are HF
peft's, so a user can switch libraries by changing an import, and ``to_hf_dict`` writes exactly
the keys HF peft knows for that ``peft_type`` (peftlab-only fields stay out of the file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftlab.io import CONFIG_NAME, atomic_write_text, read_adapter_config

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
    #: HF fields of this peft_type that change the math and that peftlab does not implement: a saved
    #: config that turns one on is refused rather than loaded as something else.
    unsupported_hf_fields: ClassVar[tuple[str, ...]] = ()
    #: ``target_modules`` when none are given, by ``config.model_type`` (HF peft's table for the method).
    default_target_modules: ClassVar[dict[str, list[str] | str]] = {}
    #: For a config whose files are another method's ``peft_type`` plus fields of its own (HF loads
    #: them as that method, warning about the extra keys): the field whose presence marks its files,
    #: so that peftlab loads them as this class and not as the plain method (which would drop them).
    file_marker: ClassVar[str | None] = None

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
        check_field_types(self)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() != "all-linear":
                check_regex(f"{name} {value!r}", value)

    def with_classifier_heads(self) -> list[str] | None:
        """``modules_to_save`` plus the classification head names for SEQ_CLS, as HF does."""
        names = list(self.modules_to_save or [])
        if self.task_type == "SEQ_CLS":
            names += [n for n in SEQ_CLS_HEAD_NAMES if n not in names]
        return names or None

    def to_hf_dict(self) -> dict[str, Any]:
        """The adapter_config.json content: HF peft's keys only, sorted on write."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in self.peftlab_only_fields}
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

        turned_on = [k for k in cls.unsupported_hf_fields if k in data and not is_off(k)]
        if turned_on:
            settings = ", ".join(f"{k}={data[k]!r}" for k in turned_on)
            raise ValueError(
                f"this adapter sets {settings}: an HF peft feature that peftlab does not support, so it cannot be "
                f"loaded without changing what it computes. Train it without {turned_on[0]}, or use HF peft."
            )
        unknown = sorted(k for k in data if k not in known and k not in ignorable and not is_off(k))
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring config keys peftlab does not use: {', '.join(unknown)}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return self.to_hf_dict()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **_: Any) -> "AdapterConfig":
        """The config in a saved adapter folder, as the class its ``peft_type`` names (HF's ``PeftConfig.from_pretrained``)."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        data = read_adapter_config(folder)
        config_class = config_class_for(data["peft_type"], data)
        if not issubclass(config_class, cls):
            raise ValueError(f"{folder} holds a {data['peft_type']} adapter, not a {cls.__name__}; load it with {config_class.__name__}.")
        return config_class.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        """Write adapter_config.json (atomically) into ``save_directory``."""
        atomic_write_text(Path(save_directory) / CONFIG_NAME, json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")


def _plain(value: Any) -> Any:
    """A sub-config (HF's EvaConfig, CordaConfig: dataclasses) as the dict JSON holds, as HF writes it."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


#: ``peft_type`` of adapter_config.json -> the config class its files load as (the method registry fills it).
PEFT_TYPES: dict[str, type[AdapterConfig]] = {}
#: peft_type -> config classes whose files are of that type plus their ``file_marker`` field.
MARKED_CONFIG_CLASSES: dict[str, list[type[AdapterConfig]]] = {}


def config_class_for(peft_type: str, saved: dict[str, Any] | None = None) -> type[AdapterConfig]:
    """The config class that files of ``peft_type`` load as; with the ``saved`` adapter_config.json, a
    class whose ``file_marker`` field the file holds (LongLoRA's LoRA files with their RoPE scale)."""
    if peft_type not in PEFT_TYPES:
        raise ValueError(
            f"unknown peft_type {peft_type!r} in adapter_config.json; peftlab knows {', '.join(sorted(PEFT_TYPES))}."
        )
    marked = [cls for cls in MARKED_CONFIG_CLASSES.get(peft_type, []) if saved is not None and cls.file_marker in saved]
    return marked[0] if marked else PEFT_TYPES[peft_type]


def check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} is not a valid regular expression ({error}); escape special characters or give a list of names.") from None


_TYPE_WORDS = {bool: "true or false (a bool)", int: "an integer", float: "a number", str: "a string", dict: "a dict", list: "a list"}


def _fits(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list or annotation is list:
        items = typing.get_args(annotation)
        return isinstance(value, list) and (not items or all(_fits(v, items[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return not isinstance(annotation, type) or isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if typing.get_origin(annotation) is list:
        return f"a list of {_describe(typing.get_args(annotation)[0]).removeprefix('an ').removeprefix('a ')}s"
    return _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_field_types(config: Any) -> None:
    """Every field holds a value of its declared type: ``use_dora="false"`` or ``lora_alpha="16"`` is an
    error, not a truthy string or a string that fails later."""
    hints = typing.get_type_hints(type(config))
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if not _fits(value, hints[spec.name]):
            raise ValueError(
                f"{type(config).__name__}: {spec.name} must be {_describe(hints[spec.name])}, got {value!r} ({type(value).__name__})."
            )


def default_field(value: Any) -> Any:
    """A dataclass default for mutable values (dicts, lists)."""
    return field(default_factory=lambda: type(value)(value))
