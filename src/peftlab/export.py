"""Export any adapter as a plain LoRA adapter, the one format serving engines load.

    model.save_pretrained(dir, as_lora=True, rank=None, max_rank=None)     # or build/write_lora_export
    peftlab export --to lora --adapter DIR --out DIR [--rank K] [--max-rank M]

vLLM and SGLang load ``lora_A``/``lora_B`` tensors with one ``r`` and one ``lora_alpha`` for every
module, nothing else. Each method gives its layers' updates as exact factors ``ΔW = B A``
(:meth:`peftlab.methods.method.Method.as_low_rank`), and the file is written as

    lora_A = A (zero rows up to r),  lora_B = B (zero columns up to r),  lora_alpha = r

so HF's scale ``alpha / r`` is 1 and every per-module scale sits in ``B``: the exported adapter
computes exactly what the original did. Where a layer's update is not low rank (DoRA rescales the
rows of ``W``; MoRA) or the user asks for a rank below the adapter's, the layer's ``ΔW`` is cut to
its best rank-``k`` approximation (truncated SVD, Eckart-Young) and the measured error is reported,
printed by the command and written in the export's README.md.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from peftlab import io
from peftlab.base_gap import LogitGap
from peftlab.quant import is_quantized
from peftlab.methods.lora import LoraConfig
from peftlab.methods.registry import name_of

if TYPE_CHECKING:
    from peftlab.model import PeftModel

#: The ranks vLLM's ``--max-lora-rank`` accepts (SGLang takes any; these are the common limits).
SERVING_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
README_NAME = "README.md"
#: In the export's safetensors metadata, for a QLoRA adapter: its measured logit error on the full-precision base.
FULL_PRECISION_GAP_KEY = "peftlab.full_precision_logit_gap"


class ExportError(ValueError):
    """The adapter cannot be written as plain LoRA as asked; the message says why and what to do."""


class LossyExportWarning(UserWarning):
    """The exported LoRA approximates the adapter (truncated SVD); the message gives the measured error."""


@dataclass
class LayerError:
    """How far the exported ``B A`` is from the adapter's ``ΔW`` on one layer (0 where exact)."""

    relative: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F
    max_abs: float  # largest entry of |ΔW − B A|


