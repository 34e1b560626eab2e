"""Read raw documents from files, globs, directories or a Hugging Face dataset name.

Everything goes through the ``datasets`` library in streaming mode, so memory stays flat however
large the input. JSON lines are read as lines (datasets' ``text`` builder) and parsed here, which
is what lets a malformed line be reported by file and line number, or skipped and counted.

Each yielded :class:`Document` carries where it came from, for error messages.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence

from megatron_hypermoe.errors import DataError

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
TEXT_SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class Document:
    fields: Dict[str, str]
    source: str
    line: int  # 1-based line (jsonl/text-by-line) or row number


@dataclass
class ReadStats:
    documents: int = 0
    skipped_bad_lines: int = 0
    bad_line_examples: List[str] = field(default_factory=list)


def resolve_input_files(inputs: Sequence[str]) -> List[str]:
    """Expand files, globs and directories to a sorted, de-duplicated list of data files."""
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if os.path.splitext(name)[1].lower() in SUFFIX_FORMATS
            )
            if not found:
                raise DataError(f"--input directory {item} holds no data files "
                                f"({', '.join(sorted(SUFFIX_FORMATS))})")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"--input pattern {item} matches no files")
            files.extend(found)
        else:
            raise DataError(f"--input {item} does not exist: give a file, a glob, a directory "
                            "or a Hugging Face dataset name (needs the hub)")
    seen = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def file_format(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIX_FORMATS:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'}; rename it to one of "
                        f"{', '.join(sorted(SUFFIX_FORMATS))}")
    return SUFFIX_FORMATS[suffix]


def looks_like_hub_dataset(item: str) -> bool:
    return not os.path.exists(item) and not glob.has_magic(item) and "/" in item.strip("/") \
        and not item.startswith((".", "/")) and os.path.splitext(item)[1] == ""


def _first_undecodable_line(path: str) -> str:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"line {number}, byte {error.start}"
    return "unknown position"


def _stream(builder: str, path: str, **kwargs):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(builder, data_files=[path], split="train", streaming=True,
                                 **kwargs)


def _select_fields(record, json_keys, source, line) -> Dict[str, str]:
    fields = {}
    for key in json_keys:
        if not isinstance(record, dict) or key not in record:
            available = ", ".join(sorted(record)) if isinstance(record, dict) else "none"
            raise DataError(f"{source}:{line}: missing key {key!r} (keys: {available}); "
                            f"pass --json-keys with one of them")
        value = record[key]
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{source}:{line}: key {key!r} holds {type(value).__name__}, "
                            "not text; pick a text field with --json-keys")
        fields[key] = value
    return fields


def _iter_jsonl(path, json_keys, skip_bad_lines, stats) -> Iterator[Document]:
    for number, row in enumerate(_stream("text", path), start=1):
        line = row["text"]
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if not skip_bad_lines:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg}); fix the line "
                                "or pass --skip-bad-lines to skip and count such lines") from None
            stats.skipped_bad_lines += 1
            if len(stats.bad_line_examples) < 5:
                stats.bad_line_examples.append(f"{path}:{number}")
            continue
        yield Document(_select_fields(record, json_keys, path, number), path, number)


def _iter_table(builder, path, json_keys) -> Iterator[Document]:
    for number, record in enumerate(_stream(builder, path), start=1):
        yield Document(_select_fields(record, json_keys, path, number), path, number)


def _iter_text(path, json_keys, sample_by) -> Iterator[Document]:
    key = json_keys[0]
    for number, row in enumerate(_stream("text", path, sample_by=sample_by), start=1):
        yield Document({key: row["text"]}, path, number)


def _iter_file(path, json_keys, skip_bad_lines, text_sample_by, stats) -> Iterator[Document]:
    fmt = file_format(path)
    try:
        if fmt == "jsonl":
            yield from _iter_jsonl(path, json_keys, skip_bad_lines, stats)
        elif fmt == "text":
            yield from _iter_text(path, json_keys, text_sample_by)
        else:
            yield from _iter_table(fmt, path, json_keys)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 at {_first_undecodable_line(path)}; "
                        "re-encode the file as UTF-8") from None
    except DataError:
        raise
    except Exception as error:  # pyarrow/datasets parse errors for json/csv/parquet
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"{path}: cannot read as {fmt} ({type(error).__name__}: "
                        f"{first_line[:200]})") from None


def _iter_hub(name, json_keys) -> Iterator[Document]:
    import datasets

    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as error:
        raise DataError(f"--input {name}: not a local path, and loading it from the Hugging "
                        f"Face Hub failed ({type(error).__name__}); check the name or the "
                        "network") from None
    for number, record in enumerate(stream, start=1):
        yield Document(_select_fields(record, json_keys, name, number), name, number)


def iter_documents(inputs: Sequence[str], json_keys: Sequence[str], skip_bad_lines=False,
                   text_sample_by="document", stats: ReadStats = None) -> Iterator[Document]:
    """Yield documents from every input in order. Raises DataError on bad input."""
    if text_sample_by not in TEXT_SAMPLE_BY:
        raise DataError(f"--text-sample-by {text_sample_by} is not one of "
                        f"{', '.join(TEXT_SAMPLE_BY)}")
    stats = stats if stats is not None else ReadStats()
    for item in inputs:
        if looks_like_hub_dataset(item):
            documents = _iter_hub(item, json_keys)
        else:
            documents = (
                document
                for path in resolve_input_files([item])
                for document in _iter_file(path, json_keys, skip_bad_lines, text_sample_by, stats)
            )
        for document in documents:
            stats.documents += 1
            yield document
