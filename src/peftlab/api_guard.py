"""Library calls that cannot do what the caller means, refused with what to call instead.

    require_trainable(model, "...")      # an optimizer (ours, or HF Trainer's) over a model with nothing to train
    hf_tuner_class("LoraModel", ...)     # HF's tuner class names, which say what to call instead

(``get_peft_model`` refuses a model that already carries adapters itself: HF peft stacks a second adapter
silently there, and the folder it saves cannot be loaded back.) Torch says "optimizer got an empty parameter list" or
"element 0 of tensors does not require grad" where the cause is how the model was loaded.
"""

from __future__ import annotations

from torch import nn


class NothingToTrainError(ValueError):
    """Training was asked of a model none of whose parameters can change."""


def require_trainable(model: nn.Module, what: str) -> None:
    """Raise NothingToTrainError, saying why, when no parameter of ``model`` requires grad. A model with
    adapter configs (``peft_config``: a PeftModel; this module sits below the model and reads it by that)
    is told which adapters were loaded for inference."""
    if any(p.requires_grad for p in model.parameters()):
        return
    if isinstance(getattr(model, "peft_config", None), dict):
        loaded = [name for name, config in model.peft_config.items() if config.inference_mode]
        if loaded:
            why = (f"its adapter(s) {', '.join(loaded)} were loaded for inference: load with "
                   "PeftModel.from_pretrained(base, folder, is_trainable=True) to train them further")
        else:
            why = "its active adapters have no trainable parameters (set_adapter chooses which train)"
    else:
        why = ("every parameter is frozen, as in a model returned by merge_and_unload() or unload() (peftlab froze "
               "the base): add an adapter with get_peft_model(model, config), or call model.requires_grad_(True) "
               "to fine-tune it in full")
    raise NothingToTrainError(f"{what}: the model has no trainable parameters; {why}.")


def hf_tuner_class(name: str, config_name: str) -> type:
    """HF peft's ``LoraModel``-style class (the tuner inside a PeftModel) under its name, so that HF
    code importing it finds it; building one says what does the same in peftlab."""

    def refuse(cls, *args, **kwargs):
        raise TypeError(
            f"peftlab has no separate {name}: the adapted model is a PeftModel. Use "
            f"get_peft_model(model, {config_name}(...)), which does what HF's {name}(model, config, adapter_name) does, "
            "or inject_adapter_in_model(config, model) for the bare model with adapters inside."
        )

    return type(name, (), {"__new__": refuse, "__doc__": f"HF peft's {name}: see get_peft_model."})
