"""The training loop: one run of :class:`TrainOptions`, from model and data to metrics.json.

    metrics = run_training(TrainOptions(model="minilm-l6", method="lora", out="runs/lora"))

One optimizer step takes ``grad_accum`` global batches of ``batch_size`` examples; each process
computes its slice (see :mod:`.distributed`). The loss of a step is the mean over all its
examples (causal LM: its label tokens), however they are split into micro-batches and
processes, so one process and two give the same update. The method's hooks run at their points
of the step (see :mod:`.hooks`).

Data order is a permutation per epoch drawn from ``(seed, epoch)`` alone, so a resumed run
needs only the step count to find its place, and restores the RNG states for dropout.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from peftlab.checkpointing import enable_activation_checkpointing
from peftlab.io import append_text, atomic_write_text
from peftlab.model import PeftModel, count_parameters
from peftlab.optim import make_optimizer, make_scheduler
from peftlab.trackers import TrackedRun, TrackerGroup, require_trackers
from peftlab.train.checkpoint import (
    CheckpointError,
    checkpoints_in,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from peftlab.train.data_fingerprint import data_sha256
from peftlab.train.distributed import Processes, start_processes
from peftlab.train.fsdp import (
    full_optimizer_state,
    full_trainable_parameters,
    full_trainable_tensors,
    full_value,
    held_bytes,
    load_full_optimizer_state,
    load_full_tensors,
)
from peftlab.train.evaluate import evaluate, forward_totals, label_count, shard_batches
from peftlab.train.hooks import HookRunner, TrainingProgress, discover_hooks
from peftlab.train.options import METHOD_OPTIONS, OptionsError, TrainOptions
from peftlab.train.loop_state import EvalPoint, LoopState
from peftlab.train.phase_clock import PhaseClock, split_per_step
from peftlab.train.run_metrics import RunMetrics
from peftlab.data import DataError
from peftlab.data.encoded import EncodedRows
from peftlab.data.packing import PackedRows, check_packing_is_exact, examples_in
from peftlab.train.build import build_model, load_datasets, make_collator, prepare_rows, save_trained
from peftlab.train.data_init import DataDrivenInit
from peftlab.train.run_folder import claim_output_folder

#: Options a resumed run must share with the saved one for its loss curve to continue exactly.
MUST_MATCH_ON_RESUME = (
    "model", "task", "dataset", "data_dir", "max_train_samples", "max_length", "chat_template", "train_on_prompt",
    "packing", "method", "quantize",
    *METHOD_OPTIONS, "target_modules", "method_options", "optimizer", "lr", "weight_decay",
    "momentum", "scheduler", "warmup_ratio", "epochs", "max_steps", "batch_size", "grad_accum",
    "max_grad_norm", "bf16", "seed",
)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the run stopped before applying the step."""


def run_training(options: TrainOptions) -> RunMetrics:
    """Train as ``options`` say and return what the run measured (the content of metrics.json).

    Global state is left as found: the process group this call started is destroyed, and the
    torch and python RNG states are restored, so callers can run several trainings in a row.
    """
    options = options.with_method_defaults()
    require_trackers(options.report_to)  # a missing tracker package is refused before anything loads
    with _preserved_rng():
        processes = start_processes(options.device, options.strategy)
        try:
            claim = claim_output_folder(Path(options.out), options.overwrite, resumes_into(options))
            with claim if processes.is_main else contextlib.nullcontext(Path(options.out)) as folder:
                return TrainingRun(options, processes, folder).run()
        finally:
            processes.close()


