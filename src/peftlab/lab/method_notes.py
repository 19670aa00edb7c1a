"""What each compared method is, in one line, from the method file's own module docstring.

A method's file is ``peftlab/methods/<name>.py`` when there is one (``dora.py`` for ``dora``), else
the file its Method class is defined in (``lora.py`` for ``rslora``); its line is the docstring's first sentence. A method that quantizes its
base first says so, as the shared file's first line cannot.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys

from peftlab.train.options import FULL_FINE_TUNING

FULL_FINE_TUNING_NOTE = "Full fine-tuning: every weight of the model is trained; no adapter."


def describe_method(name: str) -> str:
    """One line saying what the method is; says so when ``name`` is not registered in this peftlab."""
    from peftlab.methods import METHODS

    if name == FULL_FINE_TUNING:
        return FULL_FINE_TUNING_NOTE
    method = METHODS.get(name)
    if method is None:
        return f"(not a registered method in this peftlab: {name})"
    own_file = f"peftlab.methods.{name}"
    module_name = own_file if importlib.util.find_spec(own_file) else type(method).__module__
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    line = _first_line(module.__doc__ or "") or f"{type(method).__name__} (its file has no docstring)"
    if method.quantization:
        line += f" Here on a base quantized to {method.quantization.upper()} first."
    return line


def _first_line(docstring: str) -> str:
    """The docstring's first sentence: its first paragraph (a title may wrap) up to the first full stop
    that starts a new sentence, without reST literal markers."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)[0].replace("``", "")
