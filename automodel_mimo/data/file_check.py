"""The local data files a config names, read once in the CLI process before any rank starts.

An empty file, a .jsonl line that is not a JSON object, an unreadable parquet file or a missing column
becomes one line naming the file (and the line) and the fix, instead of a traceback from `datasets` or
pyarrow in every rank. A cheap scan: each file is read once (every JSON line parsed, parquet and CSV only
their schema / header), nothing is tokenized; the ranks still do the real loading.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from automodel_mimo.data.paths import FILE_BUILDERS, SYNTHETIC_PREFIX, looks_like_path
from automodel_mimo.errors import UserInputError


def check_data_files(cfg) -> None:
    """Every local data file of data.dataset: readable, not empty, and holding the columns the run reads."""
    source = cfg.data.dataset
    if source.startswith(SYNTHETIC_PREFIX):
        return
    path = Path(source).expanduser()
    if not path.exists():
        if looks_like_path(source):
            raise UserInputError(f"data.dataset={source} does not exist; point data.dataset at an existing file or directory")
        return  # a hub dataset: the ranks load it
    files = [path] if path.is_file() else _data_files(path)
    needed = required_columns(cfg)
    for file in files:
        columns = file_columns(file)
        if columns is not None and needed:
            _check_columns(file, columns, needed, cfg.data.messages_key)


def required_columns(cfg) -> list[tuple[str, str]]:
    """(config key, column) pairs every data file must have. None for MIMO image data, whose loader
    (data/images.py) also takes an imagefolder's metadata file."""
    if cfg.mimo.layout:
        return []
    if cfg.algo == "dpo":
        return [("dpo.chosen_key", cfg.dpo.chosen_key), ("dpo.rejected_key", cfg.dpo.rejected_key)]
    if cfg.data.messages_key:
        return [("data.messages_key", cfg.data.messages_key)]
    return [("data.prompt_key", cfg.data.prompt_key), ("data.response_key", cfg.data.response_key)]


def file_columns(file: Path) -> set[str] | None:
    """The column names of one data file (None where they cannot be told cheaply); UserInputError when the
    file is empty or does not parse."""
    if file.stat().st_size == 0:
        raise UserInputError(f"data.dataset: {file} is empty; add rows to it or point data.dataset elsewhere")
    reader = {".jsonl": _jsonl_columns, ".json": _json_columns, ".csv": _csv_columns, ".parquet": _parquet_columns}
    return reader[file.suffix](file)


def _data_files(folder: Path) -> list[Path]:
    """The files `datasets` would read from a folder: known extensions, hidden ones left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FILE_BUILDERS
                  and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts))


def _jsonl_columns(file: Path) -> set[str]:
    columns: set[str] = set()
    rows = 0
    with file.open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                columns.update(_json_object(line.strip(), file, number))
                rows += 1
    if rows == 0:
        raise UserInputError(f"data.dataset: {file} has no rows (only blank lines); add rows or point data.dataset elsewhere")
    return columns


def _json_object(line: bytes, file: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except UnicodeDecodeError:
        raise UserInputError(f"data.dataset: {file} line {number} is not UTF-8 text; fix or remove that line") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"data.dataset: {file} line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                             "fix or remove that line (each line must be one JSON object)") from None
    if not isinstance(row, dict):
        raise UserInputError(f"data.dataset: {file} line {number} is a JSON {type(row).__name__}, not an object of "
                             "columns; each line must be one JSON object such as {\"prompt\": ..., \"response\": ...}")
    return row


def _json_columns(file: Path) -> set[str] | None:
    """A .json file is either one JSON document (a list of row objects) or JSON lines, as `datasets` reads it."""
    try:
        document = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _jsonl_columns(file)  # not one document: then every line must be one
    if isinstance(document, list):
        if not document:
            raise UserInputError(f"data.dataset: {file} holds an empty list; add rows or point data.dataset elsewhere")
        bad = next((i for i, row in enumerate(document) if not isinstance(row, dict)), None)
        if bad is not None:
            raise UserInputError(f"data.dataset: {file}: item {bad} of its list is not an object of columns; fix it")
        return set().union(*document)
    return None  # a mapping (columns of lists, or rows under a field): left to `datasets`


def _csv_columns(file: Path) -> set[str]:
    with file.open(newline="", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise UserInputError(f"data.dataset: {file} has no header line; its first line must name the columns")
        if next(reader, None) is None:
            raise UserInputError(f"data.dataset: {file} has a header but no rows; add rows or point data.dataset elsewhere")
    return set(header)


def _parquet_columns(file: Path) -> set[str]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(file).metadata
    except Exception as e:  # pyarrow's errors have no common base beyond Exception
        raise UserInputError(f"data.dataset: {file} is not a readable parquet file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}); rewrite or remove it") from None
    if meta.num_rows == 0:
        raise UserInputError(f"data.dataset: {file} has no rows; add rows or point data.dataset elsewhere")
    return set(meta.schema.to_arrow_schema().names)


def _check_columns(file: Path, columns: set[str], needed: list[tuple[str, str]], messages_key: str | None) -> None:
    if messages_key is None and "messages" in columns and any(c not in columns for _, c in needed):
        return  # prompt/response absent but a chat column present: the loader decides (and says how to use it)
    for key, column in needed:
        if column not in columns:
            raise UserInputError(f"{key}={column} is not a column of {file}; set {key} to one of "
                                 f"{', '.join(sorted(columns))}")
