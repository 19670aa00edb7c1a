"""Which modules get an adapter.

``target_modules`` is a list of names (a module matches its exact path or a ``.name`` suffix), a
regex string (must match the whole path), or ``"all-linear"`` (every Linear/Conv1D but the output
head). ``exclude_modules`` (same forms), ``layers_to_transform``/``layers_pattern`` and
``modules_to_save`` narrow it down. The semantics are HF peft's, so a config means the same thing
in both libraries.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from peftlab.base import base_view, is_linear_like, supported_types
from peftlab.config import SEQ_CLS_HEAD_NAMES, AdapterConfig

ALL_LINEAR = "all-linear"


def _matches(names: list[str] | str | None, path: str) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def _layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", path))), None)
    return int(found.group(1)) if found else None


def _in_layers(path: str, config: AdapterConfig) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = _layer_index(path, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def candidate_modules(model: nn.Module):
    """``(path, module)`` pairs that an adapter could be put on, skipping peftlab's own wrappers' insides."""
    from peftlab.layer import AdaptedLayer
    from peftlab.modules_to_save import TrainedCopy

    skip_prefixes: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, (AdaptedLayer, TrainedCopy)):
            skip_prefixes.append(path + ".")
        if path:
            yield path, module


def head_names(model: nn.Module, config: AdapterConfig) -> set[str]:
    """The output head (and, for classification, the classifier) that "all-linear" leaves alone."""
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output else None
    if output is not None:
        heads |= {p for p, m in model.named_modules() if m is output}
    elif config.task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, name, None)
            if head is not None:
                heads |= {p for p, m in model.named_modules() if m is head}
                break
    return heads


def expand_all_linear(model: nn.Module, config: AdapterConfig) -> list[str]:
    from peftlab.layer import AdaptedLayer

    heads = head_names(model, config)
    return sorted(
        path
        for path, module in candidate_modules(model)
        if path not in heads and (is_linear_like(module) or (isinstance(module, AdaptedLayer) and is_linear_like(module.base_layer)))
    )


def select_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the modules to adapt, with a clear error when none (or a wrong type) match."""
    targets = config.target_modules
    if targets is None:
        raise ValueError("target_modules is empty: name the layers to adapt, e.g. ['q_proj', 'v_proj'], or 'all-linear'.")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = expand_all_linear(model, config)
    from peftlab.layer import AdaptedLayer

    to_save = config.with_classifier_heads() or []
    matched = [(p, m) for p, m in candidate_modules(model) if _matches(targets, p)]
    if not matched:
        raise ValueError(_nothing_matched_message(model, targets))
    # Each narrowing option in turn, so an empty result blames the one that removed the last module.
    narrowing = [
        ("exclude_modules", lambda p: not _matches(config.exclude_modules, p)),
        ("modules_to_save", lambda p: not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", p) for m in to_save)),
        ("layers_to_transform", lambda p: _in_layers(p, config)),
    ]
    for option, keep in narrowing:
        kept = [(p, m) for p, m in matched if keep(p)]
        if not kept:
            shown = ", ".join(p for p, _ in matched[:3]) + (" ..." if len(matched) > 3 else "")
            raise ValueError(
                f"target_modules matched {len(matched)} module(s) ({shown}) but {option}={getattr(config, option)!r} "
                f"removes every one of them, so nothing would be adapted; {_fix_hint(option, matched, config)}"
            )
        matched = kept
    for _, module in matched:
        base_view(module.base_layer if isinstance(module, AdaptedLayer) else module)  # raises for unsupported types
    return [p for p, _ in matched]


def _fix_hint(option: str, matched: list, config: AdapterConfig) -> str:
    if option == "layers_to_transform":
        found = sorted({i for p, _ in matched if (i := _layer_index(p, config.layers_pattern)) is not None})
        return f"the matched modules are in layers {found}." if found else "the matched modules have no layer index; check layers_pattern."
    return f"narrow {option} or widen target_modules."


def _nothing_matched_message(model: nn.Module, targets) -> str:
    adaptable = [p for p, m in candidate_modules(model) if isinstance(m, supported_types())]
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in adaptable})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close = sorted({c for t in wanted for c in difflib.get_close_matches(str(t).rsplit(".", 1)[-1], leaf_names, n=3, cutoff=0.3)})
    hint = f" Closest module names: {', '.join(close)}." if close else ""
    return (
        f"target_modules {targets!r} matched no module of the model. Adaptable layer names in this model: "
        f"{', '.join(leaf_names[:20])}{' ...' if len(leaf_names) > 20 else ''}.{hint}"
    )
