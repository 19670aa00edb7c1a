"""Plain text as a causal-LM dataset: one token stream cut into windows of ``max_length`` tokens.

    "shakespeare"   an offline text alias (see :data:`peftlab.assets.TEXT_ALIASES`)
    notes.txt       any UTF-8 ``.txt`` file

The text is tokenized once, whole, without special tokens (no BOS per window: a window is a cut
through running text). Windows start every ``stride`` tokens (default ``max_length``: windows that
do not overlap) and hold exactly ``max_length`` tokens; the tokens after the last whole window are
dropped. A window scores only tokens no earlier window scored, so none is scored twice:

    stride = max_length    window k scores its tokens 1 .. L-1 (its token 0 has no context)
    stride = S < L         window 0 scores 1 .. L-1; window k > 0 only its last S tokens, each
                           seen with at least L - S tokens of context (a sliding-window perplexity
                           that scores every token but the text's first)

Splits are cut in the text, not in the windows, so they do not depend on the model or the length:
"train" is the text before the first line break at 90% of its characters, "validation" the rest
(``held_out=False``: the whole text, for a file given to ``peftlab eval``). ``max_samples`` keeps
that many windows, drawn with the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from transformers import PreTrainedTokenizerBase

from ..assets import TEXT_ALIASES, notice, resolve_text
from .errors import DataError
from .files import read_text
from .splits import HOLD_OUT_FRACTION, SPLITS

TEXT_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class TokenWindows:
    """Windows of one token stream; items are ``{"input_ids", "score_from"}`` (labels before
    ``score_from`` are not scored)."""

    windows: list[list[int]]
    score_from: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.windows[index], "score_from": self.score_from[index]}

    def select(self, indices: Sequence[int]) -> TokenWindows:
        return replace(self, windows=[self.windows[i] for i in indices], score_from=[self.score_from[i] for i in indices])

    @property
    def scored_tokens(self) -> int:
        """How many tokens the windows score (the causal shift leaves position 0 unscored)."""
        return sum(len(window) - max(start, 1) for window, start in zip(self.windows, self.score_from))


def is_plain_text(name_or_path: str | Path) -> bool:
    """Whether the dataset is plain text: a text alias or a ``.txt`` file."""
    name = str(name_or_path)
    return name in TEXT_ALIASES or Path(name).suffix.lower() in TEXT_SUFFIXES


def split_text(text: str, split: str) -> str:
    """The ``split`` of ``text``: before ("train") or from ("validation") the first line break at 90%."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}")
    at = round(len(text) * (1 - HOLD_OUT_FRACTION))
    line_end = text.find("\n", at)
    cut = line_end + 1 if line_end >= 0 else at
    return text[:cut] if split == "train" else text[cut:]


def read_plain_text(name_or_path: str | Path, split: str = "validation", held_out: bool = True) -> tuple[str, str]:
    """``(text, source)``: the split of a text alias or ``.txt`` file (all of it with ``held_out=False``)."""
    name = str(name_or_path)
    path = resolve_text(name) if name in TEXT_ALIASES else Path(name).expanduser()
    if not path.is_file():
        raise DataError(f"No such text file: {path}")
    whole = read_text(path)
    if not whole.strip():
        raise DataError(f"{path} is empty: a plain-text dataset needs text to cut into windows of tokens")
    label = f"{name} ({path})" if name in TEXT_ALIASES else str(path)
    if not held_out:
        return whole, f"{label} (all {len(whole):,} characters)"
    part = split_text(whole, split)
    if not part.strip():
        raise DataError(f"{path}: its {split} part (the text {'before' if split == 'train' else 'after'} the line "
                        f"break at 90%) is empty; give a longer text")
    if split == "train" and name not in TEXT_ALIASES:  # said once, when training reads it
        held = len(split_text(whole, "validation"))
        notice(f"{path} is one text: its last {held:,} of {len(whole):,} characters (after the line break at 90%) are "
               "held out for validation and not trained on")
    return part, f"{label} ({split} part: {len(part):,} of {len(whole):,} characters)"


def tokenize_stream(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The text's token ids, without special tokens and without the too-long-input warning."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def cut_windows(ids: Sequence[int], max_length: int, stride: int | None = None, source: str = "text") -> TokenWindows:
    """The windows of ``ids`` (see the module docstring); an error when not even one fits."""
    stride = max_length if stride is None else stride
    if max_length < 2:
        raise DataError(f"--max-length {max_length} is too short for a window: a window needs a token and its successor")
    if not 1 <= stride <= max_length:
        raise DataError(f"stride {stride} must be between 1 and --max-length ({max_length})")
    if len(ids) < max_length:
        raise DataError(
            f"{source} has {len(ids):,} tokens, too few for one window of {max_length} (--max-length); "
            f"give a longer text or a smaller --max-length"
        )
    starts = range(0, len(ids) - max_length + 1, stride)
    return TokenWindows(
        [list(ids[start : start + max_length]) for start in starts],
        [0 if start == 0 else max_length - stride for start in starts],
        f"{source}, windows of {max_length} tokens" + (f" every {stride}" if stride != max_length else ""),
    )


def load_text_windows(
    name_or_path: str | Path,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    stride: int | None = None,
    held_out: bool = True,
) -> TokenWindows:
    """The windows of a text alias or ``.txt`` file's ``split``, tokenized by ``tokenizer``."""
    text, source = read_plain_text(name_or_path, split, held_out)
    return cut_windows(tokenize_stream(tokenizer, text), max_length, stride, source)