@dataclass
class LoraExport:
    config: dict
    tensors: dict[str, torch.Tensor]
    rank: int
    #: Layers that were approximated, with their error; empty when the export is exact.
    errors: dict[str, LayerError] = field(default_factory=dict)
    method: str = ""
    #: "nf4" for a QLoRA adapter: it computes what the adapter does on that 4-bit base only.
    base_quantization: str | None = None
    #: On the full-precision base: its logits there vs the adapter's on the NF4 base (full_precision_gap).
    full_precision_gap: LogitGap | None = None

    @property
    def exact(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        if self.exact:
            return f"exact{self._on_base()}: plain LoRA of rank {self.rank} computes what the {self.method} adapter does."
        worst = max(self.errors.items(), key=lambda item: item[1].relative)
        largest = max(e.max_abs for e in self.errors.values())
        return (
            f"lossy: {len(self.errors)} layer(s) cut to rank {self.rank} by truncated SVD; largest relative "
            f"Frobenius error of the weight update {worst[1].relative:.4g} (at {worst[0]}), largest absolute "
            f"weight error {largest:.4g}{self._on_base()}."
        )

    def _on_base(self) -> str:
        return f" on the {self.base_quantization.upper()} (4-bit) base it was trained on" if self.base_quantization else ""

    def base_statement(self) -> str:
        """For a QLoRA adapter: which base it is right on, and its measured error on the other."""
        if not self.base_quantization:
            return ""
        name = self.base_quantization.upper()
        text = (f"Base: trained on the {name} (4-bit) base; quantize the base the same way "
                "(`peftlab.quant.quantize_model`, or load it with `peftlab.AutoPeftModel`) to get what the adapter computes. ")
        if self.full_precision_gap is None:
            return text + "On the full-precision base it computes something else (not measured here: `peftlab export` measures it)."
        return (text + f"On the full-precision base (what HF peft, vLLM and SGLang load it onto) it is not exact: "
                f"{self.full_precision_gap.describe()}, full-precision base + this LoRA vs {name} base + the adapter.")


def build_lora_export(
    model: PeftModel, adapter_name: str = "default", rank: int | None = None, max_rank: int | None = None
) -> LoraExport:
    """The plain-LoRA config and tensors of one adapter, at ``rank`` (default: the adapter's own,
    exact) and within a serving engine's ``max_rank``."""
    method = model.method_of(adapter_name)
    label = name_of(model.peft_config[adapter_name])
    marker = type(model.peft_config[adapter_name]).file_marker
    if marker:  # its own files are LoRA files plus a field that changes the model: an export would drop it
        raise ExportError(
            f"the {label} adapter's own files are plain LoRA files already, plus {marker!r} in adapter_config.json, "
            f"which a plain LoRA export would drop though the trained model needs it; serve its own folder and apply "
            f"{marker} to the base as the README says."
        )
    if max_rank is not None and max_rank not in SERVING_MAX_RANKS:
        raise ExportError(
            f"max_rank {max_rank} is not a rank limit serving engines take (vLLM's --max-lora-rank: "
            f"{', '.join(map(str, SERVING_MAX_RANKS))}); give one of these."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExportError(f"export rank must be a positive integer, got {rank!r}.")
    layers = {path: layer for path, layer in model.adapted_layers() if adapter_name in layer.adapters}
    factors = method.as_low_rank(model, adapter_name, rank)
    not_low_rank = sorted(path for path, f in factors.items() if f is None)
    exact_rank = max((f[0].shape[0] for f in factors.values() if f is not None), default=0)
    if not_low_rank and rank is None:
        raise ExportError(
            f"the {label} adapter's update is not low rank (e.g. {not_low_rank[0]}), so plain LoRA can only "
            "approximate it: give a rank (--rank K) for a truncated SVD; the measured error is reported."
        )
    if rank is not None and not not_low_rank and rank > exact_rank:
        raise ExportError(
            f"export rank {rank} is above the {label} adapter's rank {exact_rank}: the exact export needs "
            f"only {exact_rank}; leave the rank out, or give one <= {exact_rank} (lower ranks are lossy)."
        )
    if rank is not None and not_low_rank:
        full = max(min(layers[p].view.out_features, layers[p].view.in_features) for p in not_low_rank)
        if rank > full:
            raise ExportError(f"export rank {rank} is above the full rank {full} of the {label} layers' updates.")
    target = rank if rank is not None else exact_rank
    if max_rank is not None and target > max_rank:
        raise ExportError(
            f"the exported adapter would have rank {target}, above the serving limit max_rank {max_rank}: give "
            f"--rank {max_rank} or lower (a truncated SVD, lossy, error reported) or raise the engine's --max-lora-rank."
        )

    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, LayerError] = {}
    for path, layer in layers.items():
        a, b, error = _layer_factors(layer.adapters[adapter_name], layer.view, factors[path], target, label, path)
        if error is not None:
            errors[path] = error
        a, b = _pad(a, b, target)
        names = ("lora_embedding_A", "lora_embedding_B") if layer.view.takes_ids else ("lora_A.weight", "lora_B.weight")
        tensors[f"{io.KEY_PREFIX}{path}.{names[0]}"] = a.contiguous()
        tensors[f"{io.KEY_PREFIX}{path}.{names[1]}"] = b.contiguous()
    tensors.update(model.trained_copy_tensors(adapter_name))

    source = model.peft_config[adapter_name]
    config = LoraConfig(
        r=target, lora_alpha=target, target_modules=sorted(layers), modules_to_save=source.modules_to_save,
        task_type=source.task_type, base_model_name_or_path=source.base_model_name_or_path, revision=source.revision,
        ensure_weight_tying=getattr(source, "ensure_weight_tying", False),  # the tied trained copies it holds
    )
    data = model.finish_saved_config(adapter_name, config.to_hf_dict())
    return LoraExport(data, tensors, target, errors, label, io.QUANTIZATION_NF4 if is_quantized(model) else None)


def _layer_factors(adapter, view, factors, rank: int, method_name: str, path: str):
    """``(A, B, error or None)`` of one layer at ``rank``."""
    if factors is not None and factors[0].shape[0] <= rank:
        return factors[0], factors[1], None
    if factors is not None:  # exact factors above the rank: the SVD of B A through two QRs, no [out, in]
        a, b = factors[0].float(), factors[1].float()
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        u, vh = qb @ u, vh @ qa.T
        delta = b @ a
        dtype = factors[0].dtype
    else:
        try:
            with torch.no_grad():
                delta = adapter.delta_weight(view).detach().float()
        except NotImplementedError:
            raise ExportError(
                f"the {method_name} adapter cannot be exported as LoRA: its {type(adapter).__name__} at {path} changes "
                "the layer's output in a way that is no weight update (it defines no delta_weight)."
            ) from None
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        dtype = next((p.dtype for p in adapter.parameters()), delta.dtype)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    a_k, b_k = root[:, None] * vh[:k], u[:, :k] * root[None, :]
    residual = delta - b_k @ a_k
    norm = delta.norm()
    relative = float(residual.norm() / norm) if norm > 0 else 0.0
    return a_k.to(dtype), b_k.to(dtype), LayerError(relative, float(residual.abs().max()))


def _pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero components up to ``rank``: ``B A`` is unchanged and every module gets one ``r``."""
    missing = rank - a.shape[0]
    if missing == 0:
        return a, b
    return torch.cat([a, a.new_zeros(missing, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)


def readme(export: LoraExport, adapter_name: str) -> str:
    lines = [
        f"# Plain LoRA export of the {export.method} adapter {adapter_name!r}",
        "",
        f"Written by peftlab (`save_pretrained(as_lora=True)` / `peftlab export --to lora`): only `lora_A`/`lora_B`",
        f"tensors, `r = lora_alpha = {export.rank}` for every module (per-module scales folded into `lora_B`, smaller",
        "ranks zero-padded), `bias = \"none\"`, no `rank_pattern`: HF peft, vLLM and SGLang load it as plain LoRA.",
        "",
        f"Fidelity: {export.summary()}",
    ]
    if export.base_quantization:
        lines += ["", export.base_statement()]
    if export.errors:
        lines += ["", "| layer | relative Frobenius error of ΔW | max abs error |", "|---|---|---|"]
        lines += [f"| {path} | {e.relative:.4g} | {e.max_abs:.4g} |" for path, e in sorted(export.errors.items())]
    return "\n".join(lines) + "\n"


def write_lora_export(
    export: LoraExport, directory: str | os.PathLike, adapter_name: str = "default", metadata: dict[str, str] | None = None
) -> None:
    """Write the export (adapter files, ``metadata`` in the safetensors header, and a README.md
    saying how exact it is); a lossy export also warns with the measured error."""
    if export.full_precision_gap is not None:
        gap = export.full_precision_gap
        metadata = {**(metadata or {}), FULL_PRECISION_GAP_KEY: json.dumps({"max_abs_logit": gap.max_abs, "relative_logit": gap.relative, "prompts": gap.prompts})}
    io.write_adapter(
        io.adapter_dir(directory, adapter_name), export.config, export.tensors, metadata,
        extra_text={README_NAME: readme(export, adapter_name)},
    )
    if not export.exact:
        warnings.warn(LossyExportWarning(f"{adapter_name}: {export.summary()}"), stacklevel=3)
