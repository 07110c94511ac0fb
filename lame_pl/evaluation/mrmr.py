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
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lame_pl.evaluation.official import OfficialView
from lame_pl.evaluation.tables import EvalDataError, Row, find_table, read_qrels, read_rows, require_dir
from lame_pl.evaluation.task import ImageRef, Item, RetrievalTask, image_path

SUBSETS = ("knowledge", "theorem", "design", "traffic", "negation")
# The kind of retrieval each subset asks for (our reading of MRMR's task instructions below: design,
# traffic and negation ask for documents that the query violates or contradicts).
CATEGORY = {
    "knowledge": "knowledge",
    "theorem": "theorem",
    "design": "contradiction",
    "traffic": "contradiction",
    "negation": "contradiction",
}
MAIN_METRIC = {
    "knowledge": "ndcg@10",
    "theorem": "ndcg@10",
    "design": "ndcg@10",
    "traffic": "ndcg@10",
    "negation": "recall@1",
}
QUERY_INSTRUCTIONS = {
    "knowledge": "Retrieve relevant documents that help answer the question.",
    "theorem": "Retrieve relevant theorems that are involved in solving the problem.",
    "design": "Given a vehicle design, retrieve the design requirements that it violates.",
    "traffic": "Given a traffic case, retrieve the driving rule documents that it violates.",
    "negation": "Given an image caption, retrieve descriptions that have contradictory information with the image.",
}


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _image_order(column: str) -> tuple[int, str]:
    """``image`` first, then ``image 1``, ``image 2``, ... by number."""
    suffix = column[len("image") :].strip()
    return (int(suffix) if suffix.isdigit() else -1 if not suffix else 10**6, column)


# A column the layout would call ``image`` or ``image N`` but spelt otherwise (``image_1``, ``Image``,
# ``image1``): read as no image, it would change what is embedded without a word.
_IMAGE_LIKE = re.compile(r"^\s*(image|img)[\s_-]*(\d*)\s*$", re.IGNORECASE)


def _check_image_columns(task: str, rows: Sequence[Row]) -> None:
    seen: set[str] = set()
    for row in rows:
        for column in row.data.keys() - seen:
            seen.add(column)
            match = _IMAGE_LIKE.match(column)
            if match is None or column == "image" or re.fullmatch(r"image [1-9]\d*", column):
                continue
            layout = "image" + (f" {int(match.group(2))}" if match.group(2) else "")
            raise EvalDataError(
                f"task {task}: {row.where}: column {column!r} is not an image column of the layout; "
                f"it is spelt {layout!r} there (a misspelt column would be read as no image)"
            )


def _image_ref(row: Row, column: str, root: Path, task: str) -> ImageRef | None:
    value = row.data.get(column)
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise EvalDataError(f"{row.where}: field {column!r} must be an image path or an image struct")
    return image_path(root, value, task, row, column)


def _images(row: Row, root: Path, task: str) -> tuple[ImageRef, ...]:
    columns = sorted((c for c in row.data if c == "image" or c.startswith("image ")), key=_image_order)
    return tuple(ref for c in columns if (ref := _image_ref(row, c, root, task)) is not None)


def _item(row: Row, instruction: str, root: Path, task: str) -> Item:
    text = row.get("text", str, required=False, default="")
    images = _images(row, root, task)
    if not text and not images:
        raise EvalDataError(f"{row.where}: record has neither 'text' nor an image column")
    return Item(instruction, text, images)


def _official_item(row: Row, instruction: str, root: Path, task: str, modality: str | None) -> Item:
    """The item as MRMR's evaluator embeds it: the ``image`` column only; text and image as ``modality`` says."""
    text = row.get("text", str, required=False, default="") or ""
    image = _image_ref(row, "image", root, task)
    images = (image,) if image is not None else ()
    if modality == "text":
        images = ()
    elif modality == "image":
        text = ""
    if not text and not images:
        wanted = "a 'text'" if modality == "text" else "an 'image'"
        raise EvalDataError(
            f"{row.where}: MRMR embeds this record as modality {modality!r} but it has no {wanted} "
            f"value (the 'modality' column of a query is taken from the first query, as MRMR does)"
        )
    return Item(instruction, text, images)


def _modality(row: Row) -> str | None:
    value = row.data.get("modality")
    return value.replace(" ", "") if isinstance(value, str) else None


# pin_p documents: knowledge gives them ids of their own ("redo-<row>", never in the qrels); theorem
# maps them like corpus rows, so their own ids can be relevant (MRMR's task loaders).
PIN_P_OWN_IDS = {"theorem"}


