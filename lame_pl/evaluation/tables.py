"""Reading benchmark tables (JSONL, JSON or parquet) into rows that know where they came from."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")


class EvalDataError(ValueError):
    """Bad benchmark data on disk: the message names the file, row and field, or the missing path."""


@dataclass(frozen=True)
class Row:
    """One record and where it was read: ``file`` and its 0-based ``index`` in that file."""

    data: dict[str, Any]
    file: Path
    index: int

    @property
    def where(self) -> str:
        """``FILE row N``, for error messages."""
        return f"{self.file} row {self.index}"

    def get(self, field: str, types: type | tuple[type, ...], *, required: bool = True, default: Any = None) -> Any:
        """The value of ``field``, checked against ``types``; a missing optional field (or null) gives ``default``."""
        value = self.data.get(field)
        if value is None:
            if required:
                raise EvalDataError(f"{self.where}: missing field {field!r}")
            return default
        if not isinstance(value, types):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise EvalDataError(f"{self.where}: field {field!r} must be {names}, got {type(value).__name__}")
        return value

    def text(self, field: str, *, required: bool = True) -> str:
        """A string field (``""`` when optional and absent)."""
        return self.get(field, str, required=required, default="")

    def texts(self, field: str, *, required: bool = True) -> list[str] | None:
        """A list-of-strings field (``None`` when optional and absent)."""
        value = self.get(field, (list, tuple), required=required)
        if value is None:
            return None
        value = list(value)
        for i, item in enumerate(value):
            if item is not None and not isinstance(item, str):
                raise EvalDataError(f"{self.where}: field {field!r}[{i}] must be a string, got {type(item).__name__}")
        return ["" if item is None else item for item in value]

    def ident(self, *fields: str) -> str:
        """The present id field among ``fields`` as a string (ids may be stored as ints).

        Two spellings present with different values is an error: which one a benchmark reads
        depends on the task, so either choice could score against the wrong ids.
        """
        found: list[tuple[str, str]] = []
        for field in fields:
            value = self.data.get(field)
            if value is not None:
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise EvalDataError(f"{self.where}: field {field!r} must be a string or integer id")
                found.append((field, str(value)))
        if not found:
            raise EvalDataError(f"{self.where}: missing field {' or '.join(repr(f) for f in fields)}")
        if len({v for _, v in found}) > 1:
            spelled = " and ".join(f"{f!r} = {v!r}" for f, v in found)
            raise EvalDataError(f"{self.where}: two spellings of one id column disagree: {spelled}")
        return found[0][1]


def read_table(path: Path) -> list[Row]:
    """All rows of one ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file."""
    if not path.is_file():
        raise EvalDataError(f"missing file {path}")
    if path.suffix == ".parquet":
        records = _read_parquet(path)
    elif path.suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise EvalDataError(
                        f"{path} row {len(records)} (line {line_no + 1}): not valid JSON ({error.msg})"
                    ) from None
    elif path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if not isinstance(records, list):
            raise EvalDataError(f"{path}: a .json table must hold a list of records")
    else:
        raise EvalDataError(f"{path}: unknown table format (expected one of {', '.join(TABLE_SUFFIXES)})")
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise EvalDataError(f"{path} row {i}: a record must be a JSON object, got {type(record).__name__}")
        rows.append(Row(record, path, i))
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError(
            f"{path}: reading parquet needs pyarrow (pip install -e '.[eval]'), or convert the table to JSONL"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise EvalDataError(f"{path}: not a readable parquet file ({error})") from None


def find_table(folder: Path, name: str) -> list[Path]:
    """The files of table ``name`` in ``folder``: ``name.jsonl|.json|.parquet``, or the shards in folder ``name/``.

    The folder form is how a Hugging Face dataset snapshot stores a config (``name/test-00000-of-00001.parquet``).
    """
    for suffix in TABLE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return [folder / f"{name}{suffix}"]
    if (folder / name).is_dir():
        shards = sorted(p for p in (folder / name).rglob("*") if p.suffix in TABLE_SUFFIXES and p.is_file())
        if shards:
            return shards
        raise EvalDataError(f"folder {folder / name} holds no .jsonl, .json or .parquet file")
    raise EvalDataError(
        f"missing table {name!r} in {folder} (looked for {name}.jsonl, {name}.parquet or folder {name}/)"
    )


def read_rows(files: Iterable[Path]) -> list[Row]:
    """The rows of several shards of one table, in order."""
    return [row for path in files for row in read_table(path)]


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a clear error naming ``what`` it should hold."""
    if not path.is_dir():
        raise EvalDataError(f"missing folder {path} ({what})")
    return path


def read_qrels(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    """``{query id: {corpus id: grade}}``; grades <= 0 are dropped, a repeated pair keeps its highest grade."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        query_id = row.ident("query-id", "query_id")
        doc_id = row.ident("corpus-id", "corpus_id")
        score = row.get("score", (int, float))
        if isinstance(score, bool):
            raise EvalDataError(f"{row.where}: field 'score' must be a number, got bool")
        if score <= 0:
            continue
        per_query = out.setdefault(query_id, {})
        per_query[doc_id] = max(float(score), per_query.get(doc_id, 0.0))
    return out
