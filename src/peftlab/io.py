"""The HF PEFT adapter format on disk, and atomic writes.

    DIR/adapter_config.json          HF's fields for the peft_type (sorted keys, indent 2)
    DIR/adapter_model.safetensors    base_model.model.<module path>.<suffix>, adapter name stripped
    DIR/NAME/...                     any adapter not called "default"

Weights are read with safetensors only (no pickle). Every file is written to a temporary file in
the same folder and renamed into place, so an interrupted save leaves the previous adapter whole;
if renaming the config fails after the weights were renamed, the previous weights come back.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# peftlab's entries in the adapter's safetensors metadata (HF peft ignores metadata).
QUANTIZATION_KEY = "peftlab.base_quantization"
LABEL_NAMES_KEY = "peftlab.label_names"


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> Path:
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


Writer = Callable[[str], object]  # what it returns is not used


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the file and says nothing good was replaced."""


def is_disk_full(error: BaseException) -> bool:
    # safetensors reports the OS error inside its own exception type, as text.
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "StorageFull" in str(error)


@contextmanager
def explain_disk_full(what: str, restate: bool = False) -> Iterator[None]:
    """A full disk inside the block becomes a DiskFullError: "disk full while ``what``", and what to do.
    Any exception is judged by :func:`is_disk_full` (safetensors reports a full disk in its own type).
    ``restate``: a DiskFullError from an inner block gets this message too (what was kept is said here)."""
    try:
        yield
    except Exception as error:
        if is_disk_full(error) and (restate or not isinstance(error, DiskFullError)):
            raise DiskFullError(f"disk full while {what}. Free space on that disk, or write elsewhere.") from error
        raise


def _stage(path: Path, write: Writer) -> str:
    """Write a temporary file next to ``path``, flushed to disk; the caller renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    with explain_disk_full(f"writing {path}: nothing was replaced there"):
        try:
            write(tmp)
            give_umask_modes(Path(tmp))  # mkstemp makes 0600, and safetensors recreates the file 0600
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return tmp


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_umask_modes(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions ``open``/``mkdir``
    would give under the umask: temporary files and folders are private, and writers such as
    safetensors' create their files 0600, which a server running as another user cannot read."""
    mask = _current_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def _keep_previous(path: Path) -> str:
    """A second name for the current ``path`` (a hard link, or a copy), to restore it from."""
    backup = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.previous"))
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


def _atomic_write_all(files: list[tuple[Path, Writer]]) -> None:
    """Replace all ``files`` or none: each is staged first, then all are renamed into place in order;
    if a rename fails, the files already replaced get their previous content back."""
    staged: list[tuple[str, Path]] = []
    previous: dict[Path, str] = {}
    replaced: list[Path] = []
    try:
        for path, write in files:
            staged.append((_stage(path, write), path))
        for tmp, path in staged:
            if path.exists():
                previous[path] = _keep_previous(path)
            os.replace(tmp, path)
            replaced.append(path)
    except BaseException:
        for path in reversed(replaced):
            if path in previous:
                os.replace(previous.pop(path), path)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        for leftover in [tmp for tmp, _ in staged] + list(previous.values()):
            Path(leftover).unlink(missing_ok=True)


def _text_writer(text: str) -> Writer:
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="")  # the text's own line ends


def _tensors_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Writer:
    # safetensors wants contiguous tensors that share no storage.
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return lambda tmp: save_file(plain, tmp, metadata={"format": "pt", **(metadata or {})})


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write_all([(Path(path), _text_writer(text))])


def append_text(path: str | os.PathLike, text: str) -> None:
    """Add ``text`` at the end of ``path`` (a log such as metrics.jsonl), whole or not at all: a failed
    write is cut off again, so the file never ends in half a line."""
    path = Path(path)
    with explain_disk_full(f"adding to {path}: its earlier lines are intact"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                left = memoryview(text.encode("utf-8"))
                while left:
                    left = left[os.write(fd, left):]
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    _atomic_write_all([(Path(path), _tensors_writer(tensors, metadata))])


def write_adapter(
    directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
    extra_text: dict[str, str] | None = None,
) -> None:
    """Weights, config (and ``extra_text`` files, e.g. a README) replace the previous ones together or
    not at all. Weights are renamed first: a reader never sees a config that promises missing weights."""
    _atomic_write_all(
        [
            (directory / WEIGHTS_NAME, _tensors_writer(tensors, metadata)),
            (directory / CONFIG_NAME, _text_writer(json.dumps(config, indent=2, sort_keys=True) + "\n")),
            *((directory / name, _text_writer(text)) for name, text in (extra_text or {}).items()),
        ]
    )


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        from peftlab.adapter_errors import not_an_adapter

        raise FileNotFoundError(not_an_adapter(directory) + "." if not_an_adapter(directory) else
                                f"no {CONFIG_NAME} in {directory}: is this a directory written by save_pretrained?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-save the adapter.") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{path} has no 'peft_type': it is not a PEFT adapter config.")
    return config


def read_adapter_metadata(directory: Path) -> dict[str, str]:
    """The safetensors metadata of the adapter's weights file ({} when there is none)."""
    from safetensors import safe_open

    path = directory / WEIGHTS_NAME
    if not path.is_file() and not (directory / CONFIG_NAME).is_file():
        read_adapter_config(directory)  # says what the folder is instead
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is missing, truncated or corrupt ({e}). Save the adapter again, or restore it from a good copy.") from None


def read_adapter_weights(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in directory.glob("adapter_model.bin")]
        extra = " An adapter_model.bin is there: peftlab loads no pickle files; convert it to safetensors." if pickled else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}.{extra}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} is truncated or corrupt ({e}). Save the adapter again, or restore it from a good copy."
        ) from None
