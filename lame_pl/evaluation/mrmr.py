"""Reader of the MRMR benchmark (reasoning-intensive multimodal retrieval) from a local folder.

The Hugging Face datasets ``MRMRbenchmark/{knowledge,theorem,design,traffic,negation}`` each
have the configs ``corpus``, ``query`` and ``qrels`` (knowledge and theorem also ``pin_p``: extra
corpus documents, appended to the corpus as the MRMR task code does). Layout under ``--data-root``
(a table is ``NAME.jsonl``, ``NAME.json``, ``NAME.parquet`` or a folder ``NAME/`` of shards)::

    <subset>/corpus    id, text, image columns (``image``, ``image 1``, ``image 2``, ...)
    <subset>/query     id, text, image columns
    <subset>/qrels     query-id, corpus-id, score  (knowledge/theorem: query_id, corpus_id)
    <subset>/pin_p     optional, same columns as corpus; its documents get ids ``pin_p-<row>``

``<subset>/`` may also be ``MRMRbenchmark/<subset>/``, and in any case (``Knowledge/``).

An image column holds a path (relative to ``--image-root``, default the subset folder) or an
image struct with inline ``bytes``. A document's images come before its text (interleaving at
its ``<image N>`` placeholders is not reproduced). Every query ranks the whole corpus; the main
score is nDCG@10 (recall@1 for negation), computed as trec_eval does (linear gain; ties: see
``metrics``). The query instructions are the ones MRMR's task definitions give.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lame_pl.evaluation.tables import EvalDataError, Row, find_table, read_qrels, read_rows, require_dir
from lame_pl.evaluation.task import ImageRef, Item, RetrievalTask, image_path

SUBSETS = ("knowledge", "theorem", "design", "traffic", "negation")
# The kind of retrieval each subset asks for (our reading of MRMR's task instructions below: design,
# traffic and negation ask for documents that the query violates or contradicts).
CATEGORY = {"knowledge": "knowledge", "theorem": "theorem", "design": "contradiction", "traffic": "contradiction",
            "negation": "contradiction"}
MAIN_METRIC = {"knowledge": "ndcg@10", "theorem": "ndcg@10", "design": "ndcg@10", "traffic": "ndcg@10",
               "negation": "recall@1"}
QUERY_INSTRUCTIONS = {
    "knowledge": "Retrieve relevant documents that help answer the question.",
    "theorem": "Retrieve relevant theorems that are involved in solving the problem.",
    "design": "Given a vehicle design, retrieve the design requirements that it violates.",
    "traffic": "Given a traffic case, retrieve the driving rule documents that it violates.",
    "negation": "Given an image caption, retrieve descriptions that have contradictory information with the image.",
}


def _image_order(column: str) -> tuple[int, str]:
    """``image`` first, then ``image 1``, ``image 2``, ... by number."""
    suffix = column[len("image"):].strip()
    return (int(suffix) if suffix.isdigit() else -1 if not suffix else 10**6, column)


def _images(row: Row, root: Path, task: str) -> tuple[ImageRef, ...]:
    columns = sorted((c for c in row.data if c == "image" or c.startswith("image ")), key=_image_order)
    out: list[ImageRef] = []
    for column in columns:
        value = row.data[column]
        if value is None or value == "":
            continue
        if isinstance(value, dict):
            if value.get("bytes"):
                out.append(bytes(value["bytes"]))
                continue
            value = value.get("path")
        if not isinstance(value, str) or not value:
            raise EvalDataError(f"{row.where}: field {column!r} must be an image path or an image struct")
        out.append(image_path(root, value, task, row, column))
    return tuple(out)


def _item(row: Row, instruction: str, root: Path, task: str) -> Item:
    text = row.get("text", str, required=False, default="")
    images = _images(row, root, task)
    if not text and not images:
        raise EvalDataError(f"{row.where}: record has neither 'text' nor an image column")
    return Item(instruction, text, images)


def read_mrmr_task(subset: str, folder: Path, image_root: Path | None = None) -> RetrievalTask:
    """One MRMR subset: its queries ranked against its whole corpus."""
    root = image_root or folder
    task = f"MRMR-{subset}"
    candidates: list[Item] = []
    index: dict[str, int] = {}
    for row in read_rows(find_table(folder, "corpus")):
        doc_id = row.ident("id", "corpus-id", "corpus_id")
        if doc_id in index:
            raise EvalDataError(f"{row.where}: corpus id {doc_id!r} appears twice in the corpus")
        index[doc_id] = len(candidates)
        candidates.append(_item(row, "", root, task))
    if any((folder / f"pin_p{s}").exists() for s in ("", ".jsonl", ".json", ".parquet")):
        for row in read_rows(find_table(folder, "pin_p")):
            index[f"pin_p-{row.index}"] = len(candidates)
            candidates.append(_item(row, "", root, task))
    grades = read_qrels(read_rows(find_table(folder, "qrels")))
    queries, relevance, ideal = [], [], []
    skipped = 0
    for row in read_rows(find_table(folder, "query")):
        positives = grades.get(row.ident("id", "query-id", "query_id"), {})
        if not positives:
            skipped += 1
            continue
        queries.append(_item(row, QUERY_INSTRUCTIONS.get(subset, ""), root, task))
        relevance.append({index[d]: g for d, g in positives.items() if d in index})
        ideal.append(list(positives.values()))
    return RetrievalTask(
        name=subset, modality="mrmr", group=subset, main_metric=MAIN_METRIC.get(subset, "ndcg@10"),
        queries=queries, candidates=candidates, relevance=relevance, ideal_grades=ideal, skipped_queries=skipped,
    )


# Where a subset's snapshot may sit under --data-root: ``<subset>/`` or under the dataset owner's
# name, as ``huggingface-cli download MRMRbenchmark/<subset> --local-dir MRMRbenchmark/<subset>``
# leaves it. Folder names are matched without regard to case.
SUBSET_HOMES = (".", "MRMRbenchmark")
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _subset_folders(root: Path) -> dict[str, list[Path]]:
    """``{subset: folders}`` for every known subset found under the homes of ``root``, in search order."""
    found: dict[str, list[Path]] = {}
    for home in SUBSET_HOMES:
        folder = root / home
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_dir() and path.name.casefold() in SUBSETS:
                found.setdefault(path.name.casefold(), []).append(path)
    return found


def _canonical(name: str, log: Log) -> str:
    """The subset ``name`` means, case ignored; an unknown name is an error naming the closest one."""
    if name in SUBSETS:
        return name
    if name.casefold() in SUBSETS:
        log(f"note: task {name!r} read as {name.casefold()!r} (task names are matched without regard to case)")
        return name.casefold()
    close = difflib.get_close_matches(name.casefold(), SUBSETS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise EvalDataError(f"unknown MRMR task {name!r}{hint}: the tasks are {', '.join(SUBSETS)}")


def load_mrmr_tasks(
    data_root: str | Path, names: Sequence[str] | None = None, image_root: str | Path | None = None,
    log: Log = _stderr,
) -> list[RetrievalTask]:
    """Reads the MRMR subsets (all present ones, or ``names``) under ``data_root``, checking every record.

    Subset folders are looked for under ``SUBSET_HOMES``; where each was read from, and every
    folder under the data root that is not read, is said through ``log``.
    """
    root = require_dir(Path(data_root), "the MRMR data root")
    found = _subset_folders(root)
    for subset, folders in found.items():
        if folders[0].name != subset:
            log(f"note: folder {folders[0]} read as MRMR subset {subset!r} (names are matched without regard to case)")
        for other in folders[1:]:
            log(f"warning: {other} is not read: MRMR subset {subset!r} is read from {folders[0]}")
    read_top = {f.relative_to(root).parts[0] for folders in found.values() for f in folders}
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and path.name not in read_top:
            log(f"warning: folder {path} is not read: it is not an MRMR subset ({', '.join(SUBSETS)}) "
                f"nor MRMRbenchmark/<subset> (see --list-tasks)")
    if names is None:
        names = [s for s in SUBSETS if s in found]
        if not names:
            raise EvalDataError(f"no MRMR subset folder under {root}: expected one of {', '.join(SUBSETS)} "
                                f"(or MRMRbenchmark/<subset>)")
    tasks = []
    for name in [_canonical(n, log) for n in names]:
        if name not in found:
            raise EvalDataError(f"missing folder for MRMR subset {name!r}: looked for {root / name} and "
                                f"{root / 'MRMRbenchmark' / name} (the corpus, query and qrels tables)")
        folder = found[name][0]
        log(f"{name}: tables {folder.relative_to(root)}")
        tasks.append(read_mrmr_task(name, folder, Path(image_root) if image_root else None))
    return tasks
