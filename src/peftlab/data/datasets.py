"""Datasets as plain lists, texts with class labels or prompts with responses, and how to load one.

:func:`load_dataset_spec` turns a name or a path into one split::

    "sst2"          SST-2 (local GLUE files, the hub, or an offline stand-in: see :mod:`.sst2`)
    "rt-snippets"   that offline stand-in, asked for by name
    "number-words"  an offline instruction set made here (chat rows; see :mod:`.synthetic`)
    a directory     train.{csv,tsv,jsonl,json} and validation.* (or dev.*, val.*)
    a file          one .csv, .tsv, .jsonl or .json file, split 90/10 into train/validation (fixed seed),
                    or taken whole (``held_out=False``: a file given to ``peftlab eval``)
    plain text      "shakespeare" or a .txt file: causal LM on windows of one token stream, cut
                    with the model's tokenizer (see :mod:`.text`)

Columns (told apart by :mod:`.formats`): ``text`` (or ``sentence``) and ``label`` for
classification; for causal LM ``prompt`` and ``response``, TRL's ``prompt`` and ``completion``,
chat ``messages``, Alpaca's ``instruction``/``input``/``output`` or a lone ``text`` (conversations
become a :class:`~.chat.ChatDataset`, learnt through the model's chat template). Labelled data given to a causal LM (``task="causal-lm"``) becomes prompt/response:
``Text: <text>\nLabel:`` answered by `` <label name>`` (SST-2's: negative, positive). Labels are class ids (ints, or strings of digits) or class names; names get ids in
sorted order over every split of the dataset, so train and validation agree, unless the class
names are fixed (``label_names``: those a trained classifier recorded); a blank label, or ids
mixed with names, is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from transformers import PreTrainedTokenizerBase

from ..assets import TASKS, TEXT_ALIASES, notice
from .chat import ChatDataset
from .checks import check_training_classes, checked_texts
from .errors import DataError
from .files import Row, Table, expected_split_files, read_table, split_files
from .splits import SPLITS, hold_out, sample
from .formats import CAUSAL_LM_FORMATS, causal_lm_rows, table_format
from .sst2 import LABEL_NAMES as SST2_LABEL_NAMES
from .sst2 import load_rt_snippets, load_sst2
from .synthetic import SYNTHETIC_DATASETS
from .text import TokenWindows, is_plain_text, load_text_windows

TEXT_COLUMNS = ("text", "sentence")
NAMED_DATASETS = ("sst2", "rt-snippets", *SYNTHETIC_DATASETS)


@dataclass(frozen=True)
class ClassificationDataset:
    """Texts with class ids in ``0 .. num_labels - 1``; items are ``{"text", "label"}``."""

    texts: list[str]
    labels: list[int]
    num_labels: int
    label_names: tuple[str, ...]  # the name of each class id
    source: str  # where the examples came from, for notices and reports

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "label": self.labels[index]}

    def select(self, indices: Sequence[int]) -> ClassificationDataset:
        return replace(self, texts=[self.texts[i] for i in indices], labels=[self.labels[i] for i in indices])

    def majority_share(self) -> float | None:
        """The accuracy of always answering the most frequent label: the chance level a classifier must beat."""
        if not self.labels:
            return None
        return max(self.labels.count(label) for label in set(self.labels)) / len(self.labels)


@dataclass(frozen=True)
class CausalLMDataset:
    """Prompts with the responses to learn; items are ``{"prompt", "response"}``."""

    prompts: list[str]
    responses: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"prompt": self.prompts[index], "response": self.responses[index]}

    def select(self, indices: Sequence[int]) -> CausalLMDataset:
        return replace(
            self, prompts=[self.prompts[i] for i in indices], responses=[self.responses[i] for i in indices]
        )


TextDataset = ClassificationDataset | CausalLMDataset | ChatDataset | TokenWindows


class Rows(Protocol):
    """What the engine asks of any data set: its length and its rows by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def load_dataset_spec(
    name_or_path: str | Path,
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    task: str | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    held_out: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    stride: int | None = None,
) -> TextDataset:
    """Load ``split`` ("train" or "validation") of a named dataset or of a file or directory.

    ``data_dir``: where SST-2's GLUE files are (else ``$PEFTLAB_DATA_DIR``). ``max_samples``: keep
    that many examples, drawn by a shuffle seeded with ``seed`` (same seed, same examples).
    ``task``: "seq-cls" or "causal-lm"; by default inferred from the columns. ``num_labels``: the
    classifier's size; labels outside ``0 .. num_labels - 1`` are an error. ``label_names``: the
    classes a trained model knows, in id order; a label name not among them is an error.
    ``held_out=False``: a single file is taken whole instead of split. Plain text needs the
    model's ``tokenizer`` and the window length ``max_length`` (``stride``: see :mod:`.text`);
    ``max_samples`` then counts windows.
    """
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if task is not None and task not in TASKS:
        raise DataError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}")
    if is_plain_text(name_or_path):
        if task not in (None, "causal-lm"):
            raise DataError(f"{name_or_path} is plain text, which a causal LM learns to continue; "
                            f"use --task causal-lm (not {task}), or give labelled data for classification")
        if tokenizer is None or max_length is None:
            raise ValueError("plain text is cut into windows of tokens: pass the model's tokenizer and max_length")
        windows = load_text_windows(name_or_path, split, tokenizer, max_length, stride, held_out)
        return windows.select(sample(len(windows), max_samples, seed))
    if stride is not None:
        raise DataError(f"a stride applies to plain text (a .txt file or {', '.join(TEXT_ALIASES)}), not to {name_or_path}")
    table, label_tables, dataset_names = _read_split(name_or_path, split, data_dir, held_out)
    if split == "train" and held_out and Path(name_or_path).expanduser().is_file():  # said when training reads it
        whole = len(label_tables[0].rows)  # for one file, _read_split's label tables are [the whole file]
        notice(f"{name_or_path} is one file: {whole - len(table.rows)} of its {whole} rows (a fixed draw) are held out "
               "for validation and not trained on; give a folder with train and validation files to choose them")
    if not table.rows:
        raise DataError(f"{table.source} has no {split} examples; add rows below the header")
    format_name = table_format(table)
    task = task or ("causal-lm" if format_name in CAUSAL_LM_FORMATS else "seq-cls")
    fixed = tuple(label_names) if label_names is not None else None
    if task == "causal-lm" and format_name == "labelled":
        classes = _classification(table, label_tables, num_labels, fixed or dataset_names, fixed is not None)
        dataset: TextDataset = labels_as_responses(classes)
    elif task == "causal-lm":
        rows = causal_lm_rows(table, format_name)
        dataset = rows if isinstance(rows, ChatDataset) else CausalLMDataset(*rows)
    elif format_name != "labelled":
        raise _columns_error(table, f"text (or sentence) and label columns for classification (these are {format_name} "
                                    f"rows, which a causal LM learns: use --task causal-lm)")
    else:
        dataset = _classification(table, label_tables, num_labels, fixed or dataset_names, fixed is not None)
        if split == "train":  # the whole split: a small --max-train-samples may draw one class by chance
            check_training_classes(dataset.labels, dataset.label_names, dataset.source)
    return dataset.select(sample(len(dataset), max_samples, seed))


