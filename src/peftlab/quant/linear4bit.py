"""A frozen linear layer stored as NF4, its base-layer view, and whole-model quantization.

``Linear4bit`` always holds the weight in the Linear convention ``[out, in]``. A GPT-2
``Conv1D`` (stored ``[in, out]``) is transposed before quantization, as transformers does
when it loads GPT-2 in 4 bit (``source_cls`` records the original class) and as HF peft
expects: its LoRA layers on a bitsandbytes ``Linear4bit`` force ``fan_in_fan_out=False``.
"""

from __future__ import annotations

import json
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab.base import BaseLayerView, LossyMergeWarning
from peftlab.quant.nf4 import NF4State, dequantize_nf4, dynamic_code, quantize_nf4

_PLAIN_STATS = ("absmax",)
_DOUBLE_STATS = ("absmax_q", "absmax_scale", "absmax_offset")


class _NF4Linear(torch.autograd.Function):
    """``x Wᵀ + b`` with W dequantised in forward and again in backward.

    Only the small quantized state is kept for backward, never the full-size dequantised
    weight; no gradient is produced for the weight.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, state: NF4State) -> torch.Tensor:
        ctx.state = state  # references to the packed buffers, not copies
        return F.linear(x, dequantize_nf4(state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(dequantize_nf4(ctx.state, grad_out.dtype))
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen ``y = x Wᵀ + b`` with W stored as NF4 (bitsandbytes layout) and b in full precision.

    The quantized state lives in buffers (``packed`` and the block statistics), so ``.to(device)``
    moves it and ``state_dict()`` saves it; dtype casts such as ``.bfloat16()`` change only the
    bias and ``compute_dtype``, never the statistics. The dequantised weight exists only inside a
    forward or backward call.
    """

    def __init__(self, state: NF4State, bias: torch.Tensor | None = None, *, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D [out, in] weight state, got shape {tuple(state.shape)}.")
        self.out_features, self.in_features = state.shape
        self.compute_dtype = compute_dtype or state.dtype
        #: The class the layer was converted from (nn.Linear or Conv1D), as transformers records it.
        self.source_cls: type[nn.Module] = nn.Linear
        #: Bumped whenever the stored weight changes (re-quantization or loading).
        self.quant_version = 0
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},).")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.load_state(state)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose ``[in, out]`` weight is transposed first)."""
        if isinstance(module, Conv1D):
            weight = module.weight.T
        elif isinstance(module, nn.Linear):
            weight = module.weight
        else:
            raise TypeError(
                f"Linear4bit converts nn.Linear or transformers' Conv1D, got {type(module).__name__}; "
                "leave other layers unquantized (add them to skip_modules)."
            )
        state = quantize_nf4(weight.detach(), blocksize=blocksize, double_quant=double_quant)
        layer = cls(state, module.bias, compute_dtype=compute_dtype or module.weight.dtype)
        layer.source_cls = type(module)
        return layer

    # -- the quantized state -------------------------------------------------------------

    @property
    def state(self) -> NF4State:
        """The current NF4State (sharing this layer's buffers)."""
        stats = {name: getattr(self, name) for name in self._stat_names()}
        code2 = dynamic_code(self.packed.device) if self.double_quant else None
        return NF4State(packed=self.packed, shape=torch.Size((self.out_features, self.in_features)),
                        dtype=self.weight_dtype, blocksize=self.blocksize, code2=code2, **stats)

    def _stat_names(self) -> tuple[str, ...]:
        return _DOUBLE_STATS if self.double_quant else _PLAIN_STATS

    def load_state(self, state: NF4State) -> None:
        """Replace the stored weight by ``state`` (same ``[out, in]`` shape; blocksize may differ)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"cannot load a 4-bit state of shape {tuple(state.shape)} into a Linear4bit with "
                f"[out, in] = [{self.out_features}, {self.in_features}]; quantize a weight of that shape "
                "(Conv1D weights are [in, out]: transpose them first, or use Linear4bit.from_module)."
            )
        for name in ("packed",) + _PLAIN_STATS + _DOUBLE_STATS:
            self._buffers.pop(name, None)
            self._parameters.pop(name, None)  # held as parameters for sharding (see shardable_storage_)
        self.blocksize = state.blocksize
        self.double_quant = state.double_quant
        self.weight_dtype = state.dtype  # of the weight before quantization
        self.register_buffer("packed", state.packed)
        for name in self._stat_names():
            self.register_buffer(name, getattr(state, name))
        self.quant_version += 1

    def shardable_storage_(self) -> list[str]:
        """Hold the codes and the per-block statistics as frozen parameters instead of buffers; returns their names.

        FSDP2 shards parameters and replicates buffers: as parameters, the 4-bit storage is split
        across processes like any weight (all-gathered as bytes for a block's forward and backward),
        so QLoRA's memory saving survives sharding. The few per-256-block scales stay buffers
        (1/4096 of the codes' bytes): FSDP2 cannot shard the 0-dim offset, and they are not worth it.
        """
        names = ["packed", _PLAIN_STATS[0] if not self.double_quant else "absmax_q"]
        for name in names:
            tensor = self._buffers.pop(name, None)
            if tensor is not None:
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        return names

    def requantize_(self, weight: torch.Tensor) -> None:
        """Quantize a new ``[out, in]`` weight with this layer's settings and store it (lossy)."""
        state = quantize_nf4(weight.detach().to(self.packed.device), self.blocksize, self.double_quant)
        state.dtype = self.weight_dtype
        self.load_state(state)

    def get_extra_state(self) -> torch.Tensor:
        # The layout as JSON bytes in a uint8 tensor (bitsandbytes' trick): a state dict of tensors
        # only, which safetensors can store.
        meta = {"quant_type": "nf4", "shape": [self.out_features, self.in_features], "blocksize": self.blocksize,
                "double_quant": self.double_quant, "dtype": str(self.weight_dtype).removeprefix("torch.")}
        return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)

    def set_extra_state(self, extra: torch.Tensor) -> None:
        pass  # already checked and applied by _load_from_state_dict, before the buffers are copied

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        packed = state_dict.get(prefix + "packed")
        if extra is not None:
            meta = json.loads(bytes(extra.tolist()).decode())
            if meta["shape"] != [self.out_features, self.in_features]:
                raise ValueError(
                    f"cannot load '{prefix}': the saved 4-bit weight has [out, in] = {meta['shape']} but this "
                    f"Linear4bit is [{self.out_features}, {self.in_features}]; load it into a model of the same "
                    "architecture (same config)."
                )
            if packed is not None:  # the saved layout (blocksize, double quantization) wins: reshape the buffers
                device = self.packed.device
                names = _DOUBLE_STATS if meta["double_quant"] else _PLAIN_STATS
                stats = {n: torch.empty_like(state_dict[prefix + n], device=device)
                         for n in names if prefix + n in state_dict}
                self.load_state(NF4State(packed=torch.empty_like(packed, device=device),
                                         shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                                         blocksize=meta["blocksize"], **stats))
        elif packed is not None and packed.shape != self.packed.shape:
            raise ValueError(
                f"cannot load '{prefix}': its packed weight holds {packed.numel()} bytes but this Linear4bit "
                f"([out, in] = [{self.out_features}, {self.in_features}]) needs {self.packed.numel()}; "
                "the state was saved from a layer of another shape."
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.quant_version += 1

    def _apply(self, fn, recurse=True):
        # Casting the fp32 statistics would corrupt them: move them, and let a dtype cast
        # (``.half()``, ``.to(torch.bfloat16)``) change only the compute dtype and the bias.
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.packed.device))
        names = ("packed",) + self._stat_names()
        kept = {name: (store, store.pop(name)) for name in names
                for store in (self._buffers, self._parameters) if name in store}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, (store, tensor) in kept.items():
                moved = tensor.to(probe.device)
                store[name] = nn.Parameter(moved, requires_grad=False) if store is self._parameters else moved
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    # -- computing ---------------------------------------------------------------------

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a fresh ``[out, in]`` tensor in ``dtype`` (default: ``compute_dtype``)."""
        return dequantize_nf4(self.state, dtype or self.compute_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` holding exactly the dequantised weight (and the bias) in ``dtype``."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The kind of layer this one was made from, holding exactly the dequantised weight in ``dtype``.

        An ``nn.Linear``, or a ``Conv1D`` with its ``[in, out]`` weight transposed back, so a model
        made dense again loads and saves as its transformers class expects.
        """
        linear = self.to_linear(dtype)
        if not issubclass(self.source_cls, Conv1D):
            return linear
        conv = Conv1D(self.out_features, self.in_features)
        conv.weight = nn.Parameter(linear.weight.detach().T.contiguous())
        conv.bias = linear.bias
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _NF4Linear.apply(x, bias, self.state)

    def forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Linear.apply(x, None, self.state)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type=nf4, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