def resumes_into(options: TrainOptions) -> bool:
    """Whether ``--resume`` continues the run in ``--out`` itself (then its files are expected there)."""
    if not options.resume:
        return False
    return find_checkpoint(options.resume).resolve().parent == Path(options.out).resolve()


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    python_state = random.getstate()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        try:
            yield
        finally:
            random.setstate(python_state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_memory(device: torch.device) -> bool:
    """Make :func:`peak_memory_mb` count from now on; False where it cannot (RSS outside Linux).

    Loading a model peaks above training when the weights are converted or sharded after loading
    (every FSDP2 process loads the whole model first): the training peak is measured apart.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the RSS high-water mark ru_maxrss reads
    except OSError:
        return False
    return True


class TrainingRun:
    def __init__(self, options: TrainOptions, processes: Processes, folder: Path | None = None) -> None:
        self.processes = processes
        self.out = folder or Path(options.out)  # a staging folder while the run replaces another (--overwrite)
        seed_everything(options.seed)
        train_data, eval_data = load_datasets(options)
        # EVA and CorDA start from the run's own batches (train/data_init.py).
        self.init_data = DataDrivenInit(train_data, lambda tokenizer: make_collator(options, tokenizer),
                                        options.batch_size, options.seed)
        model, self.tokenizer, options = build_model(
            options, getattr(train_data, "num_labels", None), getattr(train_data, "label_names", None),
            self.init_data,
        )
        self.prepared = prepare_rows(options, {"train": train_data, "eval": eval_data}, self.tokenizer, model)
        self.train_data, self.eval_data = self.prepared.splits["train"], self.prepared.splits["eval"]
        options = self.prepared.options
        self.options = options
        if options.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        # FSDP2 moves each process's shards to the device itself: the whole model never goes there.
        self.model = model if processes.sharded else model.to(processes.device)
        self.collate = make_collator(options, self.tokenizer)
        if options.packing:
            if not isinstance(self.train_data, EncodedRows):
                raise OptionsError("--packing lays causal-LM rows end to end; it does not apply to "
                                   f"{options.task} data or plain-text windows (already full): drop --packing.")
            check_packing_is_exact(self.model)
        self.ddp_model = processes.wrap(self.model)
        self.hooks = HookRunner(discover_hooks(self.model))
        assert options.lr is not None, "with_method_defaults gives every run a learning rate"
        self.optimizer = make_optimizer(self.model, options.optimizer, options.lr, options.weight_decay, options.momentum)
        self.batches_per_epoch = self._count_batches()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / options.grad_accum)
        self.total_steps = options.max_steps or options.epochs * self.steps_per_epoch
        warmup = int(options.warmup_ratio * self.total_steps)
        self.scheduler = make_scheduler(self.optimizer, options.scheduler, self.total_steps, warmup)
        # Dropout differs per process, as in any data-parallel run; initialisation above did not.
        torch.manual_seed(options.seed + processes.rank)
        self.state = LoopState(data_sha256=data_sha256(self.train_data, self.eval_data))
        if options.resume:
            self._resume(options.resume)

    # -- data ----------------------------------------------------------------------------------------

    def _count_batches(self) -> int:
        world_size = self.processes.world_size
        if self.options.batch_size < world_size:  # a process would get an empty micro-batch
            raise OptionsError(
                f"--batch-size {self.options.batch_size} is the global batch, split over {world_size} processes: "
                f"each needs at least one example; use --batch-size {world_size} or more (or fewer processes)."
            )
        # A trailing batch too small to give every process an example is dropped.
        full, rest = divmod(len(self.train_data), self.options.batch_size)
        count = full + (rest >= self.processes.world_size)
        if count == 0:
            raise OptionsError(
                f"the training set has {self._size_of_training_set()}, too few for one batch on "
                f"{self.processes.world_size} processes; add data or lower --batch-size."
            )
        return count

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``: example indices, shuffled by ``(seed, epoch)`` only."""
        generator = torch.Generator().manual_seed(self.options.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_data), generator=generator).tolist()
        size = self.options.batch_size
        return [order[i * size : (i + 1) * size] for i in range(self.batches_per_epoch)]

    def local_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.collate([self.train_data[i] for i in self.processes.shard(indices)])

    def batch_tokens(self, indices: list[int], batch: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(real tokens, token slots) of this process's batch: slots include the padding."""
        slots = batch["input_ids"].numel()
        if isinstance(self.train_data, EncodedRows):
            lengths = self.train_data.lengths
            return sum(min(lengths[i], self.options.max_length) for i in self.processes.shard(indices)), slots
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum()), slots
        return slots, slots

    # -- resume --------------------------------------------------------------------------------------

    def _resume(self, path: str) -> None:
        checkpoint = load_checkpoint(path)
        saved = checkpoint.state["options"]
        differing = [k for k in MUST_MATCH_ON_RESUME if saved.get(k) != getattr(self.options, k)]
        if differing:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {getattr(self.options, k)!r}" for k in differing)
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written with other options ({details}); resume with the saved ones."
            )
        if len(checkpoint.rng) != self.processes.world_size:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written by {len(checkpoint.rng)} processes; "
                f"resume with the same number (now {self.processes.world_size})."
            )
        saved_data = checkpoint.state.get("data_sha256")  # checkpoints before it was recorded have none
        if saved_data is not None and saved_data != self.state.data_sha256:
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was trained on other data: the examples of {self.options.dataset} "
                "changed since (a file edited, added or removed). Resume with the data it was trained on, or start "
                "a new run (--overwrite)."
            )
        params = dict(self.model.named_parameters())
        trainable = {k for k, p in params.items() if p.requires_grad}
        if set(checkpoint.trainable) != trainable:
            raise CheckpointError(f"checkpoint {checkpoint.path} does not hold this model's trainable parameters.")
        load_full_tensors(params, checkpoint.trainable)  # whole tensors, sharded here under FSDP2
        load_full_optimizer_state(self.optimizer, checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.hooks.load_state_dict(checkpoint.hooks)
        restore_rng_state(checkpoint.rng[self.processes.rank])
        try:
            saved_state = LoopState.from_dict({k: v for k, v in checkpoint.state.items() if k != "options"})
        except ValueError as error:
            raise CheckpointError(f"checkpoint {checkpoint.path}: {error}; resume it with that version.") from None
        saved_state.data_sha256 = self.state.data_sha256
        self.state = saved_state
        self._log(f"resumed from {checkpoint.path} at step {self.state.step}")

    def _save_checkpoint(self) -> None:
        # Every process takes part (gathering RNG states, and under FSDP2 the shards); only the first writes.
        rng = self.processes.gather(rng_state())
        trainable, optimizer = full_trainable_tensors(self.model), full_optimizer_state(self.optimizer)
        if not self.processes.is_main:
            return
        path = save_checkpoint(
            self.out,
            self.state.step,
            trainable=trainable,
            optimizer=optimizer,
            scheduler=self.scheduler.state_dict(),
            hooks=self.hooks.state_dict(),
            rng=rng,
            state={**self.state.to_dict(), "options": self.options.to_dict()},
        )
        self._log(f"saved {path}")

    # -- one step ------------------------------------------------------------------------------------

    def progress(self) -> TrainingProgress:
        epoch = self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch
        return TrainingProgress(self.state.step, self.total_steps, epoch, self.options.seed)

    def train_step(self, global_batches: list[list[int]]) -> tuple[float, int]:
        """One optimizer step; returns the step's mean loss and how many examples it used."""
        task, device = self.options.task, self.processes.device
        batches = [self.local_batch(indices) for indices in global_batches]
        local_count = sum(label_count(task, b["labels"]) for b in batches)
        global_count = float(self.processes.sum(torch.tensor(local_count)))
        if global_count == 0:
            rows = sum(len(indices) for indices in global_batches)
            raise DataError(
                f"step {self.state.step + 1}: every label of its {rows} rows is masked (nothing to learn: "
                f"responses cut away by --max-length {self.options.max_length}, or empty); raise --max-length, "
                f"or remove the rows the run's notice counts"
            )
        for indices, batch in zip(global_batches, batches):
            tokens, slots = self.batch_tokens(indices, batch)
            self.state.tokens_seen += tokens
            self.state.token_slots += slots
        progress = self.progress()
        self.hooks.on_step_begin(progress)
        self.ddp_model.train()
        totals = torch.zeros(3, dtype=torch.float64)
        clock = PhaseClock(self.state.phase_time_s, enabled=device.type == "cpu")
        for i, batch in enumerate(batches):
            with self.processes.no_sync(self.ddp_model, skip=i < len(batches) - 1):
                clock.mark()
                result = forward_totals(self.ddp_model, batch, task, device, self.options.bf16)
                # DDP averages gradients over processes; this scaling turns that into the global mean.
                loss = result.loss_sum * (self.processes.world_size / max(global_count, 1.0))
                extra = self.hooks.extra_loss(progress)
                if extra is not None:
                    loss = loss + extra / len(batches)
                clock.lap("forward")
                loss.backward()
                clock.lap("backward")
            totals += torch.tensor([result.loss_sum.item(), result.count, result.correct], dtype=torch.float64)
        loss_sum, count, correct = self.processes.sum(totals).tolist()
        step_loss = loss_sum / max(count, 1.0)
        self._stop_if_diverged("loss", step_loss)
        clock.mark()
        if self.options.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.options.max_grad_norm
            )
            self._stop_if_diverged("gradient norm", float(full_value(norm)))
        self.hooks.after_backward(progress)
        self.optimizer.step()
        self.hooks.after_optimizer_step(progress)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        self.state.epoch_correct += int(correct)
        self.state.epoch_count += int(count)
        examples = sum(examples_in(self.train_data, indices) for indices in global_batches)
        return step_loss, examples

    def _stop_if_diverged(self, what: str, value: float) -> None:
        if math.isfinite(value):
            return
        self.optimizer.zero_grad(set_to_none=True)
        saved = checkpoints_in(self.out)
        keep = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved (use --save-every)"
        if self.out != Path(self.options.out):
            keep = f"the run it was to replace in {self.options.out} is kept as it was"
        raise TrainingDiverged(
            f"the training {what} became {value} at step {self.state.step + 1}; the step was not applied and "
            f"{keep}. Lower --lr (now {self.options.lr:g}), keep --max-grad-norm on, or turn off --bf16."
        )

    # -- the run -------------------------------------------------------------------------------------

    def run(self) -> RunMetrics:
        with self._start_trackers() as self.trackers:
            return self._train()

    def _start_trackers(self) -> TrackerGroup:
        """The run's trackers, on the first process only; a run resumed in its own folder continues its tracker runs."""
        options = self.options
        if not (options.report_to and self.processes.is_main):
            return TrackerGroup([])
        run = TrackedRun(options.run_name or Path(options.out).resolve().name, options.run_group, self.out, options.to_dict())
        resume_ids = self.state.tracker_runs if resumes_into(options) else None
        trackers = TrackerGroup.start(options.report_to, run, resume_ids)
        self.state.tracker_runs = trackers.run_ids()
        return trackers

    def _size_of_training_set(self) -> str:
        """'N examples', or under --packing 'N examples in M packed sequences' (what a batch counts)."""
        data = self.train_data
        if isinstance(data, PackedRows):
            return f"{data.examples} examples in {len(data)} packed sequences"
        return f"{len(data)} examples"

    def _train(self) -> RunMetrics:
        options, state = self.options, self.state
        trainable, total = count_parameters(self.model)
        self._log(
            f"training {options.method} on {options.model}: {trainable:,} of {total:,} parameters trainable; "
            f"{self._size_of_training_set()}, {self.total_steps} steps, "
            f"{self.processes.world_size} process(es) on {self.processes.device}"
        )
        self._write_metrics_lines(state.logged, mode="w")
        self.load_peak_memory = peak_memory_mb(self.processes.device)
        self.can_measure_training_peak = reset_peak_memory(self.processes.device)
        bar = tqdm(
            total=self.total_steps, initial=state.step, desc="train", unit="step", file=sys.stderr,
            disable=not (self.processes.is_main and sys.stderr.isatty()), dynamic_ncols=True,
        )
        window: list[tuple[float, float, int, int]] = []  # (loss, seconds, examples, tokens) since the last log line
        with bar:
            while state.step < self.total_steps:
                batches = self.epoch_batches(state.epoch)
                while state.batch_in_epoch < len(batches) and state.step < self.total_steps:
                    start = state.batch_in_epoch
                    group = batches[start : start + options.grad_accum]
                    lr = float(self.scheduler.get_last_lr()[0])
                    began, tokens_before = time.perf_counter(), state.tokens_seen
                    loss, examples = self.train_step(group)
                    seconds = time.perf_counter() - began
                    state.step += 1
                    state.batch_in_epoch += len(group)
                    state.train_time_s += seconds
                    state.examples_seen += examples
                    state.train_loss_curve.append(loss)
                    window.append((loss, seconds, examples, state.tokens_seen - tokens_before))
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                    if state.step % options.log_every == 0 or state.step == self.total_steps:
                        self._log_window(window, lr)
                        window = []
                    if options.eval_every and state.step % options.eval_every == 0:
                        self._evaluate()
                    if options.save_every and state.step % options.save_every == 0:
                        self._save_checkpoint()
                if state.batch_in_epoch >= len(batches):
                    self._close_epoch_accuracy()
                    state.epoch += 1
                    state.batch_in_epoch = 0
        if state.epoch_count:  # a run that stopped inside an epoch reports that epoch's accuracy too
            self._close_epoch_accuracy()
        if not state.val_curve or state.val_curve[-1]["step"] != state.step:
            self._evaluate()
        return self._finish(state.val_curve[-1], trainable, total)

    def _close_epoch_accuracy(self) -> None:
        state = self.state
        state.train_accuracy.append(state.epoch_correct / max(state.epoch_count, 1))
        state.epoch_correct = state.epoch_count = 0

    def _evaluate(self) -> None:
        batches = shard_batches(self.eval_data, self.collate, self.processes, self.options.eval_batch_size,
                                lockstep=self.processes.sharded)
        metrics = evaluate(self.model, batches, self.options.task, self.processes, self.options.bf16)
        self.state.val_curve.append({"step": self.state.step, **metrics})
        self.trackers.log("eval", metrics, self.state.step)
        self._log("eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f" at step {self.state.step}")

    def _finish(self, last_eval: EvalPoint, trainable: int, total: int) -> RunMetrics:
        state = self.state
        train_time = state.train_time_s
        training_peak = peak_memory_mb(self.processes.device)
        peak_memory = self.processes.gather(max(training_peak, self.load_peak_memory))
        metrics = RunMetrics(
            eval={k: v for k, v in last_eval.items() if k != "step"},
            train_time_s=train_time,
            init_time_s=self.init_data.seconds,
            peak_memory_mb=max(peak_memory),
            peak_memory_mb_per_process=peak_memory,
            training_peak_memory_mb_per_process=self.processes.gather(
                training_peak if self.can_measure_training_peak else None),
            model_bytes_per_process=self.processes.gather(held_bytes(self.model)),
            trainable_params=trainable,
            total_params=total,
            steps=state.step,
            epochs=self.progress().epoch,
            train_loss_curve=state.train_loss_curve,
            val_curve=state.val_curve,
            train_accuracy=state.train_accuracy,
            time_per_step_s=train_time / max(state.step, 1),
            time_split_per_step_s=split_per_step(state.phase_time_s, state.step),
            examples_per_s=state.examples_seen / train_time if train_time else 0.0,
            train_tokens_per_s=state.tokens_seen / train_time if train_time else 0.0,
            padding_share=state.padding_share,
            data=self.prepared.metrics(),
            world_size=self.processes.world_size,
            strategy=self.processes.strategy,
            options=self.options.to_dict(),
        )
        with full_trainable_parameters(self.model):  # a collective under FSDP2
            if self.processes.is_main:
                save_trained(self.model, self.tokenizer, self.out)
        if self.processes.is_main:
            atomic_write_text(self.out / "metrics.json", json.dumps(metrics.to_dict(), indent=1) + "\n")
            self.trackers.log("final", {k: v for k, v in metrics.items() if k not in metrics.eval}, state.step)
            self._log(f"wrote {self.options.out}")
        self.processes.barrier()
        return metrics

    # -- logging -------------------------------------------------------------------------------------

    def _log_window(self, window: list[tuple[float, float, int, int]], lr: float) -> None:
        seconds = sum(s for _, s, _, _ in window)
        row = {
            "step": self.state.step,
            "epoch": round(self.progress().epoch, 4),
            "loss": sum(loss for loss, _, _, _ in window) / len(window),
            "lr": lr,
            "step_time_s": seconds / len(window),
            "examples_per_s": sum(n for _, _, n, _ in window) / seconds if seconds else 0.0,
            "tokens_per_s": sum(t for _, _, _, t in window) / seconds if seconds else 0.0,
        }
        self.state.logged.append(row)
        self._write_metrics_lines([row], mode="a")
        self.trackers.log("train", row, self.state.step)
        if not sys.stderr.isatty():  # no progress bar: a periodic line instead
            left = (self.total_steps - row["step"]) * row["step_time_s"]
            self._log(
                f"step {row['step']}/{self.total_steps} epoch {row['epoch']:.2f} loss {row['loss']:.4f} "
                f"lr {lr:.2e} {row['examples_per_s']:.1f} ex/s {row['tokens_per_s']:.0f} tok/s eta {left / 60:.1f} min"
            )

    def _write_metrics_lines(self, rows: list[dict[str, Any]], mode: str) -> None:
        """Add ``rows`` to metrics.jsonl (mode "a"), or write it anew with them ("w"); a full disk
        leaves the lines already there whole."""
        if self.processes.is_main:
            text = "".join(json.dumps(row) + "\n" for row in rows)
            (append_text if mode == "a" else atomic_write_text)(self.out / "metrics.jsonl", text)

    def _log(self, message: str) -> None:
        if self.processes.is_main:
            tqdm.write(f"peftlab: {message}", file=sys.stderr)


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Recompute each block's activations in backward (:mod:`peftlab.checkpointing`); non-reentrant by
    default, the kind that works under DDP."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise OptionsError(f"{type(base).__name__} does not support gradient checkpointing; drop --gradient-checkpointing.")
    enable_activation_checkpointing(base, {"use_reentrant": use_reentrant})
