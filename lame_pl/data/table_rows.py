"""Streaming the rows of a converter's source tables (``.parquet`` or ``.jsonl``), one at a time.

Training sources are large (a visual-document parquet holds its page images inline), so rows are
read in small batches and never all at once. Every row knows where it came from, so a bad value
can be reported with its file and row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lame_pl.data.shard_writer import DataError

TABLE_SUFFIXES = (".parquet", ".jsonl")
# Rows per parquet read: small, because a row may carry a page image of a few MB.
_BATCH_ROWS = 64


@dataclass(frozen=True)
class SourceRow:
    """One row of a source table.

    Attributes:
        data: The row's fields (only those asked for; an optional field the table lacks is None).
        file: The table file.
        index: 0-based row index over all the files of the source, in order (the row's key).
        where: ``FILE row N`` (parquet) or ``FILE:LINE`` (JSONL), for messages.
    """

    data: dict[str, Any]
    file: Path
    index: int
    where: str

    def text(self, name: str) -> str:
        """A string field; None (or a field an optional column lacks) reads as ``""``.

        Raises:
            DataError: When the value is not a string.
        """
        value = self.data.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{self.where}: field {name!r} must be a string, got {type(value).__name__}")
        return value


def iter_rows(
    files: Sequence[Path], required: Sequence[str], optional: Sequence[str] = (), limit: int | None = None
) -> Iterator[SourceRow]:
    """The rows of ``files`` in order, each with the ``required`` and ``optional`` fields.

    Args:
        files: ``.parquet`` or ``.jsonl`` files of one source, read one after another.
        required: Fields every row must have (a parquet file must have the columns).
        optional: Fields read when present, None otherwise.
        limit: Stop after this many rows (all files together); None reads everything.

    Raises:
        DataError: For a file that cannot be read, a line that is not a JSON object, or a
            missing required field; the message names the file and the row or line.
    """
    index = 0
    for path in files:
        if limit is not None and index >= limit:
            return
        reader = _parquet_rows if path.suffix == ".parquet" else _jsonl_rows
        for data, where in reader(path, required, optional):
            if limit is not None and index >= limit:
                return
            yield SourceRow(data, path, index, where)
            index += 1


def _parquet_rows(path: Path, required: Sequence[str], optional: Sequence[str]) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    names = table.schema_arrow.names
    missing = [name for name in required if name not in names]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (the file has {names})")
    columns = [*required, *(name for name in optional if name in names)]
    row = 0
    try:
        for batch in table.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            for data in batch.to_pylist():
                yield data, f"{path} row {row}"
                row += 1
    except OSError as err:  # a truncated or corrupt file fails part-way through
        raise DataError(f"{path} row {row}: cannot read the parquet file ({err})") from None


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    Raises:
        DataError: When the file cannot be read, or a line is not UTF-8 or not a JSON object;
            the message names the file and the line.
    """
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None


def _jsonl_rows(path: Path, required: Sequence[str], optional: Sequence[str]) -> Iterator[tuple[dict, str]]:
    for line_no, record in jsonl_objects(path):
        missing = [name for name in required if name not in record]
        if missing:
            raise DataError(f"{path}:{line_no}: missing field {missing[0]!r} (the row has {sorted(record)})")
        yield {name: record.get(name) for name in (*required, *optional)}, f"{path}:{line_no}"


def table_files(path: Path, what: str, split: str = "train") -> list[Path]:
    """The table files a source option names: one ``.parquet``/``.jsonl`` file, or a folder's ``split`` files.

    A folder is searched recursively for ``.parquet`` and ``.jsonl`` files whose name starts with
    ``split`` (a Hugging Face snapshot stores ``data/train-00000-of-00004.parquet``); files of
    other splits are left out, never mixed in.

    Args:
        path: The file or folder.
        what: The option that named it (``--colpali``), for messages.
        split: The split a folder's files are chosen by.

    Raises:
        DataError: When the path does not exist, is a file of another type, or is a folder with
            no such file.
    """
    if path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise DataError(f"{what} {str(path)!r}: expected a .parquet or .jsonl file or a folder of them")
        return [path]
    if not path.is_dir():
        raise DataError(f"{what} {str(path)!r} does not exist")
    tables = sorted(p for p in path.rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file())
    chosen = [p for p in tables if p.name.startswith(split)]
    if not chosen:
        found = ", ".join(p.relative_to(path).as_posix() for p in tables[:5]) or "none"
        raise DataError(
            f"{what} {str(path)!r}: no {split}*.parquet or {split}*.jsonl file in the folder (tables found: {found})"
        )
    return chosen
