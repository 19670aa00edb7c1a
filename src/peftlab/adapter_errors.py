"""The real cause when an adapter cannot be read or put on a model, instead of the symptom.

    not_an_adapter(folder)                     # why a folder holds no adapter: a hub id, a full model, nothing
    with on_its_own_base(config, model, src):  # a mismatch on a model that is not the adapter's base says so

A full fine-tuning run (or a merged model) given as an adapter used to be "no adapter_config.json";
a hub id, the same; an adapter put on another base model, "target_modules matched no module" or
a shape mismatch, which read as a broken adapter rather than a wrong base.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterator

from torch import nn

#: ``owner/name``: how a hub id looks (a local folder by that name would exist).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def not_an_adapter(directory: Path) -> str:
    """Why ``directory`` holds no adapter, as the start of an error message."""
    text = str(directory)
    if not directory.exists():
        if _HUB_ID.fullmatch(text):
            return (f"{text}: no such folder. If it is a hub id: peftlab loads adapters from local folders only "
                    f"(it works offline), so fetch it where the hub is reachable (huggingface-cli download {text} "
                    "--local-dir DIR) and pass DIR")
        return f"{text}: no such folder"
    if (directory / "config.json").is_file() and any(directory.glob("model*.safetensors")):
        return (f"{text} holds a whole model (config.json and its weights: a full fine-tuning run or a merged model), "
                "not an adapter: give it as the model (--model on the command line), without an adapter")
    return ""


def _model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


@contextlib.contextmanager
def on_its_own_base(config: Any, model: nn.Module, source: str) -> Iterator[None]:
    """A ValueError or RuntimeError in the block, for an adapter whose recorded base is not ``model``,
    is restated as that mismatch (the likely cause), with the original message kept."""
    try:
        yield
    except (ValueError, RuntimeError) as error:
        trained_on, given = getattr(config, "base_model_name_or_path", None), _model_name(model)
        if not trained_on or not given or Path(str(trained_on)).expanduser().resolve() == Path(given).resolve():
            raise
        raise ValueError(
            f"the {source} was trained on the base model {trained_on}, but it was put on {given}, which it does not "
            f"fit ({error}). Load it onto its own base (on the command line: drop --model, or give --model {trained_on})."
        ) from error
