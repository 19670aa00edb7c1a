"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411), method ``delta_lora``.

A and B train as in LoRA (no dropout on the adapter path). After each optimizer step t >= K the
frozen weight also moves by the change of the low-rank product; it gets no gradient and no
optimizer state:

    W_{t+1} = W_t + λ·s·(B_{t+1} A_{t+1} − B_t A_t)          λ = 2, s = alpha / r, K = delta_start_step

The sum telescopes, so for every step t >= K

    W_t = W_0 + λ·s·(B_t A_t − B_K A_K)                       (rank <= 2r)

and the weight is never rewritten: the adapter keeps W_0 as it is, snapshots ``(A_K, B_K)`` when
step K begins (at construction for K = 0), and computes one rank-2r product

    h = x W_0ᵀ + x [A; A_K]ᵀ [(1+λ)s·B, −λs·B_K]ᵀ

whose gradients reach A and B through the ``s·BA`` path only (the rest is the weight's move).
This is exact on any base, a 4-bit NF4 one included, where W cannot be rewritten each step;
``disable_adapter``, ``unmerge_adapter`` and ``delete_adapter`` give back W_0 exactly; and the
trained model *is* the original base plus a plain LoRA adapter of rank 2r with scale 1:

    lora_A = [A; A_K],   lora_B = [(1+λ)s·B, −λs·B_K]

These are the adapter's exact ``low_rank`` factors, and ``save_pretrained`` always writes that
plain-LoRA export (``Method.saves_as_lora``; ``r = lora_alpha = 2r``), so HF peft, vLLM or peftlab
load the trained model as ordinary LoRA. Before step K the forward is LoRA's and the file's second
half is zero. To continue training, resume from a checkpoint: it holds A, B and the snapshot (the
hook's state).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from peftlab.base import BaseLayerView
from peftlab.hooks import TrainingHook, TrainingProgress
from peftlab.methods.fused import can_fuse
from peftlab.methods.lora import LoraAdapter, LoraConfig, LoraMethod, add_low_rank
from peftlab.methods.method import MethodOption
from peftlab.methods.registry import register_method


@dataclass
class DeltaLoraConfig(LoraConfig):
    #: Optimizer steps of plain LoRA before the weight starts to move (the paper's K).
    delta_start_step: int = 500
    #: How far W moves per unit change of ``s·BA`` (the paper's λ).
    delta_lambda: float = 2.0

    # Its files are the plain LoRA it equals (see the module docstring): these never reach them.
    peftlab_only_fields = (*LoraConfig.peftlab_only_fields, "delta_start_step", "delta_lambda")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_dropout != 0:
            raise ValueError(
                f"Delta-LoRA takes no dropout on the adapter path (the paper removes it so that the product's "
                f"gradient is the weight's), got lora_dropout={self.lora_dropout}; set it to 0."
            )
        if self.use_dora:
            raise ValueError("Delta-LoRA moves the weight by the change of a LoRA product; it has no DoRA variant. Set use_dora=False.")
        if self.delta_start_step < 0:  # the types are checked by AdapterConfig
            raise ValueError(
                f"delta_start_step must be a non-negative integer (optimizer steps before the weight starts to move; "
                f"0 moves it from the first step), got {self.delta_start_step}."
            )
        if not math.isfinite(self.delta_lambda) or self.delta_lambda < 0:
            raise ValueError(f"delta_lambda must be a non-negative number (the paper uses 2), got {self.delta_lambda!r}.")


def rank_2r_factors(a, b, a_start, b_start, scale: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``([A; A_K], [(1+λ)s·B, −λs·B_K])``: the forward and the saved file use these same tensors."""
    return torch.cat([a, a_start]), torch.cat([b * ((1 + lam) * scale), b_start * (-lam * scale)], dim=1)


class DeltaLoraLinearFunction(torch.autograd.Function):
    """``h = base(x) + (x A2ᵀ) B2ᵀ`` with ``A2, B2`` the rank-2r factors; A and B get the gradients of
    ``s · x Aᵀ Bᵀ`` alone, the input the gradient of the whole (the moved weight included)."""

    @staticmethod
    def forward(ctx, x, a, b, a_start, b_start, scale: float, lam: float, view: BaseLayerView):
        x2 = x.reshape(-1, x.shape[-1])
        a2, b2 = rank_2r_factors(a, b, a_start, b_start, scale, lam)
        with torch.no_grad():
            out = view.forward(x)
        u2 = torch.mm(x2, a2.t())
        out.view(-1, out.shape[-1]).addmm_(u2, b2.t())
        ctx.save_for_backward(x2, a2, b2, u2)
        ctx.scale, ctx.lam, ctx.rank, ctx.view, ctx.x_shape = scale, lam, a.shape[0], view, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x2, a2, b2, u2 = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        g_b2 = torch.mm(g2, b2)  # [N, 2r]; its first r columns are (1+λ)s · g B
        r = ctx.rank
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.view.input_grad(g2)
            grad_x.addmm_(g_b2, a2)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm((g_b2[:, :r] / (1 + ctx.lam)).t(), x2)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(g2.t(), u2[:, :r]).mul_(ctx.scale)
        return grad_x, grad_a, grad_b, None, None, None, None, None


class DeltaLoraAdapter(LoraAdapter):
    """LoRA plus the snapshot ``(A_K, B_K)``: non-persistent buffers, moved by ``.to()``, never trained
    and never in the model's state_dict (the training hook checkpoints them)."""

    def __init__(self, base: BaseLayerView, r: int, alpha: float, use_rslora: bool, init, lam: float, moving: bool) -> None:
        super().__init__(base, r, alpha, 0.0, use_rslora, init)
        self.lam = lam
        self.register_buffer("start_A", torch.zeros_like(self.lora_A), persistent=False)
        self.register_buffer("start_B", torch.zeros_like(self.lora_B), persistent=False)
        #: Whether step K has begun: W = W_0 + λ·s·(BA − B_K A_K) from then on.
        self.moving = False
        if moving:
            self.start_moving()

    @torch.no_grad()
    def start_moving(self) -> None:
        self.start_A.copy_(self.lora_A)
        self.start_B.copy_(self.lora_B)
        self.moving = True

    @torch.no_grad()
    def restore_start(self, moving: bool, start_a: torch.Tensor, start_b: torch.Tensor) -> None:
        self.start_A.copy_(start_a)
        self.start_B.copy_(start_b)
        self.moving = moving

    def rank_2r_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.lam if self.moving else 0.0
        return rank_2r_factors(self.lora_A, self.lora_B, self.start_A, self.start_B, self.scaling, lam)

    def forward(self, x, base_out, base):
        out = super().forward(x, base_out, base)
        if not self.moving:
            return out
        # The weight's move λ·s·(BA − B_K A_K): it passes gradient to x, none to A and B.
        lam_scale = self.lam * self.scaling
        a = torch.cat([self.lora_A.detach(), self.start_A])
        b = torch.cat([self.lora_B.detach() * lam_scale, self.start_B * -lam_scale], dim=1)
        return add_low_rank(out, base.project_input(self._adapter_input(x), a), b, 1.0)

    def fused_forward(self, x, base):
        if not self.moving:
            return super().fused_forward(x, base)
        if not can_fuse(x, base, self.lora_A, self.lora_B, self.start_A, self.start_B):
            return None
        return DeltaLoraLinearFunction.apply(
            x, self.lora_A, self.lora_B, self.start_A, self.start_B, self.scaling, self.lam, base
        )

    def delta_weight(self, base):
        a2, b2 = self.rank_2r_factors()
        return b2 @ a2

    def low_rank(self, base):
        """The rank-2r factors the forward uses, so the saved LoRA computes bit for bit what this does."""
        return tuple(t.detach() for t in self.rank_2r_factors())


class DeltaStartHook(TrainingHook):
    """Takes the snapshot ``(A_K, B_K)`` in every layer when step K begins; checkpoints it."""

    def __init__(self, adapters: dict[str, DeltaLoraAdapter], start_step: int) -> None:
        self.adapters = adapters
        self.start_step = start_step
        self.warned = False

    def on_step_begin(self, progress: TrainingProgress) -> None:
        moving = [adapter.moving for adapter in self.adapters.values()]
        if not self.warned and not any(moving) and progress.total_steps <= self.start_step:
            self.warned = True
            warnings.warn(
                f"Delta-LoRA never moves the weight in this run: delta_start_step={self.start_step} but the run has "
                f"{progress.total_steps} steps, so it trains plain LoRA; lower delta_start_step.",
                stacklevel=2,
            )
        if progress.step < self.start_step or all(moving):
            return
        if progress.step > self.start_step:
            raise RuntimeError(
                f"Delta-LoRA's weight should have started moving at step {self.start_step}, but its hooks first ran at "
                f"step {progress.step}, so the snapshot of step {self.start_step} is lost (a run resumed without the "
                "hooks' state?). Resume with peftlab's training loop, whose checkpoints hold it, or start again."
            )
        for adapter in self.adapters.values():
            adapter.start_moving()

    def state_dict(self) -> dict:
        return {
            path: {"moving": adapter.moving, "start_A": adapter.start_A.detach().cpu().clone(),
                   "start_B": adapter.start_B.detach().cpu().clone()}
            for path, adapter in self.adapters.items()
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.adapters):
            raise ValueError("the checkpoint's Delta-LoRA state is for other layers; resume with the saved run's options.")
        for path, adapter in self.adapters.items():
            saved = state[path]
            adapter.restore_start(bool(saved["moving"]), saved["start_A"], saved["start_B"])


class DeltaLoraMethod(LoraMethod):
    config_class = DeltaLoraConfig
    saves_as_lora = True
    # lora_dropout is declared so that `--lora-dropout 0.1` reaches the config and its specific error.
    options = {
        **LoraMethod.options,
        "delta_start_step": MethodOption(
            int, "optimizer steps of plain LoRA before the frozen weight starts to move (paper's K)",
            "a non-negative integer", lambda v: v >= 0,
        ),
        "delta_lambda": MethodOption(float, "how far the frozen weight moves per change of s·BA (paper's λ)",
                                     "non-negative", lambda v: v >= 0),
    }
    #: LoRA's run defaults, and the paper's λ = 2. K defaults to 0 for a run: the paper's K = 500 is for
    #: runs of thousands of steps, and would leave the lab's runs (~60 steps) plain LoRA.
    run_defaults = {"lr": 1e-3, "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "delta_start_step": 0, "delta_lambda": 2.0}
    #: The random starts only: Delta-LoRA moves the frozen weight itself, from the model's own.
    initialisations = (True, False, "gaussian", "orthogonal")

    def make_adapter(self, config, view, path, state):
        r, alpha = config.rank_and_alpha(path)
        return DeltaLoraAdapter(
            view, r, alpha, config.use_rslora, config.init_lora_weights, config.delta_lambda,
            moving=config.delta_start_step == 0,
        )

    def training_hooks(self, model, adapter_name):
        config = model.peft_config[adapter_name]
        return [DeltaStartHook(dict(model.adapters_of(adapter_name)), config.delta_start_step)]


# Its files are plain LoRA's: they load as LoRA.
register_method(DeltaLoraMethod("delta_lora", loads_peft_type=False))
