"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves to the layers that matter.

    h = x Wᵀ + s · (dropout(x) (Λ ⊙ P)ᵀ) Qᵀ,     s = lora_alpha / (init_r + 1e-5)   (HF's ``ranknum``)

    P = lora_A [r, in] (right singular vectors), Λ = lora_E [r, 1], Q = lora_B [out, r];
    init: Λ = 0, P, Q ~ N(0, 0.02²).  The scale keeps init_r after pruning, so pruning a component
    removes exactly its term and nothing else changes.

Importance, after every optimizer step t (HF's ``update_and_allocate``, before ``zero_grad``):

    I = |w ⊙ ∇w|  for every entry of P, Λ, Q;   Ī ← β₁ Ī + (1-β₁) I;   Ū ← β₂ Ū + (1-β₂) |I - Ī|
    score of component i = (Ī Ū)[Λ_i] + mean_j (Ī Ū)[P_ij] + mean_j (Ī Ū)[Q_ji]

Budget (total live components over all layers), a cubic schedule between ``tinit`` and
``total_step - tfinal``:  b(t) = init  for t <= tinit;  target + (init - target)(1 - (t - tinit) /
(total - tfinal - tinit))³ (truncated) in between;  target after.  Every ``deltaT`` steps in between,
the ``init - b(t)`` lowest-scored components are masked (Λ_i = 0, in place, as HF); at
``t = total - tfinal`` the final mask is taken, the scores dropped, and it is re-applied each step
after. The regulariser ``orth_reg_weight · mean over P, Q of ||PPᵀ - I||_F, ||QᵀQ - I||_F`` joins the
loss (HF adds it inside ``forward``; here it is the training hook's ``extra_loss``, which peftlab's
loop and ``HookLossMixin`` add).

Files are HF's: keys ``lora_A``/``lora_B``/``lora_E``, and once components are pruned,
``rank_pattern`` ({"<module>.lora_E": [kept?] * init_r}) with the tensors sliced to the kept ones;
loading such a file builds each layer at its kept rank with the same scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from peftlab.base import BaseLayerView
from peftlab.config import AdapterConfig
from peftlab.hooks import TrainingHook, TrainingProgress
from peftlab.methods.fused import LoraLinearFunction, can_fuse
from peftlab.methods.lora import LoraAdapter, LoraConfig, add_low_rank
from peftlab.methods.lora_targets import ADALORA_DEFAULT_TARGET_MODULES
from peftlab.methods.method import ADAPTER_DROPOUT, Method, MethodOption, UnsupportedBaseError
from peftlab.methods.registry import register_method

if TYPE_CHECKING:
    from peftlab.model import PeftModel

#: HF's guard against a zero rank in the scale ``alpha / (ranknum + 1e-5)``.
RANKNUM_EPS = 1e-5
#: How the three factors appear in the files and the importance scores.
FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclass
class AdaLoraConfig(AdapterConfig):
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    #: Optimizer steps of the run; peftlab's loop and the Trainer callback fill it when None.
    total_step: int | None = None
    #: {"<module path>.lora_E": [kept?] * init_r}: the components a saved, pruned adapter kept.
    rank_pattern: dict | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    # HF's LoraConfig fields that AdaLoRA files carry but AdaLoRA does not use (the rank is init_r).
    r: int = 8
    fan_in_fan_out: bool = False
    bias: str = "none"

    peft_type = "ADALORA"
    default_target_modules = ADALORA_DEFAULT_TARGET_MODULES
    unsupported_hf_fields = LoraConfig.unsupported_hf_fields

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaLoRA {name} must be a positive integer, got {value!r}.")
        if self.target_r > self.init_r:
            raise ValueError(
                f"AdaLoRA target_r ({self.target_r}) > init_r ({self.init_r}): AdaLoRA only prunes, so the target "
                "average rank must be at most the initial one; raise init_r or lower target_r."
            )
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AdaLoRA {name} must be an integer >= 0 (a number of steps), got {value!r}.")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"AdaLoRA {name} must be in (0, 1), got {getattr(self, name)}.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight}; 0 turns it off.")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}; 0 turns dropout off.")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported: peftlab trains no base biases; use bias='none'.")
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        for key, kept in (self.rank_pattern or {}).items():
            if not isinstance(kept, list) or len(kept) != self.init_r or not all(isinstance(k, bool) for k in kept):
                raise ValueError(
                    f"AdaLoRA rank_pattern[{key!r}] must be a list of init_r={self.init_r} booleans (the kept "
                    f"components), got {kept!r}."
                )

    def kept_components(self, module_path: str) -> list[bool] | None:
        """The saved mask of one layer (None: all ``init_r`` components), by HF's key."""
        return (self.rank_pattern or {}).get(f"{module_path}.lora_E")


