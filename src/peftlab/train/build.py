"""What a run is made of, from its options: the data, the model with its method, the collator,
and what is saved at the end. ``peftlab train``, ``eval`` and ``merge`` all build through here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.assets import load_model_and_tokenizer, load_tokenizer
from peftlab.data import CausalLMCollator, ClassificationCollator, TextDataset, load_dataset_spec
from peftlab.data.text import is_plain_text
from peftlab.hf_compat import saved_num_labels
from peftlab.io import LABEL_NAMES_KEY, QUANTIZATION_KEY, read_adapter_config, read_adapter_metadata
from peftlab.methods import method_named
from peftlab.model import PeftModel, get_peft_model
from peftlab.train.data_init import DataDrivenInit, check_has_data
from peftlab.train.options import OptionsError, TrainOptions, default_target_modules

PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
TASKS_BY_PEFT_TYPE = {v: k for k, v in PEFT_TASK_TYPES.items()}


def load_datasets(options: TrainOptions) -> tuple[TextDataset, TextDataset]:
    """The training subset (``max_train_samples`` drawn with ``seed``) and the validation split."""
    train = load_dataset_spec(
        options.dataset, "train", data_dir=options.data_dir, max_samples=options.max_train_samples,
        seed=options.seed, task=options.task, **_text_windowing(options),
    )
    validation = load_eval_dataset(options, getattr(train, "num_labels", None))
    return train, validation


def load_eval_dataset(
    options: TrainOptions, num_labels: int | None, label_names: tuple[str, ...] | None = None, held_out: bool = True,
    stride: int | None = None,
) -> TextDataset:
    """The validation split (a single file: its held-out part, or all of it with ``held_out=False``);
    ``label_names``: the classes a trained classifier knows, which the labels must be among;
    ``stride``: where plain-text windows start (see :mod:`peftlab.data.text`)."""
    return load_dataset_spec(
        options.dataset, "validation", data_dir=options.data_dir, max_samples=options.max_eval_samples,
        seed=options.seed, task=options.task, num_labels=num_labels, label_names=label_names, held_out=held_out,
        stride=stride, **_text_windowing(options),
    )


def _text_windowing(options: TrainOptions) -> dict[str, Any]:
    """Plain text is cut into windows of the model's tokens: its tokenizer and the window length."""
    if not is_plain_text(options.dataset):
        return {}
    return {"tokenizer": load_tokenizer(options.model), "max_length": options.max_length}


def make_collator(options: TrainOptions, tokenizer) -> Any:
    collator = ClassificationCollator if options.task == "seq-cls" else CausalLMCollator
    return collator(tokenizer, max_length=options.max_length)


def quantize(model: nn.Module, double_quant: bool = True) -> None:
    """NF4 for every linear layer but the heads, in place (the QLoRA base)."""
    from peftlab.quant import quantize_model

    quantize_model(model, double_quant=double_quant)


def quantizes_itself(init_lora_weights: Any) -> bool:
    """LoftQ quantizes the full-precision weights itself: the adapter is built (or loaded) first, and the
    base then stored in NF4 without double quantization, which holds LoftQ's codes exactly (lora_init/loftq.py)."""
    return init_lora_weights == "loftq"


def build_model(
    options: TrainOptions, num_labels: int | None, label_names: tuple[str, ...] | None = None,
    init_data: DataDrivenInit | None = None,
) -> tuple[nn.Module, Any, TrainOptions]:
    """The model ready to train: quantized if asked, with the method's adapter (or all trainable for
    full fine-tuning). Returns the options with ``target_modules`` resolved for this model.
    ``label_names`` become the classifier's ``id2label``, saved with the adapter or model so that
    ``peftlab eval`` maps class names as training did. ``init_data``: the run's data, which EVA and CorDA
    start from (``data_init.py``)."""
    model, tokenizer = load_model_and_tokenizer(options.model, options.task, num_labels=num_labels or 2)
    if options.task == "seq-cls" and label_names:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    loftq = not options.is_full_fine_tuning and quantizes_itself(options.adapter_options().get("init_lora_weights"))
    if loftq and not options.quantization:
        raise OptionsError(
            "init_lora_weights=loftq fits the adapter to the error of a 4-bit base, but this run's base is not "
            "quantized: use --method qlora (or --quantize nf4 with a LoRA-family method), or another init."
        )
    if options.quantization and not loftq:
        quantize(model)
    if options.is_full_fine_tuning:
        check_max_length(options.max_length, model, tokenizer)
        model.requires_grad_(True)
        return model, tokenizer, options
    if options.target_modules is None:
        options = dataclasses.replace(options, target_modules=default_target_modules(model.config.model_type))
    adapter_options = options.adapter_options()
    if loftq:  # the CLI's LoftQ needs no sub-config: HF's defaults (4 bits, one alternation)
        adapter_options.setdefault("loftq_config", {"loftq_bits": 4, "loftq_iter": 1})
    try:
        config = method_named(options.method).make_config(  # the base is quantized above when the method asks
            task_type=PEFT_TASK_TYPES[options.task],
            base_model_name_or_path=options.model,
            **adapter_options,
        )
    except TypeError as error:  # an option the method's config does not have
        raise OptionsError(f"method {options.method!r} does not take these options: {error}{_init_hint(error)}") from None
    init = getattr(config, "init_lora_weights", None)
    check_has_data(init, init_data)
    if init_data is not None:
        init_data.before_adapter(model, tokenizer, config)
    model = get_peft_model(model, config)
    if init_data is not None:
        init_data.after_adapter(model, tokenizer)
    if loftq:
        quantize(model.base_model, double_quant=False)
    check_max_length(options.max_length, model, tokenizer)  # after the method: it may extend the context
    return model, tokenizer, options


