"""Parity measured in llama.cpp: the exported files run in the engine, the trained model in peftlab.

    reference = peftlab_reference(model, tokenizer, prompts)       # before the model is merged/unloaded
    report = engine_parity(reference, with_files, without_files, tolerance)

On the same token ids (both sides are fed ids, so tokenization cannot hide a difference; it is
checked on its own: llama.cpp's tokenizer on the prompt texts against transformers'):
  * next-token logits at every position of prompt + peftlab's greedy continuation: max abs and
    relative (max |Δ| / max |logit|) difference, top-1 agreement;
  * greedy generations (cut at the end-of-sequence tokens): the first position they differ;
  * the adapter's effect: logits with minus without the adapter, in the engine and in peftlab.
    An engine that ignored the adapter shows no effect where peftlab shows one.
The run fails when the logits or the effect differ by more than the dtype's tolerance.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from peftlab.gguf_export.metadata import GGUFExportError
from peftlab.torch_threads import one_torch_thread

#: The default check, a fixed, varied set: a question, an explanation, code, a list, a translation, a story,
#: prose continuation, arithmetic. Every prompt runs through every layer, so these few check every layer
#: family; eight are meant to keep export + verify of a 135M model within a minute on 2 cores
#: (benchmarks/gguf_export_time.py measures it; the goals table runs 32 prompts).
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the factorial of n.",
    "List three prime numbers greater than twenty.",
    "Translate 'good morning, my friend' into French.",
    "Tell a short story about a lighthouse keeper and a storm.",
    "O Romeo, Romeo, wherefore art thou Romeo? Continue the speech.",
    "What is 17 multiplied by 23? Show your steps.",
)
#: More of the same kind, for a longer check (``--verify-prompts``; benchmarks/gguf_parity.py uses them).
MORE_PROMPTS = (
    "Write a haiku about autumn leaves.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between a virus and a bacterium?",
    "How many days are there in a leap year, and why?",
    "Describe the water cycle to a ten-year-old.",
    "What are the main causes of inflation?",
    "Write a polite email declining a meeting invitation.",
    "Name four planets of the solar system and one fact about each.",
    "Compare cats and dogs as pets in a short list.",
    "What does the HTTP status code 404 mean?",
    "Explain what a neural network is without using jargon.",
    "Why do leaves change colour in the fall?",
    "Give three tips for learning a new language.",
)
NEW_TOKENS = 32


@dataclass(frozen=True)
class Tolerance:
    """How far the engine may be from peftlab for one dtype of its weights.

    ``logits``: the relative next-token logits difference; ``effect``: the relative difference of the
    adapter's effect (logits with minus without it), which is what catches an adapter carried wrongly
    or ignored. A lossy dtype rounds the model itself, by an amount that depends on the model (q8_0
    rounds SmolLM2-135M's base alone by 0.11 of its largest logit, 0.20 for its NF4-dequantized base), so
    there the logits bound also allows ``BASE_ROUNDING_FACTOR`` times the base alone's own difference.
    """

    logits: float
    effect: float
    lossy: bool = True

    def logits_bound(self, base_max_relative_logit_diff: float) -> float:
        return max(self.logits, BASE_ROUNDING_FACTOR * base_max_relative_logit_diff) if self.lossy else self.logits


#: With an adapter, a lossy dtype's logits differed by 0.64-1.67x the base alone's difference (q8_0, 10 SmolLM2
#: adapters of 9 methods): 3x leaves room, and the effect check still refuses an adapter carried wrongly.
BASE_ROUNDING_FACTOR = 3.0
#: Per dtype of the engine's weights. llama.cpp's f32 kernels sum in another order than torch: about 1e-5 of
#: the largest logit is rounding, so f32 is judged exactly, never relative to the base.
TOLERANCES = {"f32": Tolerance(1e-3, 1e-2, lossy=False), "f16": Tolerance(2e-2, 0.15), "bf16": Tolerance(0.1, 0.5),
              "q8_0": Tolerance(0.1, 0.5)}
#: A quantized base that peftlab did not train on (Q4_1 ...): measured and reported, never failed.
REPORT_ONLY = Tolerance(float("inf"), float("inf"), lossy=False)


class ParityError(GGUFExportError):
    """The exported files do not compute what the trained model does, beyond the dtype's tolerance."""


@dataclass
class PromptReference:
    text: str
    text_ids: list[int]  # transformers' tokens of the rendered prompt, no special tokens added
    prompt_ids: list[int]  # what the model is fed: text_ids, after a BOS where the tokenizer adds one
    continuation: list[int]  # peftlab's greedy tokens, cut after an end-of-sequence token
    logits_with: np.ndarray  # [positions, vocab] over prompt + continuation
    logits_without: np.ndarray


@dataclass
class Reference:
    prompts: list[PromptReference]
    stop_ids: set[int]
    rendered: list[str] = field(default_factory=list)  # the prompt texts as the model saw them (chat template applied)


def load_prompts(path: str | os.PathLike | None) -> list[str]:
    """The built-in prompts, plus one prompt per non-empty line of ``path``."""
    prompts = list(BUILTIN_PROMPTS)
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise GGUFExportError(f"--verify-prompts {file}: no such file (give a text file, one prompt per line).")
        extra = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not extra:
            raise GGUFExportError(f"--verify-prompts {file} holds no prompt (one per line).")
        prompts += extra
    return prompts


def stop_ids_of(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else ({configured} if configured is not None else set())
    return ids


def render(tokenizer, text: str) -> str:
    """The prompt as the model sees it: its chat template with a generation prompt, where it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return text


@torch.no_grad()
def peftlab_reference(model, tokenizer, prompts: list[str], new_tokens: int = NEW_TOKENS) -> Reference:
    """Greedy continuations and logits with and without the adapter, in peftlab, in float32."""
    # Batch-1 generation of a small model gains little from a second thread, and on a shared 2-core machine
    # torch's two spinning OpenMP threads made it ~9x slower (2 prompts: 108 s instead of 12.6 s at load 5).
    with one_torch_thread():
        return _reference(model, tokenizer, prompts, new_tokens)


def _reference(model, tokenizer, prompts: list[str], new_tokens: int) -> Reference:
    stops = stop_ids_of(model, tokenizer)
    model.eval()
    references, rendered = [], []
    for text in tqdm(prompts, desc="peftlab reference", unit="prompt", disable=None):
        shown = render(tokenizer, text)
        text_ids = tokenizer(shown, add_special_tokens=False)["input_ids"]
        with_special = tokenizer(shown)["input_ids"]
        ids = with_special if with_special[-len(text_ids):] == text_ids else text_ids  # BOS only where it adds one
        generated = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=new_tokens, do_sample=False, eos_token_id=sorted(stops) or None)
        continuation = _cut_at_stop(generated[0, len(ids):].tolist(), stops)
        sequence = ids + continuation
        with_adapter = _logits(model, sequence)
        with model.disable_adapter():
            without = _logits(model, sequence)
        references.append(PromptReference(text, text_ids, ids, continuation, with_adapter, without))
        rendered.append(shown)
    return Reference(references, stops, rendered)


def _logits(model, ids: list[int]) -> np.ndarray:
    output = model(input_ids=torch.tensor([ids]))
    return output.logits[0].float().numpy()


def _cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """The tokens up to and with the first stop token (generate pads after it)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


#: One thread: with more, llama.cpp runs its threads through OpenMP, whose runtime torch has already started
#: with spinning waits (OMP_WAIT_POLICY is read once, at torch's import); on a busy 2-core machine that made
#: each generated token ~30x slower (1.7 s instead of 0.06 s), and one thread is as fast as two there.
ENGINE_THREADS = 1


class Engine:
    """One llama.cpp model (and LoRA) loaded through ``llama_cpp``, fed token ids."""

    def __init__(self, model_path: Path, lora_path: Path | None, n_ctx: int, f32_cache: bool) -> None:
        import llama_cpp

        kwargs = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), _without_weight_repacking():
            self.llm = llama_cpp.Llama(
                model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=n_ctx,
                n_batch=n_ctx, logits_all=True, n_threads=ENGINE_THREADS, n_threads_batch=ENGINE_THREADS, verbose=False,
                seed=0, **kwargs,
            )

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt: list[int], new_tokens: int, stops: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for _ in range(new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token in stops:
                break
            self.llm.eval([token])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


#: What parity.json says of the engine's settings.
ENGINE_SETTINGS = "1 thread, weight repacking (extra buffer types) off, KV cache {cache}"


@contextlib.contextmanager
def _without_weight_repacking():
    """llama.cpp's CPU weight repacking (extra buffer types) crashes llama-cpp-python 0.3.36 on quantized weights
    on this project's machine (AMX CPU, segfault in decode); it only reorders weights for speed, so it is turned
    off. ``Llama`` takes its model parameters from ``llama_model_default_params``: patched while it loads."""
    from llama_cpp import llama_cpp as binding

    defaults = binding.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    binding.llama_model_default_params = without_repacking
    try:
        yield
    finally:
        binding.llama_model_default_params = defaults


@dataclass
class Parity:
    """The measured agreement, as written to parity.json."""

    positions: int = 0
    top1_agree: int = 0
    max_abs_logit_diff: float = 0.0
    max_relative_logit_diff: float = 0.0
    effect_relative_diff: float = 0.0
    effect_top1_changed_peftlab: int = 0
    effect_top1_changed_engine: int = 0
    # The base alone (no adapter) on both sides: how much of a disagreement the base's GGUF brings by itself
    # (an f16 or a 4-bit base; llama.cpp's 4-bit kernels also round the activations to 8 bits).
    base_top1_agree: int = 0
    base_max_relative_logit_diff: float = 0.0
    generations: int = 0
    generations_identical: int = 0
    first_divergences: list = field(default_factory=list)  # [prompt index, token position] of each differing generation
    tokenization_agree: int = 0
    tokenization_checked: int = 0

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.positions if self.positions else 0.0

    @property
    def base_top1_agreement(self) -> float:
        return self.base_top1_agree / self.positions if self.positions else 0.0

    def as_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items()}
        data["top1_agreement"] = self.top1_agreement
        data["base_top1_agreement"] = self.base_top1_agreement
        return data


def engine_parity(
    reference: Reference, with_files: tuple[Path, Path | None], without_files: tuple[Path, Path | None], f32_cache: bool,
) -> Parity:
    """Run the exported files (``with_files`` = (model, lora or None)) and the base alone in llama.cpp."""
    n_ctx = max(len(p.prompt_ids) + len(p.continuation) for p in reference.prompts) + NEW_TOKENS + 8
    result = Parity()
    effect_diff = effect_norm = 0.0
    engine = Engine(*with_files, n_ctx=n_ctx, f32_cache=f32_cache)
    try:
        engine_with = []
        for index, prompt in enumerate(tqdm(reference.prompts, desc="llama.cpp parity", unit="prompt", disable=None)):
            sequence = prompt.prompt_ids + prompt.continuation
            logits = engine.logits(sequence)
            engine_with.append(logits)
            diff = np.abs(logits - prompt.logits_with)
            result.positions += len(sequence)
            result.top1_agree += int((logits.argmax(-1) == prompt.logits_with.argmax(-1)).sum())
            result.max_abs_logit_diff = max(result.max_abs_logit_diff, float(diff.max()))
            scale = np.abs(prompt.logits_with).max(-1)
            result.max_relative_logit_diff = max(result.max_relative_logit_diff, float((diff.max(-1) / scale).max()))
            generated = engine.greedy(prompt.prompt_ids, NEW_TOKENS, reference.stop_ids)
            result.generations += 1
            divergence = _first_difference(generated, prompt.continuation)
            if divergence is None:
                result.generations_identical += 1
            else:
                result.first_divergences.append([index, divergence])
            result.tokenization_checked += 1
            result.tokenization_agree += int(engine.tokenize(reference.rendered[index]) == prompt.text_ids)
    finally:
        engine.close()
    base = Engine(*without_files, n_ctx=n_ctx, f32_cache=f32_cache)
    try:
        for prompt, logits in zip(reference.prompts, engine_with):
            without = base.logits(prompt.prompt_ids + prompt.continuation)
            effect_engine = logits - without
            effect_peftlab = prompt.logits_with - prompt.logits_without
            effect_diff = max(effect_diff, float(np.abs(effect_engine - effect_peftlab).max()))
            effect_norm = max(effect_norm, float(np.abs(effect_peftlab).max()))
            result.effect_top1_changed_peftlab += int((prompt.logits_with.argmax(-1) != prompt.logits_without.argmax(-1)).sum())
            result.effect_top1_changed_engine += int((logits.argmax(-1) != without.argmax(-1)).sum())
            result.base_top1_agree += int((without.argmax(-1) == prompt.logits_without.argmax(-1)).sum())
            base_diff = np.abs(without - prompt.logits_without).max(-1) / np.abs(prompt.logits_without).max(-1)
            result.base_max_relative_logit_diff = max(result.base_max_relative_logit_diff, float(base_diff.max()))
    finally:
        base.close()
    result.effect_relative_diff = effect_diff / effect_norm if effect_norm > 0 else 0.0
    return result


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def failures(parity: Parity, tolerance: Tolerance) -> list[str]:
    """What is beyond the tolerance, as sentences; empty when the export passes."""
    logits_tol, effect_tol = tolerance.logits_bound(parity.base_max_relative_logit_diff), tolerance.effect
    problems = []
    if parity.max_relative_logit_diff > logits_tol:
        allowed = f"{logits_tol:.3g}" + (f", {BASE_ROUNDING_FACTOR:g}x the base alone's" if logits_tol > tolerance.logits else "")
        problems.append(f"next-token logits differ by up to {parity.max_relative_logit_diff:.3g} of the largest logit "
                        f"(tolerance {allowed})")
    if parity.effect_relative_diff > effect_tol:
        problems.append(f"the adapter's effect (logits with minus without it) differs by {parity.effect_relative_diff:.3g} "
                        f"of its size in peftlab (tolerance {effect_tol:g}; the adapter changes the top-1 token at "
                        f"{parity.effect_top1_changed_peftlab} of {parity.positions} positions, and the base alone differs by "
                        f"up to {parity.base_max_relative_logit_diff:.3g} of the largest logit in llama.cpp)")
    if parity.tokenization_agree < parity.tokenization_checked:
        problems.append(f"llama.cpp tokenizes {parity.tokenization_checked - parity.tokenization_agree} of "
                        f"{parity.tokenization_checked} prompts differently from transformers (the GGUF's tokenizer keys)")
    return problems
