"""Text from a trained causal LM: prompts in, the model's continuations out.

    model, tokenizer = load_for_generation("smollm2-135m", adapter="runs/lora")
    ids = [encode_prompt(tokenizer, "Write 347 in words.")]
    generate_texts(model, tokenizer, ids, Sampling(max_new_tokens=16))   # ["three hundred forty-seven"]

A prompt is a string or a list of chat messages. For a model with a chat template (SmolLM2-Instruct's
ChatML) a string becomes one user turn and the template is applied with the assistant header
(``add_generation_prompt``), exactly as chat rows are trained; the template writes every special token
itself, so the text is tokenized without adding any (no second BOS). A model without a template takes
the string as it is (with the tokenizer's own BOS), as ``{"prompt", "response"}`` rows are trained.

Generation is transformers' ``generate`` on the (adapted) model: greedy unless a temperature is given,
stopping at the tokenizer's EOS (ChatML's ``<|im_end|>``) or after ``max_new_tokens``. Batches are
padded on the left so every row's next token follows its own last prompt token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftlab.data.errors import DataError
from peftlab.train.options import OptionsError

#: A prompt: plain text, or chat messages ``[{"role", "content"}, ...]``.
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    """How to pick each new token: greedy (``temperature`` 0, the default) or sampled."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise OptionsError(f"--max-new-tokens must be 1 or more (the tokens to write after the prompt), got {self.max_new_tokens}.")
        if not self.temperature >= 0:
            raise OptionsError(f"--temperature must be 0 (greedy) or more, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise OptionsError(f"--top-p must be above 0 and at most 1, got {self.top_p}.")
        if self.top_p < 1 and self.temperature == 0:
            raise OptionsError("--top-p applies to sampling: give --temperature above 0 too (temperature 0 is greedy).")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": None}


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def as_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, str]]:
    """The conversation to answer: a string is one user turn; ``system`` goes first (replacing one given)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m.get("role") != "system"]
    return messages


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, system: str | None = None) -> list[int]:
    """The token ids the model continues: the chat template with the assistant header, or the plain text."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(as_messages(prompt, system), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if system is not None or not isinstance(prompt, str):
        raise OptionsError(
            "this model's tokenizer has no chat template, so it cannot take a system prompt or chat messages; "
            "give plain-text prompts, or a chat model (or a template in its tokenizer_config.json)."
        )
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Where an answer ends: the tokenizer's EOS and any the model's generation config names."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *configured] if i is not None))


@torch.no_grad()
def generate_ids(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]], sampling: Sampling,
    streamer: Any = None,
) -> list[list[int]]:
    """The new tokens after each prompt (the stop token, when reached, is cut off); one batch."""
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    width = max(len(ids) for ids in prompts)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stops, pad_token_id=pad, streamer=streamer, **sampling.generate_kwargs(),
        )
    finally:
        model.train(was_training)
    return [_until_stop(row[width:].tolist(), stops) for row in output]


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return ids[:end]


def generate_texts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]], sampling: Sampling,
    batch_size: int = 16, progress: bool = False,
) -> list[str]:
    """The decoded answer to each prompt (token ids from :func:`encode_prompt`), ``batch_size`` at a time."""
    from tqdm.auto import tqdm

    texts: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2):
        for ids in generate_ids(model, tokenizer, prompts[start : start + batch_size], sampling):
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


# -- loading a model to generate with ---------------------------------------------------------------------