def _init_hint(error: Exception) -> str:
    if "init_lora_weights" not in str(error):
        return ""
    from peftlab.methods import METHODS
    from peftlab.methods.lora import LoraConfig

    family = ", ".join(name for name, method in METHODS.items() if issubclass(method.config_class, LoraConfig))
    return f"; the LoRA initialisations (init_lora_weights) run on {family}."


#: Where a run keeps the adapter as it started, for the adapters it saves converted (below).
INITIAL_ADAPTER = "initial_adapter"


def save_trained(model: nn.Module, tokenizer, out: Path) -> None:
    """An adapter in the HF PEFT format; for full fine-tuning the whole model and its tokenizer. An adapter
    whose init rewrote the base and could not run again on reload (CorDA, randomized PiSSA) is saved as
    the rank-2r LoRA of the original base (HF's conversion), with its start in ``initial_adapter/``."""
    from peftlab.methods.lora_init.conversion import saved_for_original_base

    if isinstance(model, PeftModel) and saved_for_original_base(model, "default"):
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(Path(out) / INITIAL_ADAPTER))
        return
    model.save_pretrained(out)
    if not isinstance(model, PeftModel):
        tokenizer.save_pretrained(out)


def base_of(model: str | None, adapter: str | None, task: str | None) -> tuple[str, str]:
    """The base model and task to load: as given, else as the adapter's adapter_config.json records."""
    if adapter is None:
        if model is None:
            raise OptionsError("give --model (a model folder or alias), --adapter (an adapter folder), or both.")
        return model, task or "seq-cls"
    saved = read_adapter_config(Path(adapter))
    model = model or saved.get("base_model_name_or_path")
    if not model:
        raise OptionsError(f"{adapter}/adapter_config.json names no base model; give it with --model.")
    return model, task or TASKS_BY_PEFT_TYPE.get(saved.get("task_type") or "", "seq-cls")


def check_max_length(max_length: int, model: nn.Module, tokenizer: Any = None) -> None:
    """--max-length within the model's position limit (beyond it, position embeddings index out of range),
    and above the special tokens the tokenizer adds (at or below them, no text token is left)."""
    special = tokenizer.num_special_tokens_to_add() if tokenizer is not None else 0
    if max_length <= special:
        raise OptionsError(f"--max-length {max_length} leaves no room for text: the tokenizer adds {special} special "
                           f"token(s) to each example; use --max-length {special + 1} or more (typically 64 to 512).")
    config = model.config
    limit = next((getattr(config, name) for name in ("max_position_embeddings", "n_positions") if getattr(config, name, None)), None)
    if limit is not None and max_length > limit:
        raise OptionsError(f"--max-length {max_length} is above the model's limit of {limit} positions; use --max-length {limit} or less.")


def saved_run_options(folder: str | Path | None) -> dict[str, Any]:
    """The options a ``peftlab train`` run recorded in its metrics.json ({} for other folders)."""
    path = Path(folder) / "metrics.json" if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("options") or {})
    except (json.JSONDecodeError, AttributeError, TypeError) as error:
        raise OptionsError(f"{path} is corrupt ({error}); give --max-length, --task and --dataset yourself, or delete it.") from None


def trained_label_names(adapter: str | None, model: str) -> tuple[str, ...] | None:
    """The class names a classifier was trained with: recorded with the adapter, or in a fully
    fine-tuned model's config.json; None when none were recorded."""
    if adapter is not None:
        recorded = read_adapter_metadata(Path(adapter)).get(LABEL_NAMES_KEY)
        return tuple(json.loads(recorded)) if recorded else None
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return None
    id2label = json.loads(config_path.read_text(encoding="utf-8")).get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return tuple(names) if names and names != [f"LABEL_{i}" for i in range(len(names))] else None


def recorded_quantization(adapter: str | None) -> str | None:
    """The 4-bit quantization an adapter's base had in training (recorded by save_pretrained)."""
    return read_adapter_metadata(Path(adapter)).get(QUANTIZATION_KEY) if adapter else None


def load_run(options: TrainOptions, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """A finished run's trained model and tokenizer: the saved model (full fine-tuning) or its base
    with the saved adapter, both in ``options.out``."""
    if options.is_full_fine_tuning:
        return load_trained(options.out, None, options.task, num_labels)
    return load_trained(options.model, options.out, options.task, num_labels, options.quantization)


def load_trained(
    model: str, adapter: str | None, task: str, num_labels: int | None = None, quantization: str | None = None
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for inference: a base or fully fine-tuned model, plus an adapter if given.

    A classifier gets ``num_labels`` classes, else as many as the adapter's saved head has, else 2.
    ``quantization="nf4"`` quantizes the base first, as a QLoRA adapter was trained.
    """
    if adapter is not None and task == "seq-cls":
        num_labels = num_labels or saved_num_labels(adapter)
    loaded, tokenizer = load_model_and_tokenizer(model, task, num_labels=num_labels or 2)
    loftq = adapter is not None and quantizes_itself(read_adapter_config(Path(adapter)).get("init_lora_weights"))
    if quantization and not loftq:
        quantize(loaded)
    if adapter is None:
        return loaded, tokenizer
    peft_model = PeftModel.from_pretrained(loaded, adapter)  # a LoftQ adapter re-quantizes the base as in training
    if quantization and loftq:
        quantize(peft_model.base_model, double_quant=False)
    return peft_model, tokenizer