class Linear4bitView(BaseLayerView):
    """The NF4 layer seen as ``[out, in]``: the weight is dequantised in the compute dtype on demand."""

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.module.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.module.packed.device

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh dequantised ``[out, in]`` copy (4-bit storage allows no view)."""
        return self.module.dequantize(dtype)

    def forward_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_no_bias(x)

    def add_to_weight(self, delta: torch.Tensor) -> None:
        """``W += delta`` by dequantising, adding and re-quantizing: lossy, so it warns with the error."""
        module = self.module
        if not bool(delta.any()):
            return  # W += 0 is exact; re-quantizing would only add rounding error
        with torch.no_grad():
            target = module.dequantize(torch.float32) + delta.to(device=self.device, dtype=torch.float32)
            module.requantize_(target)
            error = (module.dequantize(torch.float32) - target).abs().max().item()
        warnings.warn(
            LossyMergeWarning(
                f"added to a 4-bit NF4 weight [{module.out_features}, {module.in_features}]: re-quantization is lossy "
                f"(max abs error {error:.4g}, largest |delta| {delta.abs().max().item():.4g}). For an exact merge, "
                "merge into a dequantised copy: PeftModel.merge_and_unload(dequantize=True), or "
                "peftlab.quant.dequantize_model(model) first.",
                max_abs_error=error,
            ),
            stacklevel=2,
        )

    def weight_version(self) -> int:
        return self.module.quant_version


def _name_matches(name: str, pattern: str) -> bool:
    """True when ``pattern`` names this module or one of its parents, as whole dotted components."""
    parts, want = name.split("."), pattern.split(".")
    return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def quantize_model(
    model: nn.Module,
    *,
    skip_modules: list[str] | None = None,
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``Conv1D`` of ``model`` by a frozen NF4 ``Linear4bit``, in place.

    Left alone: embeddings, norms, the output head (``model.get_output_embeddings()``) and every
    module whose dotted name contains one of ``skip_modules`` (default ``["score", "classifier"]``,
    the classification heads; pass ``[]`` to quantize those too). Subclasses of ``nn.Linear``
    are skipped too: some (``nn.MultiheadAttention``'s) are read as plain weights. The tensors left in
    full precision are copied, so that a checkpoint file mapped into memory can be released. Returns
    the model, with ``model.peftlab_quantization`` describing what was done.
    """
    patterns = ["score", "classifier"] if skip_modules is None else list(skip_modules)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    head_names = [name for name, module in model.named_modules() if head is not None and module is head]

    targets = [
        (name, module) for name, module in model.named_modules()
        if (type(module) is nn.Linear or isinstance(module, Conv1D))
        and name not in head_names and not any(_name_matches(name, p) for p in patterns)
    ]
    for name, module in targets:
        layer = Linear4bit.from_module(module, compute_dtype=compute_dtype, blocksize=blocksize,
                                       double_quant=double_quant)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    _release_checkpoint_map(model)
    model.peftlab_quantization = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "double_quant": double_quant,
        "skip_modules": patterns + [n for n in head_names if n not in patterns],
    }
    return model


