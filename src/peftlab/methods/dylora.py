"""DyLoRA (Valipour et al. 2022), method name ``dylora``: one LoRA adapter that works at every rank.

LoRA with ``r`` as the maximum rank. Each training step draws one rank ``b ~ U{min_rank..r}`` for
every layer and runs LoRA on the first ``b`` components with scale ``alpha / b``:

    h = x Wᵀ + (alpha / b) · x A[:b]ᵀ B[:, :b]ᵀ

In the default "frozen" mode the components below ``b`` are detached, so only component ``b``
learns that step (``frozen=False`` trains all of the first ``b``). In frozen mode LoRA's fused node
runs on ``A[:b]``, ``B[:, :b]`` and hands ``A`` and ``B`` component b's gradient alone
(:class:`NewestComponentLoraFunction`). The rank comes from
``TrainingProgress.generator()``: the same ``b`` in every DDP process, and again on resume.
After training, ``model.set_rank(b)`` runs the adapter at any ``b <= r`` (forward, merge and
export); merging records the rank it merged, so unmerging restores the weight whatever the rank
is by then (the official code does not, and corrupts ``W``), and ``set_rank`` refuses while merged.

Files: LoRA's keys (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]) under ``peft_type``
"DYLORA" (HF peft has no DyLoRA); ``save_pretrained(as_lora=True)`` writes plain LoRA at the
chosen rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftlab.config import AdapterConfig
from peftlab.hooks import TrainingHook, TrainingProgress
from peftlab.methods.fused import LoraLinearFunction, can_fuse
from peftlab.methods.lora import LoraAdapter, _check_positive
from peftlab.methods.lora_targets import LORA_DEFAULT_TARGET_MODULES
from peftlab.methods.method import ADAPTER_DROPOUT, Method, MethodOption
from peftlab.methods.registry import register_method


@dataclass
class DyLoraConfig(AdapterConfig):
    r: int = 8  # the largest rank; the adapter works at every rank up to it
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    frozen: bool = True  # train only component b of each step (the paper's default); False: all of 1..b
    min_rank: int = 1  # the smallest rank drawn in training

    peft_type = "DYLORA"
    default_target_modules = LORA_DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("r", self.r, whole=True)
        _check_positive("lora_alpha", self.lora_alpha)
        _check_positive("min_rank", self.min_rank, whole=True)
        if self.min_rank > self.r:
            raise ValueError(f"min_rank ({self.min_rank}) must be at most r ({self.r}): ranks are drawn from min_rank..r.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}; 0 turns dropout off.")


class DyLoraAdapter(LoraAdapter):
    def __init__(self, view, config: DyLoraConfig) -> None:
        super().__init__(view, config.r, config.lora_alpha, config.lora_dropout, False, True)
        self.alpha = config.lora_alpha
        self.frozen = config.frozen
        self.rank = config.r  # the rank outside training: set_rank
        self.step_rank: int | None = None  # the rank of the training step in flight (DyLoraRankSampler)
        self.merged_rank: int | None = None

    def current_rank(self) -> int:
        return self.step_rank if self.training and self.step_rank is not None else self.rank

    def update_factors(self):
        return self.factors_at(self.current_rank())

    def trains_newest_only(self) -> bool:
        """A frozen-mode training step: components below the step's rank get no gradient."""
        return self.frozen and self.training and self.step_rank is not None

    def factors_at(self, b: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, up = self.lora_A[:b], self.lora_B[:, :b]
        if self.trains_newest_only() and b > 1:
            # Components below b are fixed this step: only the newest one gets a gradient.
            a = torch.cat([a[:-1].detach(), a[-1:]])
            up = torch.cat([up[:, :-1].detach(), up[:, -1:]], dim=1)
        return a, up, self.alpha / b

    def fused_forward(self, x, base):
        if not self.trains_newest_only():
            return super().fused_forward(x, base)
        a, up = self.lora_A, self.lora_B
        if not can_fuse(x, base, a, up):
            return None
        b = self.step_rank
        return NewestComponentLoraFunction.apply(x, a, up, b, self.alpha / b, base, self.active_dropout())

    def _delta_at(self, b: int) -> torch.Tensor:
        a, up, scale = self.factors_at(b)
        return scale * (up @ a).detach()

    def merge(self, base):
        self.merged_rank = self.rank
        base.add_to_weight(self._delta_at(self.rank))

    def unmerge(self, base):
        if self.merged_rank is None:
            raise RuntimeError("unmerge called on a DyLoRA adapter that was never merged.")
        # The update of the rank that was merged, whatever the rank is now.
        base.add_to_weight(-self._delta_at(self.merged_rank))
        self.merged_rank = None


class NewestComponentLoraFunction(LoraLinearFunction):
    """LoRA's fused node (``fused.py``) at rank ``b`` on the full factors, in frozen mode: the forward
    and the input's gradient are LoRA's on ``A[:b]``, ``B[:, :b]``; ``A`` and ``B`` get the gradient
    of component ``b`` alone, zero elsewhere. The same values as detaching components ``< b`` by
    slicing and concatenating, without those half a dozen autograd nodes per layer and step."""

    @staticmethod
    def forward(ctx, x, a, b, rank: int, scale: float, view, dropout: float = 0.0):
        ctx.rank, ctx.factor_shapes = rank, (a.shape, b.shape)
        return LoraLinearFunction.forward(ctx, x, a[:rank], b[:, :rank], scale, view, dropout)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_a, grad_b, *_ = LoraLinearFunction.backward(ctx, grad_out)
        newest = ctx.rank - 1
        if grad_a is not None:
            full_a = grad_a.new_zeros(ctx.factor_shapes[0])
            full_a[newest] = grad_a[newest]
            grad_a = full_a
        if grad_b is not None:
            full_b = grad_b.new_zeros(ctx.factor_shapes[1])
            full_b[:, newest] = grad_b[:, newest]
            grad_b = full_b
        return grad_x, grad_a, grad_b, None, None, None, None


class DyLoraRankSampler(TrainingHook):
    """Draws the step's rank before its first forward and clears it after the optimizer step."""

    works_on_shards = True  # sets a rank, reads no tensor

    def __init__(self, adapters: list[DyLoraAdapter], config: DyLoraConfig) -> None:
        self.adapters = adapters
        self.low, self.high = config.min_rank, config.r

    def on_step_begin(self, progress: TrainingProgress) -> None:
        rank = int(torch.randint(self.low, self.high + 1, (), generator=progress.generator()))
        for adapter in self.adapters:
            adapter.step_rank = rank

    def after_optimizer_step(self, progress: TrainingProgress) -> None:
        for adapter in self.adapters:
            adapter.step_rank = None


class DyLoraMethod(Method):
    config_class = DyLoraConfig
    options = {
        "r": MethodOption(int, "adapter rank (the largest; DyLoRA works at every rank up to it)", "positive", lambda v: v > 0),
        "lora_alpha": MethodOption(float, "LoRA scale numerator, s = alpha / b at rank b", "positive", lambda v: v > 0, relative_to="r"),
        "lora_dropout": ADAPTER_DROPOUT,
    }
    #: LoRA's run defaults but the lr; at any b the scale alpha / b is 2r / b >= 2. Each step trains one
    #: component of r (frozen mode), so at LoRA's lr 1e-3 the lab's default budget (MiniLM-L6, SST-2, 63
    #: steps) leaves the model at chance (val accuracy 0.513); 3e-3 reaches 0.728, 1e-2 diverges (0.509).
    run_defaults = {"lr": 3e-3, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05}

    def make_adapter(self, config, view, path, state):
        return DyLoraAdapter(view, config)

    def training_hooks(self, model, adapter_name):
        adapters = [adapter for _, adapter in model.adapters_of(adapter_name)]
        return [DyLoraRankSampler(adapters, model.peft_config[adapter_name])]

    def inference_ranks(self, model, adapter_name):
        return list(range(1, model.peft_config[adapter_name].r + 1))

    def as_low_rank(self, model, adapter_name, rank=None):
        """Exact at any rank it runs at: the first ``rank`` components (default: the set rank)."""
        if rank is None or rank not in self.inference_ranks(model, adapter_name):
            return super().as_low_rank(model, adapter_name, rank)
        factors = {}
        for path, adapter in model.adapters_of(adapter_name):
            a, b, scale = adapter.factors_at(rank)
            factors[path] = (a.detach(), scale * b.detach())
        return factors

    def set_rank(self, model, adapter_name, rank):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank not in self.inference_ranks(model, adapter_name):
            r = model.peft_config[adapter_name].r
            raise ValueError(f"set_rank({rank!r}): a DyLoRA adapter runs at ranks 1..{r} (its r); choose one of those.")
        adapters = [adapter for _, adapter in model.adapters_of(adapter_name)]
        if any(adapter.merged_rank is not None for adapter in adapters):
            raise ValueError(f"set_rank({rank}): adapter {adapter_name!r} is merged at rank {adapters[0].merged_rank}; "
                             "unmerge_adapter() first, then set the rank and merge again.")
        for adapter in adapters:
            adapter.rank = rank


register_method(DyLoraMethod("dylora"))
