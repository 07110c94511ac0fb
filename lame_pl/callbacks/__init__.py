"""Callbacks that a config can name as ``callbacks.<Name>`` (the short alias) or ``lame_pl.callbacks.<Name>``."""

from lame_pl.callbacks.checkpointing import AtomicCheckpoint
from lame_pl.callbacks.console import ParameterSummary, SamplesPerSecond, StepProgressBar
from lame_pl.callbacks.dashboard_layout import DashboardLayout
from lame_pl.callbacks.data_health import DataHealth
from lame_pl.callbacks.embedding_health import EmbeddingHealth
from lame_pl.callbacks.embedding_projector import EmbeddingProjector
from lame_pl.callbacks.embedding_writer import EmbeddingWriter
from lame_pl.callbacks.metrics_file import MetricsFile
from lame_pl.callbacks.reason_diagnostics import ReasonDiagnostics
from lame_pl.callbacks.similarity_heatmap import SimilarityHeatmap
from lame_pl.callbacks.stage_switch import StageSwitch

__all__ = [
    "AtomicCheckpoint",
    "DashboardLayout",
    "DataHealth",
    "EmbeddingHealth",
    "EmbeddingProjector",
    "EmbeddingWriter",
    "MetricsFile",
    "ParameterSummary",
    "ReasonDiagnostics",
    "SamplesPerSecond",
    "SimilarityHeatmap",
    "StageSwitch",
    "StepProgressBar",
]