def task_of_dataset(name_or_path: str | Path, data_dir: str | Path | None = None) -> str:
    """"causal-lm" or "seq-cls", as the data's format says (a file or folder that cannot be read: "seq-cls",
    and loading it reports why)."""
    if is_plain_text(name_or_path):
        return "causal-lm"
    if str(name_or_path) in NAMED_DATASETS:  # labelled; not read here (SST-2 may come from the hub)
        return "seq-cls"
    try:
        table, _, _ = _read_split(name_or_path, "train", data_dir)
        return "causal-lm" if table.rows and table_format(table) in CAUSAL_LM_FORMATS else "seq-cls"
    except DataError:
        return "seq-cls"


#: How a labelled example becomes a prompt for a causal LM; the response is " <label name>".
LABEL_PROMPT = "Text: {text}\nLabel:"


def labels_as_responses(dataset: ClassificationDataset) -> CausalLMDataset:
    """Classification as generation: the prompt ``Text: <text>\\nLabel:``, the response the class name."""
    return CausalLMDataset(
        [LABEL_PROMPT.format(text=text) for text in dataset.texts],
        [f" {dataset.label_names[label]}" for label in dataset.labels],
        f"{dataset.source} as prompt/response ({LABEL_PROMPT!r} -> ' <label name>')",
    )


