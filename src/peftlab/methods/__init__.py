"""The method registry: each method is one file that registers its config class here.

``PEFT_TYPES`` maps the ``peft_type`` of adapter_config.json to a config class (what loading
needs); ``METHODS`` maps the names users type (``peftlab train --method dora``) to a function
that builds that method's config from options. A new method adds one file and one
``register_method`` call; nothing in the core changes.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from peftlab.config import AdapterConfig
from peftlab.methods.lora import LoraConfig

PEFT_TYPES: dict[str, type[AdapterConfig]] = {}
METHODS: dict[str, Callable[..., AdapterConfig]] = {}


def register_method(name: str, make_config: Callable[..., AdapterConfig], config_class: type[AdapterConfig]) -> None:
    METHODS[name] = make_config
    PEFT_TYPES[config_class.peft_type] = config_class


def config_class_for(peft_type: str) -> type[AdapterConfig]:
    if peft_type not in PEFT_TYPES:
        raise ValueError(
            f"unknown peft_type {peft_type!r} in adapter_config.json; peftlab knows {', '.join(sorted(PEFT_TYPES))}."
        )
    return PEFT_TYPES[peft_type]


def make_method_config(name: str, **options: Any) -> AdapterConfig:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name](**options)


register_method("lora", lambda **o: LoraConfig(**o), LoraConfig)
register_method("rslora", lambda **o: LoraConfig(**{"use_rslora": True, **o}), LoraConfig)
register_method("dora", lambda **o: LoraConfig(**{"use_dora": True, **o}), LoraConfig)
