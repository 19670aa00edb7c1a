"""PEFT methods, one file each, found without a central list: importing this package imports every
module in it, and each method file registers its methods (:mod:`peftlab.methods.registry`). The
protocol a method implements is :class:`peftlab.methods.method.Method`.
"""

from __future__ import annotations

import importlib
import pkgutil

from peftlab.config import PEFT_TYPES, config_class_for
from peftlab.methods.method import Method, MethodOption, UnsupportedBaseError
from peftlab.methods.registry import (
    METHODS,
    make_method_config,
    method_for,
    method_named,
    register_method,
    unregister_method,
)

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "METHODS", "PEFT_TYPES", "Method", "MethodOption", "UnsupportedBaseError", "config_class_for",
    "make_method_config", "method_for", "method_named", "register_method", "unregister_method",
]
