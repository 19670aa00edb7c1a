"""The method registry: the names users type, the ``peft_type`` each saved adapter loads by, and
the method that runs a given config.

Method files register themselves (``register_method(LoraMethod("lora"))``) when
:mod:`peftlab.methods` imports them all; see :mod:`peftlab.methods.method` for the protocol.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

from peftlab.config import MARKED_CONFIG_CLASSES, PEFT_TYPES, AdapterConfig
from peftlab.methods.capabilities import check_capabilities
from peftlab.methods.method import Method

#: Name users type (``peftlab train --method dora``) -> the method, in registration order.
METHODS: dict[str, Method] = {}
# Config class -> the method that builds its adapters (the first registered instance).
_RUNNERS: dict[type[AdapterConfig], Method] = {}
_LOADERS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method under ``method.name``; conflicts are errors, never silent replacements."""
    check_capabilities(method)
    if method.name in METHODS:
        raise ValueError(f"method name {method.name!r} is registered twice ({METHODS[method.name]!r} and {method!r}).")
    runner = _RUNNERS.get(method.config_class)
    if runner is not None and type(runner) is not type(method):
        raise ValueError(
            f"{method!r} and {runner!r} share the config class {method.config_class.__name__}; a config decides "
            "which method runs it, so give the new method its own config class (a subclass will do)."
        )
    if method.loads_peft_type:
        owner = _LOADERS.get(method.peft_type)
        if owner is not None and owner.config_class is not method.config_class:
            raise ValueError(
                f"methods {owner.name!r} and {method.name!r} both load peft_type {method.peft_type!r}; "
                f"one must set loads_peft_type=False (its files then load as {owner.name!r})."
            )
        _LOADERS.setdefault(method.peft_type, method)
        PEFT_TYPES[method.peft_type] = method.config_class
    elif method.config_class.file_marker and method.config_class not in MARKED_CONFIG_CLASSES.get(method.peft_type, []):
        MARKED_CONFIG_CLASSES.setdefault(method.peft_type, []).append(method.config_class)
    _RUNNERS.setdefault(method.config_class, method)
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method registered under ``name`` (for tests and plug-in reloads)."""
    method = METHODS.pop(name)
    if _RUNNERS.get(method.config_class) is method:
        del _RUNNERS[method.config_class]
    if _LOADERS.get(method.peft_type) is method:
        del _LOADERS[method.peft_type], PEFT_TYPES[method.peft_type]
    marked = MARKED_CONFIG_CLASSES.get(method.peft_type, [])
    if method.config_class in marked and not any(m.config_class is method.config_class for m in METHODS.values()):
        marked.remove(method.config_class)


def method_for(config: AdapterConfig) -> Method:
    """The method that runs ``config``: registered for its class, or the nearest base class."""
    for cls in type(config).__mro__:
        if cls in _RUNNERS:
            return _RUNNERS[cls]
    raise ValueError(f"{type(config).__name__} belongs to no registered method; register one with register_method.")


def name_of(config: AdapterConfig) -> str:
    """The most specific registered name for ``config``: a LoraConfig with ``use_dora`` is "dora"."""
    runner = method_for(config)
    fitting = [
        m for m in METHODS.values()
        if type(m) is type(runner) and all(getattr(config, k, None) == v for k, v in m.preset.items())
    ]
    return max(fitting, key=lambda m: len(m.preset)).name if fitting else runner.name


def method_named(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}.{hint}")
    return METHODS[name]


def make_method_config(name: str, **options: Any) -> AdapterConfig:
    """Method ``name``'s adapter config, ``options`` over its preset (``"rslora"``: a ``LoraConfig``
    with ``use_rslora=True``). A method on a quantized base (``qlora``) is that adapter on a base
    quantized first, a step of the model's, not the config's: it warns, so that building it by name
    never trains on the full-precision weights unawares (the training engine quantizes, then calls
    ``Method.make_config``)."""
    method = method_named(name)
    if method.quantization:
        warnings.warn(
            f"method {name!r} trains its adapter on a base quantized to {method.quantization.upper()}: this is the "
            f"adapter's config alone (a {method.config_class.__name__}); quantize the model first with "
            f"peftlab.quant.quantize_model(model), as `peftlab train --method {name}` does, or it trains on the "
            "full-precision weights.",
            stacklevel=2,
        )
    return method.make_config(**options)
