"""Readers of the MMEB-v2 evaluation layout (VLM2Vec convention) from a local folder.

Layout under ``--data-root`` (a table is ``NAME.jsonl``, ``NAME.json``, ``NAME.parquet`` or a
folder ``NAME/`` of such shards, as a Hugging Face snapshot stores a config)::

    image/<Task>            MMEB_Test_Instruct config <Task>, split test: one row per query with
                            qry_inst, qry_text, qry_img_path (str), tgt_inst (str or list),
                            tgt_text (list), tgt_img_path (list); the gold candidate is index 0
    image-tasks/            the images; qry_img_path and tgt_img_path are relative to it
    video/<Task>            the same row shape with frame folders: qry_video_path (str) and
                            tgt_video_path (list) instead of the image paths
    video-tasks/            the frame folders: a video is num_frames of its frames, sampled evenly
                            in natural order as VLM2Vec-V2 samples them (``lame_pl.media``), and
                            read through the model's video input
    visdoc/<Task>/corpus    BEIR-style: corpus-id and image (a path, inline bytes, or absent:
                                then visdoc-tasks/<Task>/<corpus-id>.png)
    visdoc/<Task>/queries   query-id, query
    visdoc/<Task>/qrels     query-id, corpus-id, score (graded)

The published snapshots are read where they lie (``mmeb_layout``: ``ANNOTATION_HOMES``,
``MEDIA_ROOTS``; README "MMEB-v2 and MRMR on disk"): the image rows also in
``MMEB_Test_Instruct/<Task>/`` or ``MMEB-eval/<Task>/``, the images also in ``image-tasks/MMEB/``
or ``eval_images/``, the frames also in ``video-tasks/frames/video_{cls,ret,mret,qa}/``, the BEIR
tables also in ``visdoc-tasks/<dataset name>/`` (``TaskInfo.folders``). Each task's media folder is
the first that holds its first media path. Where a task was read from, and each folder not read, is
said.

``--image-root`` replaces the image and video media folders. Image and video tasks rank each
query's own candidates (local) except where VLM2Vec ranks the whole candidate set (video
classification and retrieval: the candidate set is then every distinct candidate of the task's
rows); visual-document tasks rank the whole corpus. Candidates with the
same name (see ``mmeb_tasks.Naming``) are one candidate: in a local list the first one is kept, so
a duplicate of the gold is the gold, never a rival. VLM2Vec's own video loaders read each source
dataset's raw annotations and extract frames; this reader expects those records already turned
into the row shape above.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lame_pl.evaluation.mmeb_layout import (
    ANNOTATION_HOMES,
    KNOWN_TOP,
    MEDIA_ROOTS,
    Found,
    Log,
    find_media_root,
    relative_path,
    scan_tasks,
    select_tasks,
)
from lame_pl.evaluation.mmeb_tasks import MAIN_METRIC, TaskInfo
from lame_pl.evaluation.official import OfficialView
from lame_pl.evaluation.tables import EvalDataError, Row, find_table, read_qrels, read_rows, require_dir
from lame_pl.evaluation.task import ImageRef, Item, RetrievalTask, image_path
from lame_pl.instructions import VISDOC_PAGE_TEXT, VISDOC_QUERY_INSTRUCTION
from lame_pl.instructions import strip_mmeb_placeholder as _clean
from lame_pl.media import list_frames, sample_frames

Media = Callable[[Row, str, str], tuple[ImageRef, ...]]


def _name(naming: str, text: str, media: str) -> str:
    if naming == "text":
        return text
    if naming == "image":
        return media
    return f"{media}:{text}"


def _item(instruction: str, text: str, media: tuple[ImageRef, ...], video: bool) -> Item:
    return Item(instruction, text, video=media) if video else Item(instruction, text, images=media)


def read_pair_task(info: TaskInfo, rows: Sequence[Row], media: Media, media_field: str) -> RetrievalTask:
    """An image or video task from MMEB rows (query + candidate list, gold at index 0).

    Args:
        info: The task's modality, group, scope and candidate naming.
        rows: Its rows.
        media: Turns ``(row, field, relative path)`` into the item's images or frames ("" gives none).
        media_field: ``img_path`` (the media are images) or ``video_path`` (the media are a
            video's frames): the suffix of the ``qry_``/``tgt_`` media fields.
    """
    video = media_field == "video_path"
    _check_media_columns(info.name, rows, media_field)
    queries, candidates, relevance, local = [], [], [], []
    index_of_item: dict[Item, int] = {}
    index_of_name: dict[str, int] = {}
    # VLM2Vec embeds one candidate per name, the first of the task (generate_cand_dataset), and
    # ranks each list as given: official_lists holds those first-by-name indices, duplicates kept.
    first_of_name: dict[str, int] = {}
    official_lists: list[list[int]] = []

    def add(item: Item, name: str) -> int:
        if info.scope == "global":  # one candidate per name across the task
            if name not in index_of_name:
                index_of_name[name] = len(candidates)
                candidates.append(item)
            return index_of_name[name]
        if item not in index_of_item:
            index_of_item[item] = len(candidates)
            candidates.append(item)
        return index_of_item[item]

    for row in rows:
        q_media = row.get(f"qry_{media_field}", str, required=False, default="")
        queries.append(
            _item(
                _clean(row.text("qry_inst", required=False)),
                _clean(row.text("qry_text")),
                media(row, f"qry_{media_field}", q_media),
                video,
            )
        )
        texts = row.texts("tgt_text")
        if not texts:
            raise EvalDataError(f"{row.where}: field 'tgt_text' is an empty list (the gold candidate is its index 0)")
        paths = row.texts(f"tgt_{media_field}", required=False) or [""] * len(texts)
        if len(paths) != len(texts):
            raise EvalDataError(
                f"{row.where}: 'tgt_text' has {len(texts)} candidates but 'tgt_{media_field}' has {len(paths)}"
            )
        instructions = _target_instructions(row, len(texts))
        chosen: list[int] = []
        listed: list[int] = []
        seen: set[str] = set()
        for text, path, instruction in zip(texts, paths, instructions, strict=True):
            name = _name(info.naming, _clean(text), path)
            if name in seen:  # a duplicate candidate is the same candidate, kept once (strict)
                listed.append(first_of_name[name])
                continue
            seen.add(name)
            chosen.append(add(_item(instruction, _clean(text), media(row, f"tgt_{media_field}", path), video), name))
            first_of_name.setdefault(name, chosen[-1])
            listed.append(first_of_name[name])
        relevance.append({chosen[0]: 1.0})
        local.append(chosen)
        official_lists.append(listed)
    gold = [lst[0] for lst in official_lists]
    official = OfficialView(
        "vlm2vec",
        queries,
        candidates,
        relevance=[{g: 1.0} for g in gold],
        labels=[[1.0] for _ in gold],
        lists=official_lists if info.scope == "local" else None,
        order=list(range(len(candidates))) if info.scope == "global" else None,
    )
    return RetrievalTask(
        name=info.name,
        modality=info.modality,
        group=info.group,
        main_metric=MAIN_METRIC[info.modality],
        queries=queries,
        candidates=candidates,
        relevance=relevance,
        ideal_grades=[[1.0] for _ in queries],
        local=local if info.scope == "local" else None,
        counted=info.counted,
        official=official,
    )


# The row fields of an image or video task; another qry_/tgt_ column naming media is a misspelling
# that would otherwise be read as "no media" (VLM2Vec's parsers stop on a missing field).
PAIR_FIELDS = {
    "qry_inst",
    "qry_text",
    "qry_img_path",
    "qry_video_path",
    "tgt_inst",
    "tgt_text",
    "tgt_img_path",
    "tgt_video_path",
}
MEDIA_WORDS = ("img", "image", "video", "frame", "path")


def _check_media_columns(task: str, rows: Sequence[Row], media_field: str) -> None:
    seen: set[str] = set()
    for row in rows:
        for column in row.data.keys() - seen:
            seen.add(column)
            lowered = column.casefold()
            if column in PAIR_FIELDS or not lowered.startswith(("qry", "tgt")):
                continue
            if any(word in lowered for word in MEDIA_WORDS):
                side = "qry" if lowered.startswith("qry") else "tgt"
                raise EvalDataError(
                    f"task {task}: {row.where}: column {column!r} is not a field of the layout; "
                    f"the media field is '{side}_{media_field}' (a misspelt column would be read "
                    f"as no media)"
                )


def _target_instructions(row: Row, n: int) -> list[str]:
    value = row.data.get("tgt_inst")
    if value is None:
        return [""] * n
    if isinstance(value, str):
        return [_clean(value)] * n
    values = row.texts("tgt_inst")
    if len(values) != n:
        raise EvalDataError(f"{row.where}: 'tgt_inst' has {len(values)} entries for {n} candidates")
    return [_clean(v) for v in values]


def image_media(root: Path, task: str) -> Media:
    """Resolves an image path against ``root``, checking that the file exists."""

    def resolve(row: Row, field: str, relative: str) -> tuple[ImageRef, ...]:
        return (image_path(root, relative, task, row, field),) if relative else ()

    return resolve


def video_media(root: Path, task: str, num_frames: int) -> Media:
    """Resolves a frame folder against ``root`` into ``num_frames`` of its frames (``lame_pl.media.sample_frames``)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")

    def resolve(row: Row, field: str, relative: str) -> tuple[ImageRef, ...]:
        if not relative:
            return ()
        folder = root / relative
        if not folder.is_dir():
            raise EvalDataError(f"task {task}: {row.where}: {field} {relative!r} does not exist (looked at {folder})")
        frames = list_frames(folder)
        if not frames:
            raise EvalDataError(f"task {task}: {row.where}: {field} {relative!r} holds no frame image ({folder})")
        return tuple(str(p) for p in sample_frames(frames, num_frames))

    return resolve


def read_visdoc_task(
    info: TaskInfo, folder: Path, page_root: Path, log: Callable[[str], None] | None = None
) -> RetrievalTask:
    """A BEIR-style visual-document task: queries ranked against the whole corpus with graded qrels.

    A task with a ``language`` (the English ViDoRe-v2 tasks) keeps the queries of that language.
    """
    log = log or _stderr
    corpus_rows = read_rows(find_table(folder, "corpus"))
    candidates: list[Item] = []
    index: dict[str, int] = {}
    _check_page_column(info.name, corpus_rows)
    for row in corpus_rows:
        doc_id = row.ident("corpus-id", "corpus_id")
        if doc_id in index:
            raise EvalDataError(f"{row.where}: corpus-id {doc_id!r} appears twice in the corpus")
        index[doc_id] = len(candidates)
        candidates.append(Item("", VISDOC_PAGE_TEXT, (_page_image(row, doc_id, page_root, info.name),)))
    query_rows = read_rows(find_table(folder, "queries"))
    if info.language is not None:
        if any("language" in row.data for row in query_rows):
            kept = [row for row in query_rows if row.data.get("language") == info.language]
            log(f"{info.name}: {len(kept)} of {len(query_rows)} queries are in {info.language}, the rest are left out")
            query_rows = kept
        else:
            log(
                f"warning: {info.name}: the queries have no 'language' column, so all of them are kept "
                f"(the task keeps only its {info.language} queries)"
            )
    qrels_files = find_table(folder, "qrels")
    grades = read_qrels(read_rows(qrels_files))
    _check_qrels_ids(info.name, qrels_files, grades, index)
    queries, relevance, ideal = [], [], []
    skipped = 0
    # VLM2Vec ranks the documents the queries name (first seen, query by query) before the rest of
    # the corpus (generate_cand_dataset): its argsort keeps that order among tied scores.
    named: dict[int, None] = {}
    for row in query_rows:
        query_id = row.ident("query-id", "query_id")
        text = row.text("query")
        positives = grades.get(query_id, {})
        if not positives:
            skipped += 1
            continue
        queries.append(Item(VISDOC_QUERY_INSTRUCTION, text))
        relevance.append({index[d]: g for d, g in positives.items() if d in index})
        ideal.append(list(positives.values()))
        named.update((index[d], None) for d in positives if d in index)
    if skipped:
        log(
            f"{info.name}: {skipped} of {len(query_rows)} queries have no qrel with a score > 0 and are left out of "
            f"both scorings (VLM2Vec's loader stops on such a query)"
        )
    order = [*named, *(i for i in range(len(candidates)) if i not in named)]
    official = OfficialView("vlm2vec", queries, candidates, relevance=relevance, labels=ideal, order=order)
    return RetrievalTask(
        name=info.name,
        modality="visdoc",
        group=info.group,
        main_metric=MAIN_METRIC["visdoc"],
        queries=queries,
        candidates=candidates,
        relevance=relevance,
        ideal_grades=ideal,
        skipped_queries=skipped,
        counted=info.counted,
        official=official,
    )


def _check_qrels_ids(
    task: str, files: Sequence[Path], grades: dict[str, dict[str, float]], index: dict[str, int]
) -> None:
    """A qrel naming no corpus row is an error: VLM2Vec's loader stops on it (no page image to embed)."""
    missing = sorted({d for per_query in grades.values() for d in per_query if d not in index})
    if missing:
        named = len({d for per_query in grades.values() for d in per_query})
        example = next(iter(index), "")
        raise EvalDataError(
            f"task {task}: {files[0]}: column 'corpus-id' names {len(missing)} of {named} documents that are not in "
            f"the corpus (e.g. {missing[0]!r}; corpus ids look like {example!r})"
        )


def _check_page_column(task: str, rows: Sequence[Row]) -> None:
    """A corpus without an ``image`` column but with another image-like one is misspelt, not image-less."""
    columns = {c for row in rows for c in row.data}
    if "image" in columns:
        return
    odd = sorted(c for c in columns if any(w in c.casefold() for w in ("image", "img", "page")))
    if odd:
        raise EvalDataError(
            f"task {task}: {rows[0].file}: column {odd[0]!r} is not read: the page image column is "
            f"'image' (without it the pages are looked for as <corpus-id>.png)"
        )


def _page_image(row: Row, doc_id: str, page_root: Path, task: str) -> ImageRef:
    value = row.data.get("image")
    if isinstance(value, dict) and value.get("bytes"):
        return bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, str) and value:
        return image_path(page_root, value, task, row, "image")
    if value is not None and not isinstance(value, (dict, str)):
        raise EvalDataError(f"{row.where}: field 'image' must be a path or an image struct, got {type(value).__name__}")
    return image_path(page_root, f"{doc_id}.png", task, row, "page image")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_mmeb_tasks(
    data_root: str | Path,
    names: Sequence[str] | None = None,
    image_root: str | Path | None = None,
    num_frames: int = 8,
    log: Log = _stderr,
) -> list[RetrievalTask]:
    """Reads every task (or ``names``) under ``data_root``, checking every record and media path.

    The tables are looked for in the folders of ``ANNOTATION_HOMES`` (the layouts of the
    published snapshots), the media in ``MEDIA_ROOTS``; where each task was read from, and every
    folder that is not read, is said through ``log``. Everything is read and checked before
    anything is encoded, so bad data stops the run at once.
    """
    root = require_dir(Path(data_root), "the MMEB-v2 data root")
    found, warnings = scan_tasks(root)
    if not found:
        raise EvalDataError(
            f"no MMEB-v2 task folder under {root}: expected image/, video/ or visdoc/, or a "
            f"snapshot folder ({', '.join(sorted(KNOWN_TOP))}); see --list-tasks"
        )
    for hits in found.values():
        for other in hits[1:]:
            warnings.append(f"warning: {other.path} is not read: task {other.info.name} is read from {hits[0].path}")
    for modality, media in MEDIA_ROOTS.items():
        present = [m for m in media[:1] if (root / m).is_dir()]
        if present and not any(f[0].info.modality == modality for f in found.values()):
            warnings.append(
                f"warning: {root / present[0]} holds {modality} media but no {modality} task table was "
                f"found (looked in {', '.join(h + '/' for h in ANNOTATION_HOMES[modality])}): "
                f"no {modality} task is evaluated"
            )
    for warning in warnings:
        log(warning)
    tasks = []
    for hit in select_tasks(root, found, names, log):
        try:
            tasks.append(_read_found(root, hit, image_root, num_frames, log))
        except EvalDataError as error:  # every message names the task
            message = str(error)
            raise EvalDataError(
                message if message.startswith("task ") else f"task {hit.info.name}: {message}"
            ) from None
    return tasks


def _read_found(root: Path, hit: Found, image_root: str | Path | None, num_frames: int, log: Log) -> RetrievalTask:
    """One task found by ``scan_tasks``, read and checked."""
    info, name = hit.info, hit.info.name
    if info.modality == "visdoc":
        pages = [root / "visdoc-tasks" / n for n in (name, *info.folders)] + [hit.path]
        page_root = next((p for p in pages if p.is_dir()), pages[0])
        log(f"{name}: tables {relative_path(hit.path, root)}, pages {relative_path(page_root, root)}")
        return read_visdoc_task(info, hit.path, page_root, log)
    rows = read_rows(find_table(hit.path.parent, hit.stem))
    field = "img_path" if info.modality == "image" else "video_path"
    candidates = [Path(image_root)] if image_root else [root / m for m in MEDIA_ROOTS[info.modality]]
    media_root = find_media_root(name, rows, field, candidates)
    log(f"{name}: rows {relative_path(hit.path, root)}, media {relative_path(media_root, root)}")
    if info.modality == "image":
        return read_pair_task(info, rows, image_media(media_root, name), field)
    return read_pair_task(info, rows, video_media(media_root, name, num_frames), field)


__all__ = ["load_mmeb_tasks", "read_pair_task", "read_visdoc_task"]
