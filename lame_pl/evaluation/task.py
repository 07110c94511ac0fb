"""A retrieval task in one shape for every benchmark: items to encode, what to rank, what is relevant."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lame_pl.evaluation.metrics import mean_metrics, query_metrics, relevant_ranks
from lame_pl.evaluation.official import OfficialView
from lame_pl.evaluation.tables import EvalDataError, Row

# An image is a file path (absolute) or the encoded bytes a parquet table stores inline.
ImageRef = str | bytes


@dataclass(frozen=True)
class Item:
    """One thing to embed: an instruction, a text, zero or more images and an optional video.

    Attributes:
        instruction: Task instruction ("" for none).
        text: The item's text ("" for none).
        images: Images, each read as one image.
        video: A video's sampled frames, in order, read through the model's video input; empty
            for no video.
    """

    instruction: str
    text: str
    images: tuple[ImageRef, ...] = ()
    video: tuple[ImageRef, ...] = ()

    def key(self) -> str:
        """A digest of everything the embedding depends on; an image file counts by path, size and mtime."""
        images = [_image_fingerprint(image) for image in self.images]
        video = [_image_fingerprint(frame) for frame in self.video]
        payload = json.dumps([self.instruction, self.text, images, video], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _image_fingerprint(image: ImageRef) -> str:
    if isinstance(image, bytes):
        return "sha256:" + hashlib.sha256(image).hexdigest()
    stat = Path(image).stat()
    return f"{image}:{stat.st_size}:{stat.st_mtime_ns}"


def image_path(root: Path, relative: str, task: str, row: Row, field_name: str) -> str:
    """``root / relative`` as a string, or a clear error naming the task, row and path when it does not exist."""
    path = root / relative
    if not path.is_file():
        raise EvalDataError(f"task {task}: {row.where}: {field_name} {relative!r} does not exist (looked at {path})")
    return str(path)


@dataclass
class RetrievalTask:
    """Queries ranked against candidates, with graded relevance.

    Attributes:
        name: Task name as the benchmark spells it.
        modality: Summary block it belongs to (``image``, ``video``, ``visdoc``, ``mrmr``).
        group: Column inside the block (e.g. ``CLS``, ``ViDoRe-v1``).
        main_metric: The metric the benchmark reports (``hit@1``, ``ndcg@5``, ``ndcg@10``, ``recall@1``).
        queries: One item per query.
        candidates: Every distinct candidate of the task.
        relevance: Per query, ``{candidate index: grade > 0}``.
        ideal_grades: Per query, every positive grade the qrels give (including documents missing
            from the corpus), for recall and the ideal DCG.
        local: Per query, the candidate indices it is ranked against; ``None`` ranks every query
            against all candidates (global ranking).
        skipped_queries: Queries left out because no qrel gave them a positive grade.
        counted: Whether the task counts towards its benchmark's averages.
        official: The task as the benchmark's own scorer sees it (``official.OfficialView``);
            ``None`` scores it by the strict rules only.
    """

    name: str
    modality: str
    group: str
    main_metric: str
    queries: list[Item]
    candidates: list[Item]
    relevance: list[dict[int, float]]
    ideal_grades: list[list[float]]
    local: list[list[int]] | None = None
    skipped_queries: int = 0
    counted: bool = True
    official: OfficialView | None = None

    def __post_init__(self) -> None:
        n = len(self.queries)
        if len(self.relevance) != n or len(self.ideal_grades) != n or (self.local is not None and len(self.local) != n):
            raise ValueError(
                f"task {self.name}: queries, relevance, ideal_grades and local must have one entry per query"
            )
        if n == 0:
            raise EvalDataError(f"task {self.name}: no query to evaluate")
        if not self.candidates:
            raise EvalDataError(f"task {self.name}: no candidate to rank")


def score_task(
    task: RetrievalTask,
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 256,
) -> dict[str, float]:
    """Mean ranking metrics of a task from its embeddings (rows in the task's item order).

    Global tasks score ``chunk`` queries at a time, so memory stays ``chunk × candidates``.
    """
    per_query = []
    if task.local is not None:
        for q, indices in enumerate(task.local):
            position = {c: i for i, c in enumerate(indices)}
            scores = candidate_embeddings[indices] @ query_embeddings[q]
            per_query.append(_one(scores, task.relevance[q], task.ideal_grades[q], ks, position))
    else:
        for start in range(0, len(task.queries), chunk):
            block = query_embeddings[start : start + chunk] @ candidate_embeddings.T
            for offset, scores in enumerate(block):
                q = start + offset
                per_query.append(_one(scores, task.relevance[q], task.ideal_grades[q], ks, None))
    metrics = mean_metrics(per_query)
    metrics["num_queries"] = float(len(per_query))
    metrics["num_candidates"] = float(len(task.candidates))
    return metrics


def _one(
    scores: torch.Tensor,
    relevance: dict[int, float],
    ideal: list[float],
    ks: Sequence[int],
    position: dict[int, int] | None,
) -> dict[str, float]:
    items = sorted(relevance.items())
    if position is not None:
        items = [(position[c], g) for c, g in items if c in position]
    relevant = torch.tensor([c for c, _ in items], dtype=torch.long)
    grades = torch.tensor([g for _, g in items], dtype=torch.float64)
    ranks = relevant_ranks(scores.float(), relevant, grades)
    return query_metrics(ranks, grades, ideal, ks)
