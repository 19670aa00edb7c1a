"""Every option of a training run, in one dataclass that the flags and the YAML file both come from.

    peftlab train --method dora --epochs 2 --config run.yaml     # flags override the file
    TrainOptions(method="dora", epochs=2)                        # the same run from Python

Each field has a type, a default and its help text; :func:`add_train_arguments` makes the
argparse flags from them (``lora_alpha`` -> ``--lora-alpha``) and :func:`read_config_file`
checks a YAML file against them (keys may be written ``lora_alpha`` or ``lora-alpha``). A value
of the wrong type and a misspelled key are errors that say what to write instead.

The fields are the run's own, written out below, plus one per option the registered methods
declare (``Method.options``: ``r``, ``lora_alpha``, ...), added to the class by
:func:`_with_method_option_fields` before ``@dataclass`` reads it: nothing here names a method's
fields, and a new method's option needs no edit here. A type checker sees the run's fields; a
method's option is read with ``getattr(options, name)``. Options left ``None`` take the method's default
(``Method.run_defaults``, see :func:`method_defaults`) and, for ``target_modules``, the
model family's (:data:`DEFAULT_TARGET_MODULES`); the run records the resolved values in metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from peftlab.methods import METHODS, MethodOption
from peftlab.optim import OPTIMIZERS, SCHEDULERS
from peftlab.train.option_ranges import range_error
from peftlab.trackers import NO_TRACKER, TRACKERS

TASKS = ("seq-cls", "causal-lm")
FULL_FINE_TUNING = "full"
QUANTIZATIONS = ("nf4",)
#: How processes share a run under torchrun / accelerate launch (see peftlab.train.distributed).
STRATEGIES = ("auto", "ddp", "fsdp")

#: --max-length where it is not chosen from the data (classification, plain-text windows).
DEFAULT_MAX_LENGTH = 64

#: Full fine-tuning's defaults: a learning rate ~20x below the adapters' (see ``LoraMethod.run_defaults``).
FULL_FINE_TUNING_DEFAULTS: dict[str, Any] = {"lr": 5e-5}


def method_defaults(method: str) -> dict[str, Any]:
    """The values a run of ``method`` takes for options left unset (``Method.run_defaults``)."""
    return FULL_FINE_TUNING_DEFAULTS if method == FULL_FINE_TUNING else METHODS[method].run_defaults

#: LoRA targets when --target-modules is not given, by ``config.model_type``. BERT-like encoders and
#: Llama-like decoders: every linear layer of the blocks (attention and MLP), which the QLoRA paper
#: found necessary to match full fine-tuning; GPT-2: the fused attention projection ``c_attn``, the
#: LoRA paper's choice and the seed experiment's. Any other family: all linear layers.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    **{t: ["query", "key", "value", "dense"] for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    **{t: "all-linear" for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "smollm3")},
    "gpt2": ["c_attn"],
}
FALLBACK_TARGET_MODULES = "all-linear"


def _gather_method_options() -> dict[str, MethodOption]:
    """Every option a registered method declares, once; two declarations must agree on the type."""
    options: dict[str, MethodOption] = {}
    for method in METHODS.values():
        for name, option in method.options.items():
            if name in options and options[name].kind is not option.kind:
                raise TypeError(f"option {name!r} is declared as {options[name].kind.__name__} and {option.kind.__name__}.")
            options.setdefault(name, option)
    return options


#: The command-line options of the registered methods, by config field name.
METHOD_OPTIONS = _gather_method_options()


class OptionsError(ValueError):
    """An option has a wrong name, type or value; the message says what to write instead."""


def _option(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:
    metadata = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _method_option_help(name: str, option: MethodOption) -> str:
    by_value: dict[Any, list[str]] = {}
    for method in METHODS.values():
        if name in method.options and name in method.run_defaults:
            by_value.setdefault(method.run_defaults[name], []).append(method.name)
    defaults = "; ".join(f"{', '.join(names)}: {value}" for value, names in by_value.items())
    return f"{option.help} (default for {defaults})" if defaults else option.help


def _with_method_option_fields(cls: type) -> type:
    """One field per registered method option (``int | None`` for ``r``, ...; None: the method's default),
    added to the class body before ``@dataclass`` turns it into fields."""
    for name, option in METHOD_OPTIONS.items():
        cls.__annotations__[name] = option.kind | None
        setattr(cls, name, _option(None, _method_option_help(name, option)))
    return cls


@dataclass
@_with_method_option_fields
class TrainOptions:
    """Every option of a training run: the run's own fields below, then the registered methods' options."""

    if TYPE_CHECKING:  # the methods' options are keywords too (added at class creation, unseen by checkers)
        def __init__(self, **options: Any) -> None: ...

    # -- model and data ----------------------------------------------------------------------------
    model: str = _option("minilm-l6", "offline alias (minilm-l6, smollm2-135m), local model folder, or hub id")
    task: str = _option("seq-cls", "what the model learns (on the command line: by default told from the data's columns)", choices=TASKS)
    dataset: str = _option("sst2", "sst2, rt-snippets, a .csv/.tsv/.jsonl/.json file, a folder with train.* and validation.*, or plain text for causal LM (shakespeare, a .txt file); causal-LM rows: chat messages, prompt/completion, prompt/response, Alpaca instruction/input/output, or text")
    data_dir: str | None = _option(None, "folder with SST-2's GLUE files (train.tsv, validation.tsv)")
    max_train_samples: int | None = _option(None, "train on this many examples, drawn with --seed (default: all)")
    max_eval_samples: int | None = _option(None, "evaluate on this many validation examples (default: all)")
    max_length: int | None = _option(
        None, f"truncate inputs to this many tokens (default: {DEFAULT_MAX_LENGTH} for classification and plain-text "
        "windows; for causal-LM rows the longest training row, up to the model's limit)"
    )
    chat_template: str | None = _option(
        None, "a Jinja chat template file (.jinja) for conversations, instead of the tokenizer's own"
    )
    train_on_prompt: bool = _option(
        False, "causal LM: learn every token, not only the responses (assistant turns and their end-of-turn)"
    )
    packing: bool = _option(
        False, "causal LM: pack the training rows end to end into sequences of --max-length tokens (best fit, "
        "attention kept within each example); --batch-size then counts sequences"
    )
    # -- method ------------------------------------------------------------------------------------
    method: str = _option("lora", f"full (full fine-tuning) or a registered method: {', '.join(METHODS)}")
    quantize: str | None = _option(None, "quantize the frozen base before adding the adapter", choices=QUANTIZATIONS)
    target_modules: list[str] | None = _option(
        None, "comma-separated layer names, or all-linear (default by model family: BERT-like query,key,value,dense; Llama-like all-linear; GPT-2 c_attn)"
    )
    method_options: dict[str, Any] = _option(
        {}, "any other option of the method's config, e.g. use_rslora=true (repeatable)", flag="--method-option"
    )
    # -- optimization ------------------------------------------------------------------------------
    optimizer: str = _option(
        "adamw", "optimizer (adamw_8bit, paged_adamw_8bit: bitsandbytes, CUDA only)", choices=OPTIMIZERS
    )
    lr: float | None = _option(None, "peak learning rate (default: 1e-3 for adapters, 5e-5 for full)")
    weight_decay: float = _option(0.0, "decoupled weight decay on matrices (not biases, norms, vectors)")
    momentum: float = _option(0.9, "SGD momentum")
    scheduler: str = _option("linear", "learning-rate decay after warmup", choices=SCHEDULERS)
    warmup_ratio: float = _option(0.06, "fraction of the steps spent warming the learning rate up from 0")
    epochs: int = _option(1, "passes over the training data (ignored when --max-steps is given)")
    max_steps: int | None = _option(None, "stop after this many optimizer steps")
    batch_size: int = _option(32, "examples per micro-batch, over all processes together")
    grad_accum: int = _option(1, "micro-batches per optimizer step (effective batch = batch size x this)")
    max_grad_norm: float | None = _option(1.0, "clip the gradient norm to this (0 or none: no clipping)")
    bf16: bool = _option(False, "run forward and backward under bfloat16 autocast")
    gradient_checkpointing: bool = _option(False, "recompute activations in backward to save memory")
    device: str = _option("auto", "where to train (auto: cuda if available)", choices=("auto", "cpu", "cuda"))
    strategy: str = _option(
        "auto", "with several processes: ddp (a whole model each), fsdp (FSDP2: each holds a shard); "
        "auto: fsdp under an accelerate FSDP config, else ddp", choices=STRATEGIES,
    )
    # -- evaluation, logging, checkpoints -----------------------------------------------------------
    eval_batch_size: int = _option(64, "examples per evaluation batch")
    eval_every: int | None = _option(None, "evaluate every N optimizer steps (always at the end)")
    log_every: int = _option(10, "write a metrics.jsonl line every N optimizer steps")
    report_to: list[str] = _option(
        [], f"also log the metrics and options to these trackers: {', '.join(TRACKERS)}, or {NO_TRACKER} "
        "(comma-separated or repeated; each is an extra: pip install 'peftlab[tensorboard]')",
    )
    run_name: str | None = _option(None, "the run's name in the trackers (default: the --out folder's name)")
    run_group: str | None = _option(
        None, "the trackers' group for this run: W&B group, MLflow experiment (compare and study: their folder's name)"
    )
    save_every: int | None = _option(None, "write a checkpoint every N optimizer steps")
    resume: str | None = _option(None, "continue from a checkpoint folder, or the newest one in a run folder")
    seed: int = _option(42, "seed for initialisation, data order, sampling and dropout")
    out: str = _option("runs/train", "output folder: adapter (or model), metrics, checkpoints")
    overwrite: bool = _option(False, "replace the run already in --out (by default a folder holding one is refused)")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, _checked(spec, hints[spec.name], getattr(self, spec.name)))
        self._take_named_method_options(hints)
        self._check_ranges()
        self.report_to = _checked_trackers(self.report_to)

    def _take_named_method_options(self, hints: dict[str, Any]) -> None:
        """``--method-option r=4`` is ``--r 4``; given both ways it is an error, not one silently winning."""
        fields = {spec.name: spec for spec in dataclasses.fields(self)}
        for key in [k for k in self.method_options if k in fields]:
            value = self.method_options[key]
            flag = "--" + key.replace("_", "-")
            if key not in METHOD_OPTIONS and key != "target_modules":
                raise OptionsError(f"{key} is a run option, not a method option: give it as {flag} {value}.")
            if getattr(self, key) is not None:
                raise OptionsError(
                    f"{key} is given twice: {flag} {getattr(self, key)!r} and --method-option {key}={value!r}; keep one."
                )
            setattr(self, key, _checked(fields[key], hints[key], value))
            self.method_options = {k: v for k, v in self.method_options.items() if k != key}

    def _check_ranges(self) -> None:
        for name in (spec.name for spec in dataclasses.fields(self)):
            error = range_error(name, getattr(self, name))
            if error:
                raise OptionsError(error)
        for name, option in METHOD_OPTIONS.items():
            error = option.check(name, getattr(self, name))
            if error:
                raise OptionsError(error)

    # -- methods -----------------------------------------------------------------------------------

    @property
    def is_full_fine_tuning(self) -> bool:
        return self.method == FULL_FINE_TUNING

    @property
    def quantization(self) -> str | None:
        """The quantization of the base: --quantize, else the method's own (nf4 for qlora)."""
        if self.quantize or self.is_full_fine_tuning:
            return self.quantize
        return METHODS[self.method].quantization if self.method in METHODS else None

    def with_method_defaults(self) -> TrainOptions:
        """A copy with unset options filled from the method's defaults; an unknown method, or an
        option the method does not have, is an error."""
        known = sorted({*METHODS, FULL_FINE_TUNING})
        if self.method not in known:
            close = difflib.get_close_matches(self.method, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionsError(f"unknown method {self.method!r}; available methods: {', '.join(known)}.{hint}")
        if self.is_full_fine_tuning and self.quantize:
            raise OptionsError("--quantize needs an adapter method: a quantized base cannot be fine-tuned in full.")
        own = {} if self.is_full_fine_tuning else METHODS[self.method].options
        foreign = [name for name in METHOD_OPTIONS if getattr(self, name) is not None and name not in own]
        if self.is_full_fine_tuning:  # full fine-tuning has no adapter: its options would do nothing
            foreign += [name for name in ("target_modules", "method_options") if getattr(self, name)]
        if foreign:
            raise OptionsError(
                f"method {self.method!r} has no option {foreign[0]!r}; its options: {', '.join(own) or 'none'} "
                "(others through --method-option KEY=VALUE)."
            )
        unset = {name: value for name, value in method_defaults(self.method).items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset)

    def adapter_options(self) -> dict[str, Any]:
        """The keyword options for the method's config: its declared options that are set, then --method-option."""
        named = {name: getattr(self, name) for name in (*METHODS[self.method].options, "target_modules")}
        return {**{k: v for k, v in named.items() if v is not None}, **self.method_options}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _checked_trackers(names: list[str] | str) -> list[str]:
    """``--report-to`` as a list of distinct tracker names; ``none`` is the empty list."""
    names = [names] if isinstance(names, str) else names  # "all-linear" handling hands a lone name back as text
    unknown = [name for name in names if name not in (*TRACKERS, NO_TRACKER)]
    if unknown:
        raise OptionsError(f"unknown tracker {unknown[0]!r} in report_to; the trackers: {', '.join(TRACKERS)}, or {NO_TRACKER}.")
    if NO_TRACKER in names and len(set(names)) > 1:
        raise OptionsError(f"report_to: {NO_TRACKER!r} cannot be combined with trackers ({', '.join(names)}); keep one.")
    return list(dict.fromkeys(name for name in names if name != NO_TRACKER))


def default_target_modules(model_type: str) -> list[str] | str:
    return DEFAULT_TARGET_MODULES.get(model_type, FALLBACK_TARGET_MODULES)


# -- types -------------------------------------------------------------------------------------------


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``list[str]`` -> ``(list, False)``."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, annotation = True, args[0]
    return typing.get_origin(annotation) or annotation, optional


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list of names (or one comma-separated string)", dict: "a mapping of option: value"}
# PyYAML reads 1e-3 (no dot) as a string; accept such strings for number options.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _checked(spec: dataclasses.Field, annotation: Any, value: Any) -> Any:
    kind, optional = _base_type(annotation)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)
    if kind is list and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if kind is list and isinstance(value, list) and len(value) == 1 and value[0] == "all-linear":
        value = "all-linear"
    well_typed = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: value == "all-linear" or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        dict: isinstance(value, dict),
    }[kind]
    if not well_typed:
        expected = _TYPE_NAMES[kind] + (" (or null)" if optional else "")
        raise OptionsError(
            f"option {spec.name!r} must be {expected}, got {value!r} ({type(value).__name__}); "
            f"e.g. {spec.name}: {_example(kind)}"
        )
    if kind is float:
        value = float(value)
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise OptionsError(f"option {spec.name!r} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def _example(kind: Any) -> str:
    return {bool: "true", int: "8", float: "0.001", str: "text", list: "[query, value]", dict: "{use_rslora: true}"}[kind]


# -- the YAML file ------------------------------------------------------------------------------------


def _field_names() -> list[str]:
    return [spec.name for spec in dataclasses.fields(TrainOptions)]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error (safe_load keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            value = self.construct_object(value_node, deep=deep)
            if key in seen and seen[key] != value:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice, as {seen[key]!r} and {value!r}; keep one", key_node.start_mark)
            seen[key] = value
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a YAML file, keys normalised to field names; unknown keys name the closest one."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except OSError as error:
        raise OptionsError(f"cannot read config file {path}: {error.strerror or error}.") from None
    except yaml.YAMLError as error:
        raise OptionsError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"config file {path} must be a mapping of option: value, got {type(data).__name__}.")
    names = _field_names()
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(names)}."
            raise OptionsError(f"config file {path}: unknown key {key!r}.{hint}")
        if name in options and options[name] != value:
            raise OptionsError(f"config file {path}: {name} is given twice, as {options[name]!r} and {value!r}; keep one.")
        options[name] = value
    return options


