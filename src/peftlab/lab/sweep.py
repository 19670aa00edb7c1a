"""The grid of a comparison: which runs, and each run's options.

    peftlab compare --methods full,lora --set lora.lr=2e-4 --sweep r=4,8 --sweep lora_alpha=r,2r

plans ``full`` once (rank options mean nothing to full fine-tuning) and four LoRA runs,
``lora[r=4,lora_alpha=r]`` ... ``lora[r=8,lora_alpha=2r]``. A run's options come, weakest first,
from the options shared by all runs, its method's ``--set`` overrides, and its sweep values.

Grammar::

    --methods NAME,NAME,...        full, any registered method (lora, dora, qlora, ...); or all
    --set METHOD.OPTION=VALUE      VALUE is read as YAML: 8, 1e-3, true, [query, value]
    --sweep OPTION=V1,V2,...       several --sweep make their cartesian product

Values of ``--sweep`` (and ``--set``):

    lora_alpha       a number, or relative to the run's rank: r, 2r, 0.5r (any option a method
                     declares with ``MethodOption(relative_to=...)`` takes such multiples)
    target_modules   attn (the query and value projections of the model's family), all-linear,
                     or layer names joined by "+": query+value
    any other        a number, true/false, or a word, checked as `peftlab train` checks its flags

Besides the options of `peftlab train`, a sweep may name any field of a method's config that has no
flag of its own (``init_lora_weights=true,pissa``): each run then gets it as ``--method-option
KEY=VALUE`` would give it. A compared method whose config lacks the field is an error; full
fine-tuning, which has no adapter, runs once.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from peftlab.methods import method_named
from peftlab.train.options import (
    FULL_FINE_TUNING,
    METHOD_OPTIONS,
    OptionsError,
    TrainOptions,
    method_defaults,
)

#: What `peftlab compare` runs when --methods is not given: the seed experiment's four.
DEFAULT_METHODS = (FULL_FINE_TUNING, "lora", "dora", "qlora")
#: Options that belong to the comparison, not to a run: each run gets its own method, folder and name.
PER_RUN_OPTIONS = ("method", "out", "resume", "run_name")
#: Options not worth a sweep axis: where output goes and how often it is written.
NOT_SWEEPABLE = (*PER_RUN_OPTIONS, "save_every", "log_every", "device", "method_options", "report_to", "run_group")
#: Config fields the engine fills in itself (what the saved file records), so no sweep may set them.
CONFIG_BOOKKEEPING = ("task_type", "base_model_name_or_path", "revision", "inference_mode")
#: Options of the adapter; full fine-tuning has none, so a sweep over them runs full once.
ADAPTER_OPTIONS = (*METHOD_OPTIONS, "target_modules", "method_options", "quantize")

ATTENTION_ALIAS = "attn"
ALL_LINEAR = "all-linear"
#: ``target_modules=attn``: the query and value projections, the LoRA paper's choice, by model family.
ATTENTION_TARGETS: dict[str, list[str]] = {
    **{family: ["query", "value"] for family in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": ["q_lin", "v_lin"],
    **{family: ["q_proj", "v_proj"]
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3", "opt", "gptj")},
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],  # GPT-2 fuses q, k and v into one layer
}

_MULTIPLE = r"(\d+(?:\.\d*)?|\.\d+)?\s*"
# PyYAML reads 1e-3 (no dot) as a string; such values are numbers here.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass(frozen=True)
class RelativeToRank:
    """An option given as a multiple of another option of the run (its ``relative_to``), e.g.
    ``lora_alpha=2r``."""

    factor: float
    of: str = "r"

    def __str__(self) -> str:
        return self.of if self.factor == 1 else f"{self.factor:g}{self.of}"


@dataclass(frozen=True)
class SweepAxis:
    """One ``--sweep OPTION=V1,V2``: the option and its values, as parsed."""

    option: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the comparison, its options fully resolved and JSON-ready."""

    run_name: str
    method: str
    sweep: dict[str, Any]  # option -> the value as written, e.g. {"lora_alpha": "2r"}
    options: dict[str, Any]  # TrainOptions keyword arguments, method included
    eval_datasets: tuple[str, ...] = ()  # extra labelled sets scored after training (--eval-dataset)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "eval_datasets": list(self.eval_datasets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlannedRun:
        return cls(**{key: data[key] for key in ("run_name", "method", "sweep", "options")},
                   eval_datasets=tuple(data.get("eval_datasets") or ()))


def known_methods() -> list[str]:
    """full, then every registered adapter method."""
    from peftlab.methods import METHODS

    return [FULL_FINE_TUNING, *METHODS]