def _release_checkpoint_map(model: nn.Module) -> None:
    # transformers loads weights as views of the checkpoint file's memory map, and quantizing reads every
    # full-precision weight through it. The map, with all those pages resident, lives as long as any tensor
    # of the file does: copying out the tensors left in full precision (embeddings, norms, heads) lets it
    # go, which on SmolLM2-135M takes the process from 820 to 520 MB resident.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        for module in model.modules():
            if not isinstance(module, Linear4bit):
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.clone()


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every ``Linear4bit`` of ``model`` by the dense layer it stands for, in place.

    The new weights are exactly the dequantised NF4 values (what the 4-bit layer computes with), in
    ``dtype`` (default: each layer's compute dtype), so the model's outputs do not change; merging an
    adapter into them is then exact. Layers made from ``Conv1D`` become ``Conv1D`` again. Works on a
    ``PeftModel`` too (the adapters stay). Returns the model.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.to_dense(dtype))
    for module in model.modules():
        vars(module).pop("peftlab_quantization", None)  # set by quantize_model: no longer true
    return model


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (NF4 codes and statistics at their real size).

    Tied parameters count once; the shared 256-entry double-quant code table is not counted.
    """
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds 4-bit layers."""
    return any(isinstance(m, Linear4bit) for m in model.modules())


def packed_weights(model: nn.Module) -> tuple[set[int], int]:
    """The 4-bit layers' packed storage, held as parameters for sharding (:meth:`Linear4bit.shardable_storage_`)
    but not weights themselves (by id), and how many weight values that storage holds."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    storage = {id(p) for m in layers for p in m.parameters(recurse=False) if p is not m.bias}
    return storage, sum(m.in_features * m.out_features for m in layers)