def read_official_qrels(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """``{query id: {corpus id: int(score)}}`` as MRMR's loaders build it: the last row of a pair wins, 0 stays."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        score = row.get("score", (int, float))
        if isinstance(score, bool):
            raise EvalDataError(f"{row.where}: field 'score' must be a number, got bool")
        out.setdefault(row.ident("query-id", "query_id"), {})[row.ident("corpus-id", "corpus_id")] = int(score)
    return out


def read_mrmr_task(subset: str, folder: Path, image_root: Path | None = None, log: Log | None = None) -> RetrievalTask:
    """One MRMR subset: its queries ranked against its whole corpus, scored both ways."""
    log = log or _stderr
    root = image_root or folder
    task = f"MRMR-{subset}"
    candidates: list[Item] = []
    official_candidates: list[Item] = []
    doc_ids: list[str] = []
    index: dict[str, int] = {}
    corpus_rows = read_rows(find_table(folder, "corpus"))
    _check_image_columns(task, corpus_rows)
    for row in corpus_rows:
        doc_id = row.ident("id", "corpus-id", "corpus_id")
        if doc_id in index:
            raise EvalDataError(f"{row.where}: corpus id {doc_id!r} appears twice in the corpus")
        index[doc_id] = len(candidates)
        candidates.append(_item(row, "", root, task))
        official_candidates.append(_official_item(row, "", root, task, _modality(row)))
        doc_ids.append(doc_id)
    if any((folder / f"pin_p{s}").exists() for s in ("", ".jsonl", ".json", ".parquet")):
        pin_rows = read_rows(find_table(folder, "pin_p"))
        _check_image_columns(task, pin_rows)
        shared = 0
        for row in pin_rows:
            index[f"pin_p-{row.index}"] = len(candidates)
            candidates.append(_item(row, "", root, task))
            official_candidates.append(_official_item(row, "", root, task, _modality(row)))
            own = row.ident("id", "corpus-id", "corpus_id") if subset in PIN_P_OWN_IDS else f"redo-{row.index}"
            shared += own in index
            doc_ids.append(own)
        if shared:
            log(
                f"warning: {task}: {shared} pin_p documents have the id of a corpus document; MRMR ranks one "
                f"document per id, which the official scoring takes at the higher score"
            )
    qrels_files = find_table(folder, "qrels")
    qrels_rows = read_rows(qrels_files)
    grades = read_qrels(qrels_rows)
    official_grades = read_official_qrels(qrels_rows)
    known = set(doc_ids) | set(index)
    named = {d for per_query in official_grades.values() for d in per_query}
    missing = sorted(named - known)
    if missing and len(missing) == len(named):
        raise EvalDataError(
            f"task {task}: {qrels_files[0]}: column 'corpus-id' names no document of the corpus "
            f"(e.g. {missing[0]!r}; corpus ids look like {doc_ids[0]!r})"
        )
    if missing:
        log(
            f"warning: {task}: {len(missing)} of {len(named)} documents the qrels name are not in the corpus "
            f"(e.g. {missing[0]!r}); both scorings count them as relevant and never retrieved"
        )
    query_rows = read_rows(find_table(folder, "query"))
    _check_image_columns(task, query_rows)
    instruction = QUERY_INSTRUCTIONS.get(subset, "")
    # MRMR's evaluator embeds every query the way the first query's modality says.
    query_modality = _modality(query_rows[0]) if query_rows else None
    differ = sum(1 for row in query_rows if _modality(row) != query_modality)
    if differ:
        log(
            f"warning: {task}: {differ} queries have another modality than the first ({query_modality}); the "
            f"official scoring embeds them as MRMR does, as {query_modality}"
        )
    queries, relevance, ideal = [], [], []
    official_queries, official_qrels = [], []
    skipped = 0
    for row in query_rows:
        query_id = row.ident("id", "query-id", "query_id")
        if query_id in official_grades:
            official_queries.append(_official_item(row, instruction, root, task, query_modality))
            official_qrels.append(official_grades[query_id])
        positives = grades.get(query_id, {})
        if not positives:
            skipped += 1
            continue
        queries.append(_item(row, instruction, root, task))
        relevance.append({index[d]: g for d, g in positives.items() if d in index})
        ideal.append(list(positives.values()))
    zero_only = sum(1 for q in official_qrels if not any(g > 0 for g in q.values()))
    if skipped:
        log(
            f"{task}: {skipped} of {len(query_rows)} queries have no qrel with a score > 0: strict leaves them "
            f"out; official counts the {zero_only} of them that have qrels, as MRMR does (they score 0)"
        )
    if not official_queries:
        raise EvalDataError(f"task {task}: {qrels_files[0]}: column 'query-id' names no query of the query table")
    official = OfficialView("trec_eval", official_queries, official_candidates, qrels=official_qrels, doc_ids=doc_ids)
    return RetrievalTask(
        name=subset,
        modality="mrmr",
        group=subset,
        main_metric=MAIN_METRIC.get(subset, "ndcg@10"),
        queries=queries,
        candidates=candidates,
        relevance=relevance,
        ideal_grades=ideal,
        skipped_queries=skipped,
        official=official,
    )


# Where a subset's snapshot may sit under --data-root: ``<subset>/`` or under the dataset owner's
# name, as ``huggingface-cli download MRMRbenchmark/<subset> --local-dir MRMRbenchmark/<subset>``
# leaves it. Folder names are matched without regard to case.
SUBSET_HOMES = (".", "MRMRbenchmark")


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
    data_root: str | Path,
    names: Sequence[str] | None = None,
    image_root: str | Path | None = None,
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
            log(
                f"warning: folder {path} is not read: it is not an MRMR subset ({', '.join(SUBSETS)}) "
                f"nor MRMRbenchmark/<subset> (see --list-tasks)"
            )
    if names is None:
        names = [s for s in SUBSETS if s in found]
        if not names:
            raise EvalDataError(
                f"no MRMR subset folder under {root}: expected one of {', '.join(SUBSETS)} (or MRMRbenchmark/<subset>)"
            )
    tasks = []
    for name in [_canonical(n, log) for n in names]:
        if name not in found:
            raise EvalDataError(
                f"missing folder for MRMR subset {name!r}: looked for {root / name} and "
                f"{root / 'MRMRbenchmark' / name} (the corpus, query and qrels tables)"
            )
        folder = found[name][0]
        log(f"{name}: tables {folder.relative_to(root)}")
        try:
            tasks.append(read_mrmr_task(name, folder, Path(image_root) if image_root else None, log))
        except EvalDataError as error:  # every message names the task
            message = str(error)
            raise EvalDataError(message if message.startswith("task ") else f"task MRMR-{name}: {message}") from None
    return tasks
