"""VeRA, vector-based random matrix adaptation (Kopiczko et al. 2023), method name ``vera``.

One frozen random pair is shared by every adapted layer of a model; each layer trains two vectors:

    A: [r, max_in]   B: [max_out, r]      kaiming-uniform from projection_prng_key (A drawn first)
    a = A[:, :in]    b = B[:out, :]       each layer's slices

    h = x Wᵀ + λ_b ⊙ ((λ_d ⊙ (x aᵀ)) bᵀ)   λ_b: [out] init 0,  λ_d: [r] init d_initial
    ΔW = (λ_b ⊙ b) (λ_d ⊙ a)              (diag(λ_b) b diag(λ_d) a, what merging adds)

The pair is drawn exactly as HF peft draws it (``torch.Generator("cpu")`` seeded with the key, the
same arithmetic), so a file saved without it (``save_projection=False``) regenerates it bit for bit.
The pair lives once on the model (:class:`VeraProjections`, buffers: moved by ``.to()``, never
trainable); each layer keeps a reference to it, not a copy. HF's files store it as
``base_model.vera_A`` / ``base_model.vera_B`` (when ``save_projection``) and per layer
``vera_lambda_b`` / ``vera_lambda_d``.

Training runs base and adapter as one autograd node, one of two ways chosen per call by counted
multiply-adds (:meth:`VeraAdapter.folding_pays`). At r = 256 the rank-r products cost more than the
layer itself on layers narrower than about 4r, so there, for large batches on a stored weight, the
node folds ΔW into W (:class:`VeraFoldedFunction`): one dense product ``x (W + ΔW)ᵀ`` forward and
``g (W + ΔW)`` backward, ΔW built twice (``in·out·r``, not kept), the vectors' gradients from
``H = gᵀ x aᵀ`` in the cheaper order (it keeps ``x``):

    g_λb = (H ⊙ b) λ_d        g_λd = λ_bᵀ (H ⊙ b)

Otherwise (:class:`VeraLinearFunction`) the adapter runs on activations, ``u = x aᵀ`` (A is frozen,
so ``x`` is not kept), with ``v = (λ_d ⊙ u) bᵀ`` and ``out += λ_b ⊙ v``:

    g_w = g (λ_b ⊙ b)        g_λd = Σ_N g_w ⊙ u       g_x = g W + (λ_d ⊙ g_w) a
    g_λb = Σ_N g ⊙ v     (keeping v: [N, out])   or   Σ_r b ⊙ (gᵀ (λ_d ⊙ u))   (keeping only u)

The second form of ``g_λb`` is one more rank-r product (``N·out·r``) instead of a saved ``[N, out]``
and three passes over it: it pays at small r only (:meth:`VeraAdapter.keeps_product`); at VeRA's
usual r = 256 the product costs ~5x the passes (HF keeps v too). With ``vera_dropout`` only this path
runs (the base sees ``x``, the adapter ``dropout(x)``: ΔW cannot fold into W): ``u = dropout(x) aᵀ``
with LoRA's mask (``dropout_mask.py``), and ``g_x``'s adapter term goes through the mask; A being
frozen, the dropped-out input is not kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.base import BaseLayerView, Conv1DView, LinearView
from peftlab.config import AdapterConfig
from peftlab.adapter import Adapter
from peftlab.methods.fused import add_low_rank_input_grad, can_fuse, sample_mask
from peftlab.methods.lora import add_low_rank
from peftlab.methods.lora_targets import LORA_DEFAULT_TARGET_MODULES
from peftlab.methods.method import ADAPTER_DROPOUT, Method, MethodOption, UnsupportedBaseError
from peftlab.methods.registry import register_method


@dataclass
class VeraConfig(AdapterConfig):
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    peft_type = "VERA"
    default_target_modules = {**LORA_DEFAULT_TARGET_MODULES, "phi": ["q_proj", "v_proj"]}  # HF's table for VeRA

    def __post_init__(self) -> None:
        super().__post_init__()  # field types included
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}.")
        if not 0 <= self.vera_dropout < 1:
            raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout}; 0 turns dropout off.")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported: peftlab trains no base biases; use bias='none'.")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # HF's _kaiming_init, operation for operation: the bound's rounding must match to the last bit.
    tensor = torch.empty(shape)
    fan_in = shape[1]
    std = math.sqrt(2) / math.sqrt(fan_in)
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF peft's VeRA pair for this seed and size: ``A [r, max_in]`` then ``B [max_out, r]``."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming_uniform((r, max_in), generator)
    b = _kaiming_uniform((max_out, r), generator)
    return a, b


class VeraProjections(nn.Module):
    """The frozen pair shared by all VeRA layers of one model, as buffers (never trained)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def max_in(self) -> int:
        return self.vera_A.shape[1]

    @property
    def max_out(self) -> int:
        return self.vera_B.shape[0]

    def region(self, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:r, :max_in]`` and ``B[:max_out, :r]``: all that layers of at most that size use."""
        return self.vera_A[:r, :max_in], self.vera_B[:max_out, :r]

    def check_fits(self, r: int, in_features: int, out_features: int, where: str) -> None:
        """A layer can slice this pair only if the pair is at least as large as it needs."""
        if r > self.r:
            raise ValueError(
                f"VeRA r={r} at {where} is larger than the model's shared projection (r={self.r}, set by the first "
                "VeRA adapter): every VeRA adapter of a model slices one pair. Add the adapter with the largest r first, "
                "or use the same r."
            )
        if in_features > self.max_in or out_features > self.max_out:
            raise ValueError(
                f"{where} ({in_features} -> {out_features}) is larger than the model's shared VeRA projection "
                f"({self.max_in} -> {self.max_out}, sized by the first VeRA adapter's targets). Add the adapter with the "
                "largest target layers first."
            )


class VeraAdapter(Adapter):
    def __init__(self, base: BaseLayerView, projections: VeraProjections, config: VeraConfig) -> None:
        super().__init__()
        self.r = config.r
        self.in_features, self.out_features = base.in_features, base.out_features
        # A tuple hides the shared module from nn.Module: it is registered once, on the model, so
        # .to() moves one pair and no layer saves or trains a copy.
        self._shared = (projections,)
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else None
        dtype = base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": base.device, "dtype": dtype}
        if config.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))
            self.vera_lambda_d = nn.Parameter(torch.full((self.r,), float(config.d_initial), **factory))
        else:  # HF's values before its default init: B's scale 1, d random
            self.vera_lambda_b = nn.Parameter(torch.ones(self.out_features, **factory))
            self.vera_lambda_d = nn.Parameter(torch.randn(self.r, **factory))

    @property
    def projections(self) -> VeraProjections:
        return self._shared[0]

    def sliced(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``a = A[:r, :in]`` and ``b = B[:out, :r]`` on ``like``'s device and dtype."""
        a, b = self.projections.region(self.r, self.in_features, self.out_features)
        return a.to(like.device, like.dtype), b.to(like.device, like.dtype)

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.vera_lambda_d.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.vera_lambda_d.dtype)
        return self.dropout(x) if self.dropout is not None else x

    def forward(self, x, base_out, base):
        x = self._adapter_input(x)
        a, b = self.sliced(self.vera_lambda_d)
        w = base.project_input(x, a) * self.vera_lambda_d
        return add_low_rank(base_out, w, b * self.vera_lambda_b[:, None], 1.0)

    def fused_forward(self, x: torch.Tensor, base: BaseLayerView) -> torch.Tensor | None:
        """Base plus adapter as one autograd node that keeps ``u``, not ``x``; None where it does not apply.
        With dropout the base and the adapter see different inputs, so ΔW cannot fold into W."""
        if not can_fuse(x, base, self.vera_lambda_d, self.vera_lambda_b):
            return None
        a, b = self.sliced(self.vera_lambda_d)
        dropout = self.dropout.p if self.dropout is not None and self.training else 0.0
        if not dropout and _stores_weight(base) and self.folding_pays(x.numel() // max(1, x.shape[-1])):
            return VeraFoldedFunction.apply(x, self.vera_lambda_d, self.vera_lambda_b, a, b, base)
        return VeraLinearFunction.apply(x, self.vera_lambda_d, self.vera_lambda_b, a, b, base, self.keeps_product(), dropout)

    def keeps_product(self) -> bool:
        """Whether the rank-r path keeps ``v = (λ_d ⊙ u) bᵀ`` for ``g_λb`` (the passes over ``[N, out]``
        it costs, :data:`_PRODUCT_PASSES` at ``_PASS_COST`` an element) rather than multiply
        ``gᵀ (λ_d ⊙ u)`` again (``r`` an element)."""
        return self.r > _PRODUCT_PASSES * _PASS_COST

    def folding_pays(self, rows: int) -> bool:
        """Whether ``rows`` tokens cost more multiply-adds through the rank-r path than folded.

        Rank-r: ``N·r·2·(in + out)`` over forward and backward, and for ``g_λb`` either ``N·out·r``
        or the passes over the kept ``v`` (:meth:`keeps_product`). Folded: ``ΔW`` built twice
        (``2·in·out·r``, plus ``W + ΔW`` at ``_PASS_COST`` an element) and ``gᵀ x aᵀ`` for the
        vectors' gradients in the cheaper order. VeRA's r is large (256), so folding wins on layers
        narrower than about 4r and large batches; the rank-r path on wide layers and small batches.
        """
        n_in, n_out, r = self.in_features, self.out_features, self.r
        folded = min(rows * n_in * n_out + n_in * n_out * r, rows * r * (n_in + n_out))
        folded += 2 * n_in * n_out * (r + _PASS_COST)
        per_output = _PRODUCT_PASSES * _PASS_COST if self.keeps_product() else r
        return folded < rows * r * 2 * (n_in + n_out) + rows * n_out * per_output

    def delta_weight(self, base):
        a, b = self.low_rank(base)
        return b @ a

    def low_rank(self, base):
        """Exact rank-r factors: ``A = λ_d ⊙ a``, ``B = λ_b ⊙ b``."""
        with torch.no_grad():
            lambda_d, lambda_b = self.vera_lambda_d.float(), self.vera_lambda_b.float()
            a, b = self.sliced(lambda_d)
            return lambda_d[:, None] * a, lambda_b[:, None] * b

    def saved_tensors(self):
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}


class VeraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, a, b, view: BaseLayerView, keep_product: bool = False, dropout: float = 0.0):
        x2 = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = view.forward(x)
        mask = sample_mask(x2, dropout)  # A is frozen: the dropped-out input is used here and not kept
        u = torch.mm(x2 if mask is None else mask.apply(x2), a.t())
        out2 = out.view(-1, out.shape[-1])
        v = None
        if keep_product and ctx.needs_input_grad[2]:  # v is kept for λ_b's gradient alone
            v = torch.mm(u * lambda_d, b.t())
            out2.addcmul_(v, lambda_b)
        else:
            out2.addmm_(u * lambda_d, (b * lambda_b[:, None]).t())
        ctx.save_for_backward(u, lambda_d, lambda_b, a, b, v)
        ctx.view, ctx.x_shape, ctx.mask = view, x.shape, mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, lambda_d, lambda_b, a, b, v = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = torch.mm(g, b * lambda_b[:, None])  # [N, r]
        grad_x = grad_d = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = add_low_rank_input_grad(ctx.view.input_grad(g), grad_w * lambda_d, a, ctx.mask).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_d = (grad_w * u).sum(0)
        if ctx.needs_input_grad[2]:
            grad_b = (g * v).sum(0) if v is not None else (torch.mm(g.t(), u * lambda_d) * b).sum(1)
        return grad_x, grad_d, grad_b, None, None, None, None, None


