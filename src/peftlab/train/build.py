"""What a run is made of, from its options: the data, the model with its method, the collator,
and what is saved at the end. ``peftlab train``, ``eval`` and ``merge`` all build through here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from peftlab.assets import load_model_and_tokenizer, load_tokenizer, notice, tokenizer_from
from peftlab.data import CausalLMCollator, ClassificationCollator, TextDataset, load_dataset_spec
from peftlab.data.encoded import TruncationCount, choose_max_length, count_truncation, encode_rows, refuse_if_nothing_to_learn
from peftlab.data.packing import PackedRows, pack_dataset
from peftlab.data.text import TokenWindows, is_plain_text
from peftlab.hf_compat import saved_num_labels
from peftlab.io import LABEL_NAMES_KEY, QUANTIZATION_KEY, QUANTIZATION_NONE, read_adapter_config, read_adapter_metadata
from peftlab.methods import method_named
from peftlab.model import PeftModel, get_peft_model
from peftlab.train.data_init import DataDrivenInit, check_has_data
from peftlab.train.options import DEFAULT_MAX_LENGTH, OptionsError, TrainOptions, default_target_modules

PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
TASKS_BY_PEFT_TYPE = {v: k for k, v in PEFT_TASK_TYPES.items()}
#: How a causal LM's class name ends in its config's ``architectures``.
CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


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
    return {"tokenizer": load_tokenizer(options.model), "max_length": options.max_length or DEFAULT_MAX_LENGTH}


def make_collator(options: TrainOptions, tokenizer) -> Any:
    """The batches of ``options.task``; --max-length unset: the default (causal-LM rows: see :func:`prepare_rows`)."""
    max_length = options.max_length or DEFAULT_MAX_LENGTH
    if options.task == "causal-lm":
        check_causal_lm(options.model, tokenizer)
    if options.task == "seq-cls":
        return ClassificationCollator(tokenizer, max_length=max_length)
    return CausalLMCollator(
        tokenizer, max_length=max_length, chat_template=read_chat_template(options.chat_template),
        train_on_prompt=options.train_on_prompt, packing=options.packing,
    )


def read_chat_template(path: str | None) -> str | None:
    """The text of a --chat-template file (None: the tokenizer's own template)."""
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise OptionsError(f"cannot read --chat-template {path}: {getattr(error, 'strerror', None) or error}.") from None


@dataclasses.dataclass
class PreparedRows:
    """A causal-LM run's data tokenized once, with --max-length resolved and what it cuts."""

    options: TrainOptions
    splits: dict[str, TextDataset]  # "train" and "eval" for a training run; "eval" for peftlab eval
    counts: dict[str, TruncationCount]
    chosen: bool  # --max-length chosen from the data

    def metrics(self) -> dict[str, Any]:
        counted = {k: v for name, count in self.counts.items() for k, v in count.as_metrics(name).items()}
        packed = self.splits.get("train")
        return {**counted, "max_length": self.options.max_length, "max_length_from_data": self.chosen,
                **(packed.as_metrics() if isinstance(packed, PackedRows) else {})}


def prepare_rows(options: TrainOptions, splits: dict[str, TextDataset], tokenizer, model: nn.Module) -> PreparedRows:
    """Causal-LM rows (not plain-text windows) tokenized once as the collator will. --max-length left
    unset becomes the longest row of the first split, up to the model's limit; the rows each split's
    cut truncates are counted and announced (the first split's always), and a first split with
    nothing left to learn is refused. With --packing the "train" split is packed into sequences of
    --max-length (see :func:`peftlab.data.packing.pack_dataset`)."""
    first = next(iter(splits))
    if options.task != "causal-lm" or isinstance(splits[first], TokenWindows):
        return PreparedRows(options, splits, {}, False)
    encoder = make_collator(options, tokenizer)
    splits = {name: encode_rows(data, encoder) for name, data in splits.items()}
    chosen = options.max_length is None
    if chosen:
        limit = position_limit(model)
        options = dataclasses.replace(options, max_length=choose_max_length(splits[first], limit))
        notice(f"--max-length {options.max_length}: the longest {first} row"
               + (f" (capped at the model's {limit} positions)" if limit and options.max_length == limit else "")
               + "; give --max-length to choose")
    collator = make_collator(options, tokenizer)
    counts = {name: count_truncation(data, collator) for name, data in splits.items()}
    refuse_if_nothing_to_learn(counts[first], splits[first].source)
    for name, count in counts.items():
        if count.truncated or name == first:  # the count on every run, even when nothing is cut
            notice(count.describe(f"{name} data"))
    if options.packing and "train" in splits:
        splits["train"] = pack_dataset(splits["train"], collator.fit, collator.max_length, options.seed)
        notice(splits["train"].describe())
        if len(splits["train"]) > 0.9 * splits["train"].examples:
            notice(_packing_advice(options.max_length, chosen, position_limit(model)))
    return PreparedRows(options, splits, counts, chosen)


def _packing_advice(max_length: int, chosen: bool, limit: int | None) -> str:
    """--packing that joins (almost) no rows: sequences of --max-length hold one row each (typically
    --max-length left to the longest row). Said, not refused: the run is still correct."""
    larger = 1 << (4 * max_length - 1).bit_length()  # a power of two, at least 4 rows of the longest length
    larger = min(larger, limit) if limit else larger
    why = " (the longest row, as no --max-length was given)" if chosen else ""
    if larger <= max_length:
        return (f"--packing joins few rows: sequences of --max-length {max_length}{why} hold about one row each, and the "
                f"model has no more positions ({limit}); packing saves little on this data")
    return (f"--packing joins few rows: sequences of --max-length {max_length}{why} hold about one row each; give a larger "
            f"--max-length (e.g. {larger}) to pack several rows per sequence (--batch-size counts sequences)")


def check_causal_lm(model: str, tokenizer, config=None) -> None:
    """A causal LM has a language-model head (its config's architectures say ...ForCausalLM or ...LMHeadModel)
    and an EOS token to end each response with. An encoder (BERT-like) has neither: typically the
    default --model, left in place for a causal-LM dataset."""
    architectures = list(getattr(config, "architectures", None) or [])
    encoder = architectures and not any(name.endswith(CAUSAL_LM_ARCHITECTURES) for name in architectures)
    if tokenizer.eos_token_id is not None and not encoder:
        return
    what = f"a {architectures[0]}" if encoder else "a model whose tokenizer has no EOS token to end a response with"
    which = f"the default --model {model} (for classification)" if model == TrainOptions().model else model
    raise OptionsError(
        f"--task causal-lm needs a decoder language model, but {which} is {what}, not a causal LM. "
        "Give one with --model, e.g. --model smollm2-135m."
    )


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
    if options.task == "causal-lm":
        check_causal_lm(options.model, tokenizer, model.config)
    if options.chat_template is not None:
        # Saved with the run's tokenizer (chat_template.jinja), so what generates from the run
        # (generate, chat, eval --task generate) renders prompts as training did.
        tokenizer.chat_template = read_chat_template(options.chat_template)
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
    """An adapter in the HF PEFT format (for full fine-tuning the whole model), with the tokenizer and
    chat template it was trained with, so generation and serving use the same ones. An adapter whose
    init rewrote the base and could not run again on reload (CorDA, randomized PiSSA) is saved as the
    rank-2r LoRA of the original base (HF's conversion), with its start in ``initial_adapter/``."""
    from peftlab.methods.lora_init.conversion import saved_for_original_base

    if isinstance(model, PeftModel) and saved_for_original_base(model, "default"):
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(Path(out) / INITIAL_ADAPTER))
    else:
        model.save_pretrained(out)
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


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model has (None: not recorded in its config)."""
    config = model.config
    return next((getattr(config, name) for name in ("max_position_embeddings", "n_positions") if getattr(config, name, None)), None)


def check_max_length(max_length: int | None, model: nn.Module, tokenizer: Any = None) -> None:
    """--max-length within the model's position limit (beyond it, position embeddings index out of range),
    and above the special tokens the tokenizer adds (at or below them, no text token is left); None (chosen
    from the data later) passes."""
    if max_length is None:
        return
    special = tokenizer.num_special_tokens_to_add() if tokenizer is not None else 0
    if max_length <= special:
        raise OptionsError(f"--max-length {max_length} leaves no room for text: the tokenizer adds {special} special "
                           f"token(s) to each example; use --max-length {special + 1} or more (typically 64 to 512).")
    limit = position_limit(model)
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
    recorded = read_adapter_metadata(Path(adapter)).get(QUANTIZATION_KEY) if adapter else None
    return None if recorded == QUANTIZATION_NONE else recorded


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
    if (Path(adapter) / "tokenizer_config.json").is_file():  # saved with the adapter: the one it was trained with
        tokenizer = tokenizer_from(Path(adapter), adapter)
    peft_model = PeftModel.from_pretrained(loaded, adapter)  # a LoftQ adapter re-quantizes the base as in training
    if quantization and loftq:
        quantize(peft_model.base_model, double_quant=False)
    return peft_model, tokenizer