def _read_split(
    name_or_path: str | Path, split: str, data_dir: str | Path | None, held_out: bool = True
) -> tuple[Table, list[Table], tuple[str, ...] | None]:
    """The split's table, the tables whose labels define the classes, and fixed class names if any."""
    name = str(name_or_path)
    if name in SYNTHETIC_DATASETS:
        rows = SYNTHETIC_DATASETS[name](split)
        table = Table(list(rows[0]), [Row(row, f"{name}, {split} row {i}") for i, row in enumerate(rows, 1)],
                      f"{name} ({split} split: {len(rows)} generated rows)")
        return table, [table], None
    if name in NAMED_DATASETS:
        table = load_sst2(split, data_dir) if name == "sst2" else load_rt_snippets(split)
        return table, [table], SST2_LABEL_NAMES
    path = Path(name).expanduser()
    if path.is_dir():
        files = split_files(path)
        if split not in files:
            raise DataError(f"{path} has no {split} file: looked for {expected_split_files(split)}")
        tables = {each: read_table(file) for each, file in files.items()}
        return tables[split], list(tables.values()), None
    if path.is_file():
        whole = read_table(path)
        if not held_out:
            return Table(whole.columns, whole.rows, f"{path} (all {len(whole.rows)} rows)"), [whole], None
        chosen = hold_out(len(whole.rows), split)
        if whole.rows and not chosen:
            raise DataError(
                f"{path} has {len(whole.rows)} example: too few to hold out a validation split; "
                f"add examples, or pass a directory with train and validation files"
            )
        source = f"{path} (held-out {split} split: {len(chosen)} of {len(whole.rows)} rows)"
        return Table(whole.columns, [whole.rows[i] for i in chosen], source), [whole], None
    raise DataError(
        f"Unknown dataset {name!r}: not a file or directory, nor one of {', '.join(NAMED_DATASETS + tuple(TEXT_ALIASES))}. "
        f"Pass a .csv, .tsv, .jsonl or .txt file, or a directory with train and validation files."
    )


def _columns_error(table: Table, wanted: str) -> DataError:
    found = ", ".join(table.columns) or "none"
    return DataError(f"{table.source}: expected {wanted}; found columns: {found}")


def _value(row: Row, column: str) -> Any:
    value = row.values.get(column)
    if value is None:
        raise DataError(f"{row.where}: no {column!r} value")
    return value


def _text(row: Row, column: str) -> str:
    value = _value(row, column)
    if not isinstance(value, str):
        raise DataError(f"{row.where}: {column!r} should be a string, got {value!r}")
    return value


def _is_class_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()) is not None)


def _classification(
    table: Table, label_tables: list[Table], num_labels: int | None, label_names: tuple[str, ...] | None,
    names_are_fixed: bool = False,
) -> ClassificationDataset:
    text_column = next((column for column in TEXT_COLUMNS if column in table.columns), None)
    if text_column is None or "label" not in table.columns:
        raise _columns_error(table, "text (or sentence) and label columns for classification")
    to_id, names, count = _label_encoding(label_tables, num_labels, label_names, names_are_fixed)
    texts = checked_texts([_text(row, text_column) for row in table.rows], [row.where for row in table.rows],
                          text_column, table.source)
    labels = [to_id(_value(row, "label")) for row in table.rows]
    return ClassificationDataset(texts, labels, count, names, table.source)


def _label_encoding(
    tables: list[Table], num_labels: int | None, label_names: tuple[str, ...] | None, names_are_fixed: bool = False
) -> tuple[Callable[[Any], int], tuple[str, ...], int]:
    """How labels become class ids, the class names, and the number of classes; checks every label."""
    values = [(row, _value(row, "label")) for table in tables for row in table.rows]
    for row, value in values:
        if isinstance(value, str) and not value.strip():
            raise DataError(f"{row.where}: the label is blank; give every row a class id or name, or delete the row")
    id_rows = [row for row, value in values if _is_class_id(value)]
    if id_rows and len(id_rows) < len(values):
        row, value = next((row, value) for row, value in values if not _is_class_id(value))
        raise DataError(
            f"{row.where}: label {value!r} is a name, but {id_rows[0].where} has a class id; use ids or names throughout"
        )
    if not id_rows and names_are_fixed:
        known = {name: i for i, name in enumerate(label_names)}
        for row, value in values:
            if str(value).strip() not in known:
                raise DataError(
                    f"{row.where}: label {value!r} is not one of the classes the model was trained on "
                    f"({', '.join(label_names)}); fix the label, or evaluate a model trained with it"
                )
        return (lambda value: known[str(value).strip()]), label_names, len(label_names)
    if id_rows:
        ids = [(row, int(value)) for row, value in values]
        for row, class_id in ids:
            if class_id < 0:
                raise DataError(f"{row.where}: label {class_id} is not a class id; ids start at 0 (unlabelled rows, like GLUE's test split, have -1)")
        count = num_labels or (len(label_names) if label_names else max(i for _, i in ids) + 1)
        for row, class_id in ids:
            if class_id >= count:
                raise DataError(
                    f"{row.where}: label {class_id} is outside the classes 0..{count - 1} "
                    f"(num_labels={count}); fix the label or pass a larger num_labels"
                )
        names = label_names or tuple(str(i) for i in range(count))
        return int, names, count
    names = tuple(sorted({str(value).strip() for _, value in values}))
    if num_labels is not None and len(names) > num_labels:
        raise DataError(
            f"{tables[0].source}: {len(names)} classes ({', '.join(names)}) but num_labels={num_labels}"
        )
    index = {name: i for i, name in enumerate(names)}
    return (lambda value: index[str(value).strip()]), names, num_labels or len(names)