def _stores_weight(view: BaseLayerView) -> bool:
    """Whether ``view.weight()`` is the stored tensor itself: folding into a quantized weight would
    dequantise it and bypass its own kernel."""
    return type(view) in (LinearView, Conv1DView)


def _folded_weight(view: BaseLayerView, lambda_d, lambda_b, a, b) -> torch.Tensor:
    """``W + (λ_b ⊙ b) diag(λ_d) a``: one rank-r product onto a copy of W."""
    return torch.addmm(view.weight(), b * lambda_b[:, None] * lambda_d, a)


class VeraFoldedFunction(torch.autograd.Function):
    """``out = x (W + ΔW)ᵀ + bias``, ``g_x = g (W + ΔW)``; keeps ``x``.

    With ``H = gᵀ x aᵀ`` (``[out, r]``, associated whichever way is cheaper) and ``P = H ⊙ b``:
    ``g_λb = P λ_d`` and ``g_λd = λ_bᵀ P``, the gradients of ``Σ g ⊙ x ΔWᵀ`` through ΔW's two vectors.
    """

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, a, b, view: BaseLayerView):
        with torch.no_grad():
            out = F.linear(x, _folded_weight(view, lambda_d, lambda_b, a, b), view.bias)
        ctx.save_for_backward(x.reshape(-1, x.shape[-1]), lambda_d, lambda_b, a, b)
        ctx.view, ctx.x_shape = view, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, lambda_d, lambda_b, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_d = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _folded_weight(ctx.view, lambda_d, lambda_b, a, b)).view(ctx.x_shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            rows, (n_out, r), n_in = g.shape[0], b.shape, a.shape[1]
            if rows * n_out * n_in + n_out * n_in * r < rows * r * (n_in + n_out):
                h = torch.mm(g.t(), x2) @ a.t()
            else:
                h = torch.mm(g.t(), torch.mm(x2, a.t()))
            p = h.mul_(b)
            grad_b = p @ lambda_d if ctx.needs_input_grad[2] else None
            grad_d = lambda_b @ p if ctx.needs_input_grad[1] else None
        return grad_x, grad_d, grad_b, None, None, None


#: Multiply-adds one elementwise pass over a weight-sized tensor costs, against a matrix product's
#: (memory-bound against compute-bound).
_PASS_COST = 16
#: The passes over ``[N, out]`` that keeping ``v`` adds: ``out += λ_b ⊙ v`` forward, ``g ⊙ v`` and its sum backward.
_PRODUCT_PASSES = 3


class VeraMethod(Method):
    """The shared pair is made by the model's first VeRA adapter, sized by its largest target layer;
    later adapters slice it (HF's rule) and must fit in it. Each adapter's file holds the part of the
    pair its own config implies (``A[:r, :max_in]``, ``B[:max_out, :r]`` over its layers): the pair a
    fresh model builds for that config, so the file loads alone, here and in HF."""

    config_class = VeraConfig
    options = {
        "r": MethodOption(int, "rank of the shared random projection", "positive", lambda v: v > 0),
        "vera_dropout": ADAPTER_DROPOUT,
        "d_initial": MethodOption(float, "initial value of every lambda_d", "a number", lambda v: True),
        "projection_prng_key": MethodOption(int, "seed of the shared random projection", "an integer", lambda v: True),
    }
    #: HF's r. The paper trains its two vectors at a rate several times LoRA's (4e-3 on RoBERTa-base SST-2,
    #: for 60 epochs); at the lab's default budget (MiniLM-L6, SST-2, 63 steps) 4e-3 stays at chance (val
    #: accuracy 0.537), 1e-2 reaches 0.676 and 3e-2 0.763 (LoRA at 1e-3: 0.783). Pass --lr for long runs.
    run_defaults = {"lr": 3e-2, "r": 256}

    def check_base(self, config, view, path):
        if view.takes_ids:
            raise UnsupportedBaseError(
                f"VeRA cannot adapt {path}, an Embedding: its shared projection acts on activations (HF's VeRA adapts "
                "Linear and Conv1D layers only). Remove it from target_modules."
            )

    def adapter_numel(self, config, view, path):
        return view.out_features + config.r

    def inject(self, model, adapter_name, config, targets):
        size = (config.r, max(v.in_features for v in targets.values()), max(v.out_features for v in targets.values()))
        first_name = next((n for n, c in model.peft_config.items() if n != adapter_name and isinstance(c, VeraConfig)), None)
        if first_name is None:
            a, b = draw_projections(*size, config.projection_prng_key)
            device = next(iter(targets.values())).device
            return VeraProjections(a.to(device), b.to(device))
        first = model.peft_config[first_name]
        if config.projection_prng_key != first.projection_prng_key:
            raise ValueError(
                f"VeRA adapter {adapter_name!r} has projection_prng_key={config.projection_prng_key} but {first_name!r} "
                f"has {first.projection_prng_key}: all VeRA adapters of a model share one projection. Use the same key."
            )
        if config.save_projection != first.save_projection:
            raise ValueError(
                f"VeRA adapter {adapter_name!r} has save_projection={config.save_projection} but {first_name!r} has "
                f"{first.save_projection}: the shared projection is saved for all adapters or none. Use the same value."
            )
        shared = model.method_state[first_name]
        for path, view in targets.items():
            shared.check_fits(config.r, view.in_features, view.out_features, path)
        if not config.save_projection:
            regenerated = draw_projections(*size, config.projection_prng_key)
            if not all(torch.equal(x.to(y), y) for x, y in zip(regenerated, shared.region(*size))):
                raise ValueError(
                    f"VeRA adapter {adapter_name!r} (r={config.r}, largest layer {size[1]} -> {size[2]}) would train on a "
                    f"slice of the model's shared projection (r={shared.r}, {shared.max_in} -> {shared.max_out}) that "
                    "its file cannot regenerate from the key with save_projection=False. Use save_projection=True, or "
                    "the first adapter's r and largest input size."
                )
        return shared

    def make_adapter(self, config, view, path, state):
        return VeraAdapter(view, state, config)

    def export_config(self, model, adapter_name, config):
        data = super().export_config(model, adapter_name, config)
        if data.get("exclude_modules") is None:  # HF's VeraConfig has no such field (kept when it is used)
            del data["exclude_modules"]
        return data

    def export_tensors(self, model, adapter_name):
        tensors = super().export_tensors(model, adapter_name)
        if model.peft_config[adapter_name].save_projection:
            a, b = model.method_state[adapter_name].region(*self._own_size(model, adapter_name))
            tensors.update({f"{_SHARED_PREFIX}vera_A": a, f"{_SHARED_PREFIX}vera_B": b})
        return tensors

    def load_tensors(self, model, adapter_name, tensors):
        shared = model.method_state[adapter_name]
        keys = (f"{_SHARED_PREFIX}vera_A", f"{_SHARED_PREFIX}vera_B")
        if keys[0] in tensors:
            saved = [tensors[k] for k in keys]
            users = [n for n, state in model.method_state.items() if state is shared and n != adapter_name]
            if not users:  # this adapter made the pair: the file's values replace the regenerated ones
                shared.load_state_dict({"vera_A": saved[0], "vera_B": saved[1]})
            elif not all(torch.equal(x.to(y), y) for x, y in zip(saved, shared.region(*self._own_size(model, adapter_name)))):
                raise ValueError(
                    f"this VeRA adapter was trained with another random projection than the one VeRA adapter(s) {users} "
                    "already in the model share; load it into a model without them."
                )
        super().load_tensors(model, adapter_name, {k: v for k, v in tensors.items() if k not in keys})

    @staticmethod
    def _own_size(model, adapter_name) -> tuple[int, int, int]:
        adapters = [adapter for _, adapter in model.adapters_of(adapter_name)]
        return adapters[0].r, max(a.in_features for a in adapters), max(a.out_features for a in adapters)


# HF keeps the shared pair on its tuner model, one level above the per-layer keys.
_SHARED_PREFIX = "base_model."

register_method(VeraMethod("vera"))