def _resumed_options(resume: str) -> dict[str, Any]:
    """The saved options of the run ``resume`` points into, with ``out`` that run's folder."""
    from peftlab.train.checkpoint import find_checkpoint, saved_options

    names = _field_names()
    saved = {k: v for k, v in saved_options(resume).items() if k in names and k not in ("resume", "overwrite")}
    return {**saved, "out": str(find_checkpoint(resume).parent)}


# -- the flags ------------------------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)  # YAML typing: 8 -> int, true -> bool, [a, b] -> list


def _refuse_a_second_value(namespace: argparse.Namespace, dest: str, value: Any, option_string: str | None) -> None:
    """The same flag given twice with different values is an error, not the last one silently winning."""
    if hasattr(namespace, dest) and getattr(namespace, dest) != value:
        raise argparse.ArgumentError(None, f"{option_string} is given twice with different values "
                                           f"({getattr(namespace, dest)!r} and {value!r}); keep one.")


class _StoreOnce(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        _refuse_a_second_value(namespace, self.dest, value, option_string)
        setattr(namespace, self.dest, value)


class _BooleanOnce(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            _refuse_a_second_value(namespace, self.dest, not option_string.startswith("--no-"), "/".join(self.option_strings))
        super().__call__(parser, namespace, values, option_string)


class _ExtendNames(argparse.Action):
    """A list flag adds to the list each time it is given: ``--report-to tensorboard --report-to mlflow``."""

    def __call__(self, parser, namespace, value, option_string=None):
        names = [part.strip() for part in value.split(",") if part.strip()]
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *names])


