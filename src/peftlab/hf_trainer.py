"""HF ``Trainer`` (and TRL's trainers, its subclasses) train, save and resume a peftlab PeftModel
as they do an HF peft one: checkpoints and ``save_model`` write an adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``).

Why patches: transformers and TRL recognise PEFT models only as ``peft.PeftModel`` instances
(``supported_classes`` in ``Trainer._save``, ``_is_peft_model``, ``accelerate``'s ``is_peft_model``).
Without these wrappers the Trainer writes the whole model under peftlab's internal key names and
on resume finds no weights it can load, and TRL puts its fused LM head on the PeftModel instead of
on the transformers model inside it. Each wrapper handles a peftlab model and calls the original
for any other. :func:`install` puts them in place: ``PeftModel`` calls it when the first peftlab model is
built, so ``import peftlab`` alone changes nothing in transformers or TRL, and a program that builds a
peftlab model never pays for importing the Trainer either: each module is wrapped when it is imported
(or at once if it already is). ``install`` may also be called by hand; it does its work once.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any

import torch

from peftlab import io
from peftlab.api_guard import require_trainable

_MARK = "_peftlab_wrapped"
#: The class the wrappers handle (peftlab's PeftModel), given to :func:`install`: this module sits below
#: the model and imports nothing of it.
_model_classes: tuple[type, ...] = ()


def _peftlab_model(trainer: Any, model: Any = None) -> Any:
    unwrapped = trainer.accelerator.unwrap_model(model if model is not None else trainer.model, keep_torch_compile=False)
    return unwrapped if isinstance(unwrapped, _model_classes) else None


def _load_adapters(model: Any, folder: str | os.PathLike) -> None:
    """Load every adapter of ``model`` that ``folder`` holds (the default one at its top level)."""
    found = False
    for name in model.peft_config:
        directory = io.adapter_dir(folder, name)
        if (directory / io.WEIGHTS_NAME).is_file():
            model.load_adapter_tensors(io.read_adapter_weights(directory), name, f"adapter in {directory}")
            found = True
    if not found:
        raise ValueError(f"{folder} holds no {io.WEIGHTS_NAME} for the adapters {', '.join(model.peft_config)}.")


def _wrap_save(original):
    @functools.wraps(original)
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _peftlab_model(self)
        if model is None:
            return original(self, output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        from transformers.trainer import TRAINING_ARGS_NAME

        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as the Trainer does for any model
        return None

    return _save


def _wrap_load_from_checkpoint(original):
    @functools.wraps(original)
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        peft_model = _peftlab_model(self, model)
        if peft_model is None:
            return original(self, resume_from_checkpoint, model)
        return _load_adapters(peft_model, resume_from_checkpoint)

    return _load_from_checkpoint


def _wrap_load_best_model(original):
    @functools.wraps(original)
    def _load_best_model(self) -> None:
        peft_model = _peftlab_model(self)
        if peft_model is None:
            return original(self)
        return _load_adapters(peft_model, self.state.best_model_checkpoint)

    return _load_best_model


def _wrap_create_optimizer(original):
    @functools.wraps(original)
    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        # torch would say only "optimizer got an empty parameter list", not why
        require_trainable(_peftlab_model(self) or self.model, "Trainer")
        return original(self, *args, **kwargs)

    return create_optimizer


def _patch_trainer(module: Any) -> None:
    trainer = module.Trainer
    trainer.create_optimizer = _wrap_create_optimizer(trainer.create_optimizer)
    trainer._save = _wrap_save(trainer._save)
    trainer._load_from_checkpoint = _wrap_load_from_checkpoint(trainer._load_from_checkpoint)
    trainer._load_best_model = _wrap_load_best_model(trainer._load_best_model)


def _wrap_add_fused_lm_head(original):
    @functools.wraps(original)
    def add_fused_lm_head(model: Any, *args: Any, **kwargs: Any) -> None:
        # As TRL does for an HF peft model: the head goes on the transformers model inside.
        return original(model.get_base_model() if isinstance(model, _model_classes) else model, *args, **kwargs)

    return add_fused_lm_head


def _patch_trl_utils(module: Any) -> None:
    original = module.add_fused_lm_head
    module.add_fused_lm_head = _wrap_add_fused_lm_head(original)
    for name, imported in list(sys.modules.items()):  # trainers that imported it already
        if name.startswith("trl.") and getattr(imported, "add_fused_lm_head", None) is original:
            imported.add_fused_lm_head = module.add_fused_lm_head


#: module -> what to wrap in it, once.
_PATCHES = {"transformers.trainer": _patch_trainer, "trl.trainer.utils": _patch_trl_utils}


def _patch(module: Any) -> None:
    if not getattr(module, _MARK, False):
        _PATCHES[module.__name__](module)
        setattr(module, _MARK, True)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the usual finders load transformers.trainer, then patches it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install(model_class: type) -> None:
    """Make HF ``Trainer`` and TRL handle ``model_class`` (peftlab's PeftModel): patch the modules that
    are imported now, and the others as soon as they are."""
    global _model_classes
    if model_class not in _model_classes:
        _model_classes = (*_model_classes, model_class)
    for name in _PATCHES:
        if name in sys.modules:
            _patch(sys.modules[name])
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())

