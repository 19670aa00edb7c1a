"""peftlab's training hooks for HF ``transformers.Trainer`` users.

    class MyTrainer(HookLossMixin, Trainer): ...        # only if a method adds a loss term
    trainer = MyTrainer(model=peft_model, args=args, train_dataset=ds,
                        callbacks=[TrainingHooksCallback()])

The callback runs ``on_step_begin``, ``after_backward`` and ``after_optimizer_step`` at the
matching Trainer events (``on_step_begin``, ``on_pre_optimizer_step`` after clipping,
``on_optimizer_step``), the same points as peftlab's own loop. A callback cannot change the
loss, so a method's regulariser (``extra_loss``) comes in through :class:`HookLossMixin`,
which adds it in ``compute_loss``; without the mixin the callback warns that it is missing.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from peftlab.train.hooks import HookRunner, TrainingHook, TrainingProgress, discover_hooks


def _progress(args, state) -> TrainingProgress:
    return TrainingProgress(step=state.global_step, total_steps=state.max_steps, epoch=state.epoch or 0.0, seed=args.seed)


def _unwrap(model):
    # Trainer may hand over a DDP/FSDP wrapper; the hooks live on the PeftModel inside.
    return getattr(model, "module", model)


class TrainingHooksCallback(TrainerCallback):
    def __init__(self) -> None:
        self.runner = HookRunner([])
        self.loss_mixin_seen = False  # set by HookLossMixin when it asks for the loss terms

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.runner = HookRunner(discover_hooks(_unwrap(model)))

    def on_step_end(self, args, state, control, **kwargs):
        adds_loss = any(type(hook).extra_loss is not TrainingHook.extra_loss for hook in self.runner.hooks)
        if state.global_step == 1 and adds_loss and not self.loss_mixin_seen:
            warnings.warn(
                "the method's training hooks add a loss term that this Trainer leaves out; "
                "subclass it with peftlab.train.callback.HookLossMixin to include it.",
                stacklevel=2,
            )

    def on_step_begin(self, args, state, control, **kwargs):
        self.runner.on_step_begin(_progress(args, state))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.runner.after_backward(_progress(args, state))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.runner.after_optimizer_step(_progress(args, state))


class HookLossMixin:
    """A ``Trainer`` mixin that adds the hooks' ``extra_loss`` to the training loss, once per step.

    It asks the hooks of the Trainer's :class:`TrainingHooksCallback`, so a hook's state (a
    regulariser switched off after pruning, say) is the same for the loss and the step events.
    """

    def _hook_runner(self) -> HookRunner:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TrainingHooksCallback):
                callback.loss_mixin_seen = True
                return callback.runner
        raise ValueError("HookLossMixin needs the hooks' callback: pass callbacks=[TrainingHooksCallback()] to the Trainer.")

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        extra = self._hook_runner().extra_loss(_progress(self.args, self.state))
        if extra is None:
            return result
        # Trainer divides a per-batch loss by the accumulation steps itself, unless the loss was
        # already normalised over the whole accumulated batch; either way the term counts once.
        # (The attributes are those of Trainer.training_step, read with fallbacks for older versions.)
        already_scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if already_scaled is None:
            already_scaled = (
                getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        if already_scaled:
            extra = extra / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra
