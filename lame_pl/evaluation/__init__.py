"""Benchmark evaluation: MMEB-v2 and MRMR readers, ranking metrics, cached encoding, reports."""

from lame_pl.evaluation.metrics import query_metrics, relevant_ranks
from lame_pl.evaluation.tables import EvalDataError
from lame_pl.evaluation.task import Item, RetrievalTask, score_task

__all__ = ["EvalDataError", "Item", "RetrievalTask", "query_metrics", "relevant_ranks", "score_task"]