class _CollectKeyValues(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        collected = dict(getattr(namespace, self.dest, None) or {})
        if value[0] in collected and collected[value[0]] != value[1]:
            raise argparse.ArgumentError(self, f"{value[0]} is given twice with different values "
                                               f"({collected[value[0]]!r} and {value[1]!r}); keep one.")
        collected[value[0]] = value[1]
        setattr(namespace, self.dest, collected)


def add_train_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per TrainOptions field (or per field in ``only``), plus --config for the full set.

    Flags not given stay out of the namespace, so a config file's values are not overridden by defaults.
    """
    hints = typing.get_type_hints(TrainOptions)
    if only is None:
        parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file; flags given too win")
    for spec in dataclasses.fields(TrainOptions):
        if only is not None and spec.name not in only:
            continue
        kind, _ = _base_type(hints[spec.name])
        flag = spec.metadata["flag"] or "--" + spec.name.replace("_", "-")
        default = spec.default_factory() if callable(spec.default_factory) else spec.default
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS}
        kwargs["help"] = spec.metadata["help"] + ("" if default in (None, {}, []) else f" (default: {default})")
        if kind is bool:
            kwargs["action"] = _BooleanOnce
        elif kind is dict:
            kwargs.update(action=_CollectKeyValues, type=_key_value, metavar="KEY=VALUE")
        elif kind is list:
            kwargs.update(action=_ExtendNames, metavar="NAME,NAME")
        else:
            kwargs.update(action=_StoreOnce, type=kind, choices=spec.metadata["choices"])
        parser.add_argument(flag, **kwargs)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Defaults, then the options of the run being resumed (so a bare ``--resume DIR`` continues it
    as it was), then the --config file, then the flags given."""
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    given = {name: getattr(args, name) for name in _field_names() if hasattr(args, name)}
    resume = given.get("resume") or values.get("resume")
    resumed = _resumed_options(resume) if resume else {}
    for later in (values, given):
        if "method_options" in later and "method_options" in resumed:
            later["method_options"] = {**resumed["method_options"], **later["method_options"]}
    if "method_options" in given and "method_options" in values:
        given["method_options"] = {**values["method_options"], **given["method_options"]}
    merged = {**resumed, **values, **given}
    if "task" not in merged and "dataset" in merged:  # --task not given: the data says which
        from peftlab.data.datasets import task_of_dataset

        merged["task"] = task_of_dataset(merged["dataset"], merged.get("data_dir"))
    try:
        return TrainOptions(**merged)
    except OptionsError as error:
        source = f" (in {args.config} or the flags)" if getattr(args, "config", None) else ""
        raise OptionsError(f"{error}{source}") from None
