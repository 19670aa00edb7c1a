"""``peftlab export --to gguf``: the adapter (or the merged model) as GGUF files for llama.cpp and Ollama.

    result = export_gguf(model, tokenizer, out, mode="lora", dtype="f32", base_gguf=None, verify=None)

``--mode lora`` (exact for every method whose update is plain LoRA, ``Method.as_low_rank``):
``adapter.gguf`` plus the base, ``base.gguf`` written from the adapter's base weights unless the
user gives ``--base-gguf`` (checked to hold those weights). ``--mode merged``: ``model.gguf``, the
adapter folded in (what LoRA cannot carry: trained embeddings/norms/heads, DoRA, MoRA, LongLoRA's
RoPE scale; a QLoRA adapter merged into its dequantised 4-bit base). Beside them: an Ollama
``Modelfile``, ``parity.json`` (when verified) and a README. The folder appears only when all of
it is written and, with ``--verify``, the parity is within the dtype's tolerance.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch

from peftlab import io
from peftlab.output_folder import check_output_folder, staged_output
from peftlab.quant import is_quantized
from peftlab.assets import notice
from peftlab.gguf_export import diagnose
from peftlab.gguf_export.base_check import BaseMatch, check_base_gguf
from peftlab.gguf_export.metadata import GGUFExportError, add_tokenizer_keys, copy_tokenizer_keys
from peftlab.gguf_export.modelfile import modelfile
from peftlab.gguf_export.names import LINEAR_FAMILIES, gguf_architecture, module_name
from peftlab.gguf_export.readme import export_readme
from peftlab.gguf_export.verify import (
    ENGINE_SETTINGS, REPORT_ONLY, TOLERANCES, ParityError, Tolerance, engine_parity, failures, load_prompts, peftlab_reference,
)
from peftlab.gguf_export.writer import DTYPES, LORA_DTYPES, lora_tensors, model_tensors, write_lora_gguf, write_model_gguf

MODES = ("lora", "merged")
WHAT = "the GGUF export"
ADAPTER_FILE, BASE_FILE, MERGED_FILE = "adapter.gguf", "base.gguf", "model.gguf"
#: GGUF storage types the verify tolerances know; a base in any other (Q4_1 ...) is measured, not judged.
_JUDGED_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


@dataclass
class GGUFExport:
    folder: Path
    mode: str
    dtype: str
    files: dict[str, str]  # role ("model", "adapter", "base") -> path as the Modelfile names it
    fidelity: str
    base_match: BaseMatch | None = None
    parity: dict | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def export_gguf(
    model, tokenizer, out: str | os.PathLike, *, mode: str = "lora", dtype: str = "f32",
    base_gguf: str | os.PathLike | None = None, verify: bool | None = None, prompts_file: str | os.PathLike | None = None,
    reference_gguf: Path | None = None, adapter_name: str = "default", prompts: list[str] | None = None,
    overwrite: bool = False,
) -> GGUFExport:
    """Write the export folder ``out`` (one holding something is refused unless ``overwrite``); see the
    module docstring. The model is consumed: its adapter is unloaded (lora) or merged (merged), as
    ``merge_and_unload`` does.
    ``reference_gguf``: a GGUF of the same base whose tokenizer keys to copy (the alias's original);
    ``prompts``: what --verify runs (default: the built-in set, plus ``prompts_file``'s lines);
    ``overwrite``: replace what ``out`` holds (only once the new export is complete)."""
    started = time.monotonic()
    out = Path(out)
    config = model.base_model.config
    architecture = gguf_architecture(config)
    _check_options(mode, dtype, verify)
    check_output_folder(out, overwrite, WHAT)
    verify = llama_cpp_available() if verify is None else verify
    base_reader = gguf.GGUFReader(base_gguf) if base_gguf is not None else None
    if mode == "lora":
        factors, fidelity = _lora_factors(model, adapter_name)
    prompts = (prompts or load_prompts(prompts_file)) if verify else []
    reference = peftlab_reference(model, tokenizer, prompts) if verify else None

    quantized = is_quantized(model)
    if quantized:  # QLoRA: the base is the dequantised 4-bit weights, exactly what the adapter was trained on
        from peftlab.quant import dequantize_model

        dequantize_model(model.base_model)
    if mode == "lora":
        base = model.unload()
        trained = None
    else:
        base = _plain_base(model) if verify or base_reader is not None else None
        trained = model.merge_and_unload()
        fidelity = f"exact: the {_method_label(model, adapter_name)} adapter merged into the base's weights" + (
            " (its dequantised 4-bit weights)" if quantized else "")
    base_tensors = model_tensors(config, base.state_dict()) if base is not None else None
    base_match = check_base_gguf(Path(base_gguf), base_reader, architecture, base_tensors) if base_reader is not None else None
    tokenizer_source = base_reader or (gguf.GGUFReader(reference_gguf) if reference_gguf is not None else None)

    def tokenizer_keys(writer: gguf.GGUFWriter) -> None:
        if tokenizer_source is not None:
            copy_tokenizer_keys(writer, tokenizer_source)
        else:
            add_tokenizer_keys(writer, tokenizer, config)

    name = f"{getattr(config, '_name_or_path', '') or architecture}"
    result = GGUFExport(out, mode, dtype, {}, fidelity, base_match)

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".gguf-verify-", dir=folder.parent) as scratch:
            if mode == "lora":
                if base_gguf is not None:
                    base_path = Path(base_gguf).resolve()
                else:
                    base_path = folder / BASE_FILE
                    write_model_gguf(base_path, config, base_tensors, dtype, f"{name} (base)", tokenizer_keys)
                adapter_path = folder / ADAPTER_FILE
                write_lora_gguf(adapter_path, config, lora_tensors(config, factors), _rank(factors), dtype, f"{name} adapter")
                result.files = {"model": _shown(base_path, folder), "adapter": ADAPTER_FILE}
                with_files, without_files = (base_path, adapter_path), (base_path, None)
            else:
                model_path = folder / MERGED_FILE
                write_model_gguf(model_path, trained.config, model_tensors(trained.config, trained.state_dict()), dtype,
                                 f"{name} (merged)", tokenizer_keys)
                result.files = {"model": MERGED_FILE}
                if verify:
                    base_path = Path(base_gguf) if base_gguf is not None else Path(scratch) / BASE_FILE
                    if base_gguf is None:
                        write_model_gguf(base_path, config, base_tensors, dtype, f"{name} (base)", tokenizer_keys)
                    with_files, without_files = (model_path, None), (base_path, None)
            if verify:
                tolerance_name, tolerance = _tolerance(dtype, base_match)
                notice(f"verifying in llama.cpp on {len(reference.prompts)} prompts (tolerance: {tolerance_name})")
                parity = engine_parity(reference, with_files, without_files, f32_cache=tolerance_name == "f32")
                problems = failures(parity, tolerance)
                bounds = (tolerance.logits_bound(parity.base_max_relative_logit_diff), tolerance.effect)
                result.parity = {**parity.as_dict(), "tolerance": tolerance_name, "passed": not problems,
                                 "logits_tolerance": bounds[0] if math.isfinite(bounds[0]) else None,
                                 "effect_tolerance": bounds[1] if math.isfinite(bounds[1]) else None,
                                 "engine": "llama.cpp via llama-cpp-python " + _llama_cpp_version(),
                                 "settings": ENGINE_SETTINGS.format(cache="f32" if tolerance_name == "f32" else "f16 (llama.cpp's default)")}
                if problems:
                    hint = ""
                    if tolerance_name != "f32" and parity.effect_relative_diff > tolerance.effect:
                        hint = (f"An adapter whose effect is small next to the {tolerance_name} base's rounding can be "
                                "exported with --dtype f32 instead. ")
                    culprit = diagnose.families(reference, base, factors if mode == "lora" else None, trained, config,
                                                with_files, without_files, dtype, tokenizer_keys, Path(scratch))
                    raise ParityError(
                        "the exported GGUF does not compute what the trained model does in llama.cpp: "
                        + "; ".join(problems) + f". {hint}{culprit} {out} was left as it was."
                    )
            result.seconds = time.monotonic() - started
            (folder / "Modelfile").write_text(modelfile(tokenizer, result.files), encoding="utf-8")
            if result.parity is not None:
                (folder / "parity.json").write_text(json.dumps(result.parity, indent=1) + "\n", encoding="utf-8")
            (folder / "README.md").write_text(export_readme(result, tokenizer), encoding="utf-8")

    with staged_output(out, WHAT) as folder:
        build(folder)
    result.seconds = time.monotonic() - started
    return result


def _check_options(mode: str, dtype: str, verify: bool | None) -> None:
    if mode not in MODES:
        raise GGUFExportError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}.")
    if dtype not in DTYPES:
        raise GGUFExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if mode == "lora" and dtype not in LORA_DTYPES:
        raise GGUFExportError(
            f"--dtype {dtype} is a quantized type; a LoRA GGUF and its base are written in {', '.join(LORA_DTYPES)}. "
            f"Use --mode merged --dtype {dtype} for a quantized model, or give a quantized --base-gguf of your own."
        )
    if verify and not llama_cpp_available():
        raise GGUFExportError(
            "--verify runs the export in llama.cpp, but llama_cpp is not installed: `pip install 'peftlab[gguf]'` "
            "(builds llama-cpp-python), or pass --no-verify."
        )


def _lora_factors(model, adapter_name: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """{HF module path: (A, B)} of the exact plain-LoRA export, after refusing what a LoRA GGUF cannot hold."""
    from peftlab.export import ExportError, build_lora_export

    label = _method_label(model, adapter_name)
    trained_copies = sorted({key[len(io.KEY_PREFIX):].rsplit(".", 1)[0] for key in model.trained_copy_tensors(adapter_name)})
    if trained_copies:
        raise GGUFExportError(
            f"the {label} adapter trains whole modules ({', '.join(trained_copies[:3])}: modules_to_save), which a "
            "llama.cpp LoRA GGUF cannot carry; use --mode merged (the whole model, exact)."
        )
    for path, layer in model.adapted_layers():
        if adapter_name not in layer.adapters:
            continue
        try:
            kind = module_name(path)
        except KeyError:
            kind = None
        if kind is None or kind.split(".")[-1] not in LINEAR_FAMILIES:
            raise GGUFExportError(
                f"the {label} adapter adapts {path}, which a llama.cpp LoRA GGUF does not carry (only the attention and "
                "MLP projections); use --mode merged (the whole model, exact)."
            )
    try:
        export = build_lora_export(model, adapter_name)
    except ExportError as error:
        raise GGUFExportError(f"{error} For llama.cpp, --mode merged writes the model with the adapter folded in, exactly.") from None
    factors = {}
    for key, tensor in export.tensors.items():
        path, _, kind = key[len(io.KEY_PREFIX):].rpartition(".lora_")
        factors.setdefault(path, [None, None])["AB".index(kind[0])] = tensor
    return {path: (a, b) for path, (a, b) in factors.items()}, export.summary()


def _plain_base(model):
    """A copy of the base model as the adapter found it: no update, original modules where copies were trained."""
    plain = copy.deepcopy(model)
    for _, trained_copy in plain.trained_copies():
        trained_copy.disabled = True  # unload then keeps the original module, as disable_adapter runs it
    return plain.unload()


def _rank(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    return next(iter(factors.values()))[0].shape[0]


def _method_label(model, adapter_name: str) -> str:
    from peftlab.methods.registry import name_of

    return name_of(model.peft_config[adapter_name])


def _tolerance(dtype: str, base_match: BaseMatch | None) -> tuple[str, Tolerance]:
    """The tolerance of the least precise weights the engine runs on: the export's dtype, or the user's base."""
    if base_match is None:
        return dtype, TOLERANCES[dtype]
    kinds = [_JUDGED_TYPES.get(t) for t in base_match.types]
    if None in kinds:
        return "measured only (a quantized --base-gguf)", REPORT_ONLY
    order = list(TOLERANCES)
    worst = max([dtype, *kinds], key=order.index)
    return worst, TOLERANCES[worst]


def _shown(path: Path, folder: Path) -> str:
    return path.name if path.parent == folder else str(path)


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__
