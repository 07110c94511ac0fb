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

``--image-root`` replaces ``image-tasks/`` and ``video-tasks/``. Image and video tasks rank each
query's own candidates (local) except where VLM2Vec ranks the whole candidate set (video
classification and retrieval: the candidate set is then every distinct candidate of the task's
rows); visual-document tasks rank the whole corpus. Candidates with the
same name (see ``mmeb_tasks.Naming``) are one candidate: in a local list the first one is kept, so
a duplicate of the gold is the gold, never a rival. VLM2Vec's own video loaders read each source
dataset's raw annotations and extract frames; this reader expects those records already turned
into the row shape above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from lame_pl.evaluation.mmeb_tasks import MAIN_METRIC, MODALITY_ORDER, TASKS, TaskInfo, tasks_of
from lame_pl.evaluation.tables import TABLE_SUFFIXES, EvalDataError, Row, find_table, read_qrels, read_rows, require_dir
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
    queries, candidates, relevance, local = [], [], [], []
    index_of_item: dict[Item, int] = {}
    index_of_name: dict[str, int] = {}

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
        queries.append(_item(_clean(row.text("qry_inst", required=False)), _clean(row.text("qry_text")),
                             media(row, f"qry_{media_field}", q_media), video))
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
        seen: set[str] = set()
        for text, path, instruction in zip(texts, paths, instructions, strict=True):
            name = _name(info.naming, _clean(text), path)
            if name in seen:  # a duplicate candidate is the same candidate, kept once
                continue
            seen.add(name)
            chosen.append(add(_item(instruction, _clean(text), media(row, f"tgt_{media_field}", path), video), name))
        relevance.append({chosen[0]: 1.0})
        local.append(chosen)
    return RetrievalTask(
        name=info.name, modality=info.modality, group=info.group, main_metric=MAIN_METRIC[info.modality],
        queries=queries, candidates=candidates, relevance=relevance, ideal_grades=[[1.0] for _ in queries],
        local=local if info.scope == "local" else None, counted=info.counted,
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


def read_visdoc_task(info: TaskInfo, folder: Path, page_root: Path) -> RetrievalTask:
    """A BEIR-style visual-document task: queries ranked against the whole corpus with graded qrels."""
    corpus_rows = read_rows(find_table(folder, "corpus"))
    candidates: list[Item] = []
    index: dict[str, int] = {}
    for row in corpus_rows:
        doc_id = row.ident("corpus-id", "corpus_id")
        if doc_id in index:
            raise EvalDataError(f"{row.where}: corpus-id {doc_id!r} appears twice in the corpus")
        index[doc_id] = len(candidates)
        candidates.append(Item("", VISDOC_PAGE_TEXT, (_page_image(row, doc_id, page_root, info.name),)))
    query_rows = read_rows(find_table(folder, "queries"))
    grades = read_qrels(read_rows(find_table(folder, "qrels")))
    queries, relevance, ideal = [], [], []
    skipped = 0
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
    return RetrievalTask(
        name=info.name, modality="visdoc", group=info.group, main_metric=MAIN_METRIC["visdoc"], queries=queries,
        candidates=candidates, relevance=relevance, ideal_grades=ideal, skipped_queries=skipped,
        counted=info.counted,
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


def _present(folder: Path) -> list[str]:
    """Task names with a table (file or folder) in ``folder``."""
    names = set()
    for path in folder.iterdir():
        if path.is_dir():
            names.add(path.name)
        elif path.suffix in TABLE_SUFFIXES:
            names.add(path.stem)
    return sorted(names)


def _info(name: str, modality: str) -> TaskInfo:
    if name in TASKS:
        return TASKS[name]
    # A task the table does not know: ranked the way its modality mostly is, reported apart.
    return TaskInfo(name, modality, "other", "global" if modality == "visdoc" else "local", counted=False)


def load_mmeb_tasks(
    data_root: str | Path,
    names: Sequence[str] | None = None,
    image_root: str | Path | None = None,
    num_frames: int = 8,
) -> list[RetrievalTask]:
    """Reads every task (or ``names``) under ``data_root``, checking every record and media path.

    Everything is read and checked before anything is encoded, so bad data stops the run at once.
    """
    root = require_dir(Path(data_root), "the MMEB-v2 data root")
    found = {m: _present(root / m) for m in MODALITY_ORDER if (root / m).is_dir()}
    if not found:
        raise EvalDataError(f"no MMEB-v2 task folder under {root}: expected image/, video/ or visdoc/")
    if names is None:
        selected = []
        for modality in MODALITY_ORDER:
            present = set(found.get(modality, []))
            known = [t.name for t in tasks_of(modality) if t.name in present]
            selected += [(modality, n) for n in known + sorted(present - set(known))]
    else:
        selected = []
        for name in names:
            homes = [m for m in found if name in found[m]]
            if not homes:
                where = ", ".join(str(root / m) for m in found)
                raise EvalDataError(f"task {name!r} not found under {where}")
            selected.append((homes[0], name))
    tasks = []
    for modality, name in selected:
        info = _info(name, modality)
        folder = root / modality
        if modality == "visdoc":
            tasks.append(read_visdoc_task(info, require_dir(folder / name, f"the BEIR tables of {name}"),
                                          root / "visdoc-tasks" / name))
            continue
        rows = read_rows(find_table(folder, name))
        if modality == "image":
            media_root = Path(image_root) if image_root else root / "image-tasks"
            tasks.append(read_pair_task(info, rows, image_media(media_root, name), "img_path"))
        else:
            media_root = Path(image_root) if image_root else root / "video-tasks"
            tasks.append(read_pair_task(info, rows, video_media(media_root, name, num_frames), "video_path"))
    return tasks


__all__ = ["load_mmeb_tasks", "read_pair_task", "read_visdoc_task"]