def check_schedule(config: AdaLoraConfig, total_step: int) -> None:
    if isinstance(total_step, bool) or not isinstance(total_step, int) or total_step < 1:
        raise ValueError(f"AdaLoRA total_step must be a positive number of optimizer steps, got {total_step!r}.")
    if config.tinit >= total_step - config.tfinal:
        raise ValueError(
            f"AdaLoRA schedule leaves no steps to prune in: tinit ({config.tinit}) >= total_step ({total_step}) - "
            f"tfinal ({config.tfinal}); lower tinit or tfinal, or train for more steps."
        )


class AdaLoraAdapter(LoraAdapter):
    """LoRA whose down-projection is ``Λ ⊙ P``; holds its layer's importance averages while training."""

    def __init__(self, view: BaseLayerView, rank: int, init_r: int, config: AdaLoraConfig) -> None:
        super().__init__(view, rank, config.lora_alpha, config.lora_dropout, False, config.init_lora_weights)
        self.scaling = config.lora_alpha / (init_r + RANKNUM_EPS)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, dtype=self.lora_A.dtype, device=self.lora_A.device))
        if config.init_lora_weights is False:
            nn.init.normal_(self.lora_E)  # HF leaves all three at randn
        # Which of the built components the allocator kept (its last mask).
        self.register_buffer("kept", torch.ones(rank, dtype=torch.bool, device=self.lora_A.device), persistent=False)
        self.scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # factor -> (Ī, Ū)

    def reset_parameters(self, init) -> None:
        with torch.no_grad():
            if init is False:
                nn.init.normal_(self.lora_A), nn.init.normal_(self.lora_B)
            else:
                nn.init.normal_(self.lora_A, std=0.02), nn.init.normal_(self.lora_B, std=0.02)

    def factors(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    def _down(self) -> torch.Tensor:
        return self.lora_A * self.lora_E

    def forward(self, x, base_out, base):
        u = base.project_input(self._adapter_input(x), self._down())
        return add_low_rank(base_out, u, self.lora_B, self.scaling)

    def fused_forward(self, x: torch.Tensor, base: BaseLayerView) -> torch.Tensor | None:
        if not can_fuse(x, base, self.lora_A, self.lora_B):
            return None
        return LoraLinearFunction.apply(x, self._down(), self.lora_B, self.scaling, base, self.active_dropout())

    def delta_weight(self, base):
        return self.scaling * (self.lora_B @ self._down())

    def low_rank(self, base):
        """Exact factors without the pruned components: those whose singular value is exactly 0
        (masked) add nothing, so dropping them changes nothing -- also between two masks, when a
        pruned component has trained back to a non-zero value and is kept."""
        live = self.lora_E.detach().view(-1) != 0
        return self._down().detach()[live], self.scaling * self.lora_B.detach()[:, live]

    def saved_tensors(self):
        """The kept components only (HF slices by ``rank_pattern`` on save)."""
        if bool(self.kept.all()):
            return dict(self.factors())
        kept = self.kept
        return {"lora_A": self.lora_A[kept], "lora_E": self.lora_E[kept], "lora_B": self.lora_B[:, kept]}

    # -- the rank allocator's per-layer part -----------------------------------------------------

    def update_scores(self, beta1: float, beta2: float) -> None:
        """One step of the sensitivity (Ī) and uncertainty (Ū) averages, from this step's gradients."""
        for name, param in self.factors().items():
            if param.grad is None:
                raise RuntimeError(
                    f"AdaLoRA's allocation needs the gradient of {name}: call update_and_allocate after "
                    "loss.backward() and optimizer.step(), before zero_grad()."
                )
            sensitivity = (param.detach() * param.grad).abs()
            if name not in self.scores:
                self.scores[name] = (torch.zeros_like(sensitivity), torch.zeros_like(sensitivity))
            average, uncertainty = self.scores[name]
            average.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
            uncertainty.mul_(beta2).add_((sensitivity - average).abs_(), alpha=1 - beta2)

    def component_scores(self) -> torch.Tensor:
        """[r]: each component's score (Λ entry plus the mean over its row of P and column of Q)."""
        element = {name: average * uncertainty for name, (average, uncertainty) in self.scores.items()}
        return element["lora_E"].view(-1) + (element["lora_A"].mean(dim=1) + element["lora_B"].mean(dim=0))

    def apply_mask(self, kept: torch.Tensor | None = None) -> None:
        """Zero the singular values of the pruned components (a new mask, or the last one again)."""
        if kept is not None:
            self.kept.copy_(kept)
        with torch.no_grad():
            self.lora_E.masked_fill_(~self.kept.view(-1, 1), 0.0)

    def orthogonality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``||PPᵀ - I||_F`` and ``||QᵀQ - I||_F``."""
        gram_p, gram_q = self.lora_A @ self.lora_A.T, self.lora_B.T @ self.lora_B
        eye = torch.eye(gram_p.shape[0], dtype=gram_p.dtype, device=gram_p.device)
        return torch.norm(gram_p - eye, p="fro"), torch.norm(gram_q - eye, p="fro")


class RankAllocator(TrainingHook):
    """The model-level part: the budget schedule, the global ranking, the orthogonal regulariser.

    It keeps no state of its own (the averages and masks live in the layers), so a new instance per
    call -- ``PeftModel.update_and_allocate`` makes one each time -- continues where the last one was.
    """

    def __init__(self, model: PeftModel, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name

    @property
    def config(self) -> AdaLoraConfig:
        return self.model.peft_config[self.adapter_name]

    def layers(self) -> Iterator[tuple[str, AdaLoraAdapter]]:
        return self.model.adapters_of(self.adapter_name)

    def total_step(self, progress: TrainingProgress) -> int:
        """``total_step`` of the config, or filled (once, into the config, as HF's ``set_total_step``) from the run."""
        config = self.config
        if config.total_step is None:
            if not progress.total_steps:
                raise ValueError(
                    "AdaLoRA needs total_step (the run's optimizer steps) to schedule its rank budget: set "
                    "AdaLoraConfig(total_step=...); peftlab train and the Trainer callback fill it from the run."
                )
            check_schedule(config, progress.total_steps)
            config.total_step = progress.total_steps
        return config.total_step

    def on_step_begin(self, progress: TrainingProgress) -> None:
        self.total_step(progress)  # a schedule that cannot work fails before the first step, not after it

    def extra_loss(self, progress: TrainingProgress) -> torch.Tensor | None:
        weight = self.config.orth_reg_weight
        if weight == 0:
            return None
        norms = [norm for _, adapter in self.layers() for norm in adapter.orthogonality()]
        return weight * (torch.stack(norms).sum() / len(norms)) if norms else None

    def budget(self, step: int, total_step: int) -> tuple[int, bool]:
        """HF's cubic schedule: (live components over all layers, whether to mask at this step)."""
        config, layers = self.config, [adapter for _, adapter in self.layers()]
        initial, target = sum(a.lora_A.shape[0] for a in layers), config.target_r * len(layers)
        if step <= config.tinit:
            return initial, False
        if step > total_step - config.tfinal:
            return target, True
        remaining = 1 - (step - config.tinit) / (total_step - config.tfinal - config.tinit)
        return int((initial - target) * remaining**3 + target), step % config.deltaT == 0

    def after_optimizer_step(self, progress: TrainingProgress) -> None:
        config, step = self.config, progress.step
        end = self.total_step(progress) - config.tfinal
        layers = [adapter for _, adapter in self.layers()]
        if step > end:
            for adapter in layers:
                adapter.apply_mask()
            return
        if step < end:
            with torch.no_grad():
                for adapter in layers:
                    adapter.update_scores(config.beta1, config.beta2)
        budget, mask_now = self.budget(step, config.total_step)
        if mask_now or step == end:
            self.mask_to_budget(layers, budget)
        if step == end:
            for adapter in layers:
                adapter.scores.clear()

    @staticmethod
    def mask_to_budget(layers: list[AdaLoraAdapter], budget: int) -> None:
        """Keep the ``budget`` best components over all layers (ties at the threshold go, as in HF)."""
        scores = [adapter.component_scores() for adapter in layers]
        pruned = sum(s.numel() for s in scores) - budget
        if pruned <= 0:
            return
        threshold = torch.kthvalue(torch.cat(scores), k=pruned).values
        for adapter, score in zip(layers, scores):
            adapter.apply_mask(score > threshold)

    def state_dict(self) -> dict:
        state = {}
        for path, adapter in self.layers():
            state[f"{path}.kept"] = adapter.kept.clone()
            for name, (average, uncertainty) in adapter.scores.items():
                state[f"{path}.{name}.sensitivity"], state[f"{path}.{name}.uncertainty"] = average.clone(), uncertainty.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        for path, adapter in self.layers():
            adapter.kept.copy_(state[f"{path}.kept"])
            adapter.scores = {
                name: (state[f"{path}.{name}.sensitivity"].clone(), state[f"{path}.{name}.uncertainty"].clone())
                for name in FACTORS if f"{path}.{name}.sensitivity" in state
            }


class AdaLoraMethod(Method):
    config_class = AdaLoraConfig
    options = {
        "init_r": MethodOption(int, "AdaLoRA: initial rank of every layer", "positive", lambda v: v > 0),
        "target_r": MethodOption(int, "AdaLoRA: average rank left after pruning", "positive", lambda v: v > 0),
        "lora_alpha": MethodOption(float, "LoRA scale numerator, s = alpha / r", "positive", lambda v: v > 0, relative_to="r"),
        "lora_dropout": ADAPTER_DROPOUT,
        "tinit": MethodOption(int, "AdaLoRA: steps before pruning starts", "an integer >= 0", lambda v: v >= 0),
        "tfinal": MethodOption(int, "AdaLoRA: steps at the final budget", "an integer >= 0", lambda v: v >= 0),
        "orth_reg_weight": MethodOption(float, "AdaLoRA: orthogonal regulariser weight", ">= 0", lambda v: v >= 0),
    }
    #: Rank 12 pruned to an average of 8 (HF's defaults); alpha 24 gives the scale 2 of the lab's LoRA.
    #: lr 1e-2, not LoRA's 1e-3: with E = 0 and P, Q ~ N(0, 0.02²) the update starts ~100x smaller than
    #: LoRA's, and at the lab's default budget (MiniLM-L6, SST-2, 63 steps) lr 1e-3 and 3e-3 leave the
    #: model at chance (val accuracy 0.509 / 0.520) while 1e-2 reaches 0.786 (LoRA at 1e-3: 0.783).
    #: The paper trains for tens of thousands of steps at 5e-4..2.2e-3: pass --lr for long runs.
    run_defaults = {"lr": 1e-2, "init_r": 12, "target_r": 8, "lora_alpha": 24, "lora_dropout": 0.05}

    def check_base(self, config, view, path):
        if view.takes_ids:
            raise UnsupportedBaseError(
                f"AdaLoRA on an Embedding layer ({path}) is not supported (nor in HF peft); target linear layers."
            )

    def inject(self, model, adapter_name, config, targets):
        trainable = [n for n, c in model.peft_config.items() if isinstance(c, AdaLoraConfig) and not c.inference_mode]
        if len(trainable) > 1:
            raise ValueError(
                f"AdaLoRA trains one adapter at a time, and {', '.join(repr(n) for n in trainable if n != adapter_name)} "
                f"is trainable already: add {adapter_name!r} with inference_mode=True (or load it with "
                "is_trainable=False), or delete the other first."
            )
        return None

    def make_adapter(self, config, view, path, state):
        kept = config.kept_components(path)
        return AdaLoraAdapter(view, sum(kept) if kept is not None else config.init_r, config.init_r, config)

    def training_hooks(self, model, adapter_name):
        # An adapter loaded for inference does not train, so nothing to allocate.
        return [] if model.peft_config[adapter_name].inference_mode else [RankAllocator(model, adapter_name)]

    def rank_per_layer(self, model, adapter_name):
        return rank_per_layer(model, adapter_name)

    def export_config(self, model, adapter_name, config):
        data = config.to_hf_dict()
        layers = list(model.adapters_of(adapter_name))
        if config.rank_pattern is not None or not all(bool(a.kept.all()) for _, a in layers):
            data["rank_pattern"] = {f"{path}.lora_E": _full_mask(config, path, adapter) for path, adapter in layers}
        return data


def _full_mask(config: AdaLoraConfig, path: str, adapter: AdaLoraAdapter) -> list[bool]:
    """The layer's kept components out of ``init_r``: the loaded pattern, narrowed by the current mask."""
    built = config.kept_components(path) or [True] * config.init_r
    current = iter(adapter.kept.tolist())
    return [bool(was and next(current)) for was in built]


def rank_per_layer(model: PeftModel, adapter_name: str) -> dict[str, int]:
    """The live components of each layer: where AdaLoRA put its budget."""
    return {path: int(adapter.kept.sum()) for path, adapter in model.adapters_of(adapter_name)}


register_method(AdaLoraMethod("adalora"))