def load_for_generation(
    model: str | None, adapter: str | None = None, device: str = "cpu"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A causal LM ready to generate: ``model`` (a base, a merged or fully fine-tuned folder), with ``adapter``
    if given (its base as recorded when ``model`` is None; a 4-bit base as it was trained on; a LongLoRA
    adapter brings its RoPE scale). A classifier, or an adapter of another base, is refused."""
    from peftlab.assets import notice
    from peftlab.train.build import base_of, load_trained, recorded_quantization

    if adapter is not None:
        check_adapter_is_generative(adapter)
        check_same_base(adapter, model)
    base, _ = base_of(model, adapter, "causal-lm")
    check_model_is_generative(base)
    quantization = recorded_quantization(adapter)
    if quantization:
        notice(f"the adapter was trained on a {quantization} base: quantizing {base} the same way (exact)")
    loaded, tokenizer = load_trained(base, adapter, "causal-lm", quantization=quantization)
    return loaded.to(device).eval(), tokenizer


def check_adapter_is_generative(adapter: str) -> None:
    from peftlab.io import read_adapter_config

    task_type = read_adapter_config(Path(adapter)).get("task_type")
    if task_type and task_type != "CAUSAL_LM":
        raise OptionsError(
            f"{adapter} is an adapter for task_type={task_type} (a classifier), not a causal LM: it has no text to "
            "generate. Score it with `peftlab eval --adapter`, or give an adapter trained with --task causal-lm."
        )


def check_same_base(adapter: str, model: str | None) -> None:
    """``model``, when given, must be the base the adapter recorded: another base's layers may have the same
    shapes and take the adapter's weights without a word, for a meaningless result."""
    from peftlab.assets import resolve_model
    from peftlab.io import read_adapter_config

    recorded = read_adapter_config(Path(adapter)).get("base_model_name_or_path")
    if model is None or not recorded or recorded == model:
        return
    try:
        same = Path(resolve_model(recorded)).resolve() == Path(resolve_model(model)).resolve()
    except Exception:  # the recorded base is not on this machine (moved, another machine): the weights' shapes decide
        return
    if not same:
        raise OptionsError(
            f"{adapter} was trained on {recorded}, not on {model}: its update means nothing on another base. "
            f"Leave out --model to use {recorded}, or give an adapter trained on {model}."
        )


def check_model_is_generative(model: str) -> None:
    """A saved model that is not a causal LM (a fully fine-tuned classifier, an encoder) has no
    language-model head to generate with; refused before it is loaded."""
    from peftlab.train.build import CAUSAL_LM_ARCHITECTURES

    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        return
    architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    if architectures and not any(name.endswith(CAUSAL_LM_ARCHITECTURES) for name in architectures):
        raise OptionsError(
            f"{model} is a {architectures[0]}, not a causal LM: it has no text to generate. "
            "Score a classifier with `peftlab eval --model`, or give a causal LM."
        )


# -- prompt files -----------------------------------------------------------------------------------------


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a .txt file (one per non-blank line) or a .jsonl file (one object per line:
    ``{"prompt": "..."}`` or ``{"messages": [...]}`` whose last turn is the user's); a bad line is a
    DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompt file; give a .txt file (a prompt per line) or a .jsonl file")
    from peftlab.data.files import read_text

    lines = read_text(path).splitlines()
    if path.suffix.lower() == ".txt":
        prompts: list[Prompt] = [line.strip() for line in lines if line.strip()]
    elif path.suffix.lower() == ".jsonl":
        prompts = [_jsonl_prompt(line, f"{path}, line {number}") for number, line in enumerate(lines, 1) if line.strip()]
    else:
        raise DataError(f"{path}: unsupported prompt file type {path.suffix!r}; use .txt (a prompt per line) or .jsonl")
    if not prompts:
        raise DataError(f"{path} holds no prompts; write one per line")
    return prompts


def _jsonl_prompt(line: str, where: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg})") from None
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    if isinstance(row, dict) and "messages" in row:
        return _checked_messages(row["messages"], where)
    raise DataError(f'{where}: expected {{"prompt": "non-empty text"}} or {{"messages": [...]}}, got {line.strip()[:80]}')


def _checked_messages(messages: Any, where: str) -> list[dict[str, str]]:
    valid = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid:
        raise DataError(f'{where}: "messages" must be a list of {{"role": system|user|assistant, "content": text}}')
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last message is the {messages[-1]['role']}'s; end with the user turn to answer")
    return messages


def prompt_text(prompt: Prompt) -> str:
    """The prompt as shown in the output: the text, or the last user turn of a conversation."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]