def expand_methods(text: str) -> list[str]:
    """``"full,lora"`` -> ``["full", "lora"]``; ``"all"`` -> every known method. Unknown names are an error."""
    known = known_methods()
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return known
    if not names:
        raise OptionsError(f"--methods is empty; name some of: {', '.join(known)} (or all).")
    unknown = [name for name in names if name not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionsError(
            f"unknown method {unknown[0]!r} in --methods; available: {', '.join(known)}, or all.{hint}"
        )
    return list(dict.fromkeys(names))


def option_names() -> list[str]:
    return [spec.name for spec in dataclasses.fields(TrainOptions)]


def config_only_options() -> list[str]:
    """The fields of the registered methods' configs that have no option of their own (no flag):
    a sweep sets them through ``method_options``, as ``--method-option KEY=VALUE`` does."""
    from peftlab.methods import METHODS

    named = set(option_names())
    fields = (spec.name for method in METHODS.values() for spec in dataclasses.fields(method.config_class))
    return sorted({name for name in fields if name not in named and name not in CONFIG_BOOKKEEPING})


def sweepable_options() -> list[str]:
    return [*(name for name in option_names() if name not in NOT_SWEEPABLE), *config_only_options()]


def _config_has(method: str, option: str) -> bool:
    return option in {spec.name for spec in dataclasses.fields(method_named(method).config_class)}


def _option_name(text: str, valid: list[str], what: str) -> str:
    name = text.strip().replace("-", "_")
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionsError(f"{what}: unknown option {text.strip()!r}.{hint} Valid options: {', '.join(valid)}.")
    return name


def _parse_value(option: str, text: str) -> Any:
    """One value as written on the command line: relative alpha, a target alias, or a YAML scalar."""
    text = text.strip()
    of = METHOD_OPTIONS[option].relative_to if option in METHOD_OPTIONS else None
    relative = re.fullmatch(_MULTIPLE + re.escape(of), text) if of else None
    if relative:
        return RelativeToRank(float(relative.group(1) or 1), of)
    if option == "target_modules" and not text.startswith("["):
        return text  # an alias or names joined by "+", resolved per model family when the run is planned
    if _FLOAT_TEXT.fullmatch(text):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sweep(text: str) -> SweepAxis:
    """``"r=2,4,8"`` -> ``SweepAxis("r", (2, 4, 8))``."""
    option, sep, values = text.partition("=")
    if not sep or not option.strip():
        raise OptionsError(f"--sweep {text!r}: expected OPTION=V1,V2,..., e.g. --sweep r=4,8,16.")
    name = _option_name(option, sweepable_options(), f"--sweep {text}")
    parsed = [_parse_value(name, value) for value in values.split(",") if value.strip()]
    if not parsed:
        raise OptionsError(f"--sweep {text!r}: no values; e.g. --sweep {name}=V1,V2.")
    unique = list(dict.fromkeys(parsed))
    return SweepAxis(name, tuple(unique))


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"lora.lr=1e-3"`` -> ``("lora", "lr", 0.001)``."""
    target, sep, value = text.partition("=")
    method, dot, option = target.partition(".")
    if not sep or not dot or not method.strip() or not option.strip():
        raise OptionsError(f"--set {text!r}: expected METHOD.OPTION=VALUE, e.g. --set lora.lr=1e-3.")
    valid = [name for name in option_names() if name not in PER_RUN_OPTIONS]
    name = _option_name(option, valid, f"--set {text}")
    return method.strip(), name, _parse_value(name, value)


def collect_overrides(texts: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """The ``--set`` flags by method; naming a method that is not compared is an error."""
    overrides: dict[str, dict[str, Any]] = {}
    for text in texts:
        method, option, value = parse_override(text)
        if method not in methods:
            raise OptionsError(f"--set {text!r}: {method!r} is not among the compared methods ({', '.join(methods)}).")
        overrides.setdefault(method, {})[option] = value
    return overrides


@functools.lru_cache(maxsize=None)
def model_config(model: str) -> Any:
    """The ``transformers`` config of a model alias, folder or hub id (no weights are read)."""
    from transformers import AutoConfig

    from peftlab.assets import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model))


def model_family(model: str) -> str:
    """The ``model_type`` of a model alias, folder or hub id (reads only its config)."""
    return model_config(model).model_type


def methods_for_model(methods: list[str], model: str) -> tuple[list[str], dict[str, str]]:
    """``--methods all`` on ``model``: the methods that can run on it, and why each other one cannot
    (``check_model_config`` of a method that patches the model), so that "all" never plans a run bound to fail."""
    from peftlab.methods import METHODS
    from peftlab.methods.capabilities import PatchesTheModel

    config = model_config(model)
    usable, left_out = [], {}
    for name in methods:
        try:
            if name in METHODS and isinstance(METHODS[name], PatchesTheModel):
                METHODS[name].check_model_config(config)
            usable.append(name)
        except ValueError as error:
            left_out[name] = str(error)
    return usable, left_out


def resolve_target_modules(value: Any, model: str, family_of: Callable[[str], str]) -> Any:
    """``attn`` -> the family's query/value layers; ``a+b`` -> ``[a, b]``; lists and all-linear as given."""
    if isinstance(value, str):
        names = [name.strip() for name in re.split(r"[+,]", value) if name.strip()]
    else:
        names = value
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    if names != [ATTENTION_ALIAS]:
        return names
    family = family_of(model)
    if family not in ATTENTION_TARGETS:
        raise OptionsError(
            f"target_modules=attn: no attention layers known for model family {family!r} ({model}); "
            f"name them instead, e.g. target_modules=q_proj+v_proj, or use all-linear."
        )
    return list(ATTENTION_TARGETS[family])


def _shared_for(method: str, shared: dict[str, Any]) -> dict[str, Any]:
    """The shared options a run of ``method`` takes: full fine-tuning has no adapter, so not the adapters' ones."""
    if method != FULL_FINE_TUNING:
        return shared
    return {k: v for k, v in shared.items() if k not in ADAPTER_OPTIONS or k == "quantize"}


def _resolve(method: str, options: dict[str, Any], family_of: Callable[[str], str]) -> dict[str, Any]:
    resolved = dict(options)
    for name, value in options.items():
        if isinstance(value, RelativeToRank):
            base = resolved.get(value.of) or method_defaults(method).get(value.of)
            if base is None:
                raise OptionsError(f"{name}={value} needs {value.of}, and {method} has no default {value.of}; set {value.of} too.")
            resolved[name] = value.factor * base
    if resolved.get("target_modules") is not None:
        resolved["target_modules"] = resolve_target_modules(
            resolved["target_modules"], resolved.get("model", TrainOptions.model), family_of
        )
    return resolved


def _label(value: Any) -> Any:
    """How a sweep value is recorded: numbers and words as they are, rank multiples as text ("2r")."""
    return str(value) if isinstance(value, RelativeToRank) else value


def run_name(method: str, sweep: dict[str, Any]) -> str:
    if not sweep:
        return method
    return f"{method}[{','.join(f'{key}={value}' for key, value in sweep.items())}]"


def plan_runs(
    shared: dict[str, Any],
    methods: list[str],
    overrides: dict[str, dict[str, Any]] | None = None,
    axes: list[SweepAxis] | None = None,
    family_of: Callable[[str], str] = model_family,
) -> list[PlannedRun]:
    """Every run of the comparison, in method order, then sweep order; each checked as TrainOptions."""
    overrides, axes = overrides or {}, axes or []
    swept = [axis.option for axis in axes]
    repeated = sorted({option for option in swept if swept.count(option) > 1})
    if repeated:
        raise OptionsError(f"--sweep {repeated[0]} is given twice; put all its values in one: --sweep {repeated[0]}=V1,V2.")
    in_config = set(config_only_options()) & set(swept)
    runs: list[PlannedRun] = []
    for method in methods:
        own_axes = [axis for axis in axes if not (method == FULL_FINE_TUNING
                                                  and (axis.option in ADAPTER_OPTIONS or axis.option in in_config))]
        lacking = [option for option in sorted(in_config) if method != FULL_FINE_TUNING and not _config_has(method, option)]
        if lacking:
            raise OptionsError(f"--sweep {lacking[0]}: method {method!r} has no option {lacking[0]!r}; "
                               f"compare it without this sweep.")
        for combination in itertools.product(*(axis.values for axis in own_axes)):
            values = {axis.option: value for axis, value in zip(own_axes, combination)}
            sweep = {option: _label(value) for option, value in values.items()}
            name = run_name(method, sweep)
            merged = {**_shared_for(method, shared), **overrides.get(method, {}),
                      **{option: value for option, value in values.items() if option not in in_config},
                      "method": method}
            config_values = {option: value for option, value in values.items() if option in in_config}
            if config_values:  # a config field without a flag of its own rides in method_options
                merged["method_options"] = {**(merged.get("method_options") or {}), **config_values}
            if method != FULL_FINE_TUNING:
                merged = method_named(method).for_comparison(merged)
            try:
                options = _resolve(method, merged, family_of)
                TrainOptions(**options).with_method_defaults()
            except OptionsError as error:
                raise OptionsError(f"run {name}: {error}") from None
            runs.append(PlannedRun(name, method, sweep, options))
    return runs
