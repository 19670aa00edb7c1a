"""Read a table of examples from a .csv, .tsv or .jsonl file, keeping where each row came from.

CSV follows the usual quoting rules; TSV has none (the GLUE convention: a field never holds a tab,
and quote characters are plain text). Files must be UTF-8 (a BOM is allowed).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checks import duplicate_names
from .errors import DataError

SUFFIXES = (".csv", ".tsv", ".jsonl")
#: File stems accepted for each split inside a dataset directory, in order of preference.
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "dev", "val")}


@dataclass(frozen=True)
class Row:
    values: dict[str, Any]
    where: str  # "file, line N": for error messages


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[Row]
    source: str  # what the rows were read from, for notices and reports


def read_text(path: Path) -> str:
    """The file decoded as UTF-8; undecodable bytes raise a DataError naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}, line {line}: byte {data[error.start]:#04x} is not valid UTF-8; "
            f"re-save the file as UTF-8"
        ) from None


def _read_delimited(path: Path, text: str, delimiter: str, quoting: int) -> Table:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        columns = [name.strip() for name in reader.fieldnames or []]
        twice = duplicate_names(columns)
        if twice:
            raise DataError(f"{path}, line 1: the header names the column {twice[0]!r} twice ({', '.join(columns)}); "
                            "rename or delete one, or the last would silently win")
        reader.fieldnames = columns
        rows = []
        for values in reader:
            where = f"{path}, line {reader.line_num}"
            extra = values.pop(None, None)  # DictReader puts surplus fields under None, fills short rows with None
            if extra or None in values.values():
                fields = len(columns) + len(extra) if extra else sum(v is not None for v in values.values())
                raise DataError(f"{where}: {fields} fields, but the header has {len(columns)} ({', '.join(columns)})")
            rows.append(Row(values, where))
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num}: {error}") from None
    return Table(columns, rows, str(path))


def _read_jsonl(path: Path, text: str) -> Table:
    rows = []
    columns: dict[str, None] = {}  # an ordered set: keys in the order first seen
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            values = json.loads(line, object_pairs_hook=_object_without_repeated_keys)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        except _RepeatedKey as error:
            raise DataError(f"{where}: the key {error.args[0]!r} is given twice; keep one, or the last would "
                            "silently win") from None
        if not isinstance(values, dict):
            raise DataError(f"{where}: expected one JSON object per line, got {type(values).__name__}")
        columns.update(dict.fromkeys(values))
        rows.append(Row(values, where))
    return Table(list(columns), rows, str(path))


class _RepeatedKey(Exception):
    pass


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    twice = duplicate_names([key for key, _ in pairs])
    if twice:
        raise _RepeatedKey(twice[0])
    return dict(pairs)


_READERS: dict[str, Callable[[Path, str], Table]] = {
    ".csv": lambda path, text: _read_delimited(path, text, ",", csv.QUOTE_MINIMAL),
    ".tsv": lambda path, text: _read_delimited(path, text, "\t", csv.QUOTE_NONE),
    ".jsonl": _read_jsonl,
}


def read_table(path: Path) -> Table:
    """All rows of a .csv, .tsv or .jsonl file."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
    return reader(path, read_text(path))


def split_files(directory: Path) -> dict[str, Path]:
    """The file of each split present in ``directory``, e.g. {"train": train.csv, "validation": dev.csv}."""
    files = {}
    for split, stems in SPLIT_STEMS.items():
        found = [directory / (stem + suffix) for stem in stems for suffix in SUFFIXES]
        found = [path for path in found if path.is_file()]
        if len(found) > 1:
            raise DataError(f"{directory} has several {split} files ({', '.join(p.name for p in found)}); keep one")
        if found:
            files[split] = found[0]
    return files


def expected_split_files(split: str) -> str:
    return ", ".join(stem + suffix for stem in SPLIT_STEMS[split] for suffix in SUFFIXES)
