"""Callbacks that a config can name as ``callbacks.<Name>``."""

from callbacks.checkpointing import AtomicCheckpoint
from callbacks.console import ParameterSummary, SamplesPerSecond, StepProgressBar
from callbacks.dashboard_layout import DashboardLayout
from callbacks.data_health import DataHealth
from callbacks.embedding_health import EmbeddingHealth
from callbacks.embedding_projector import EmbeddingProjector
from callbacks.embedding_writer import EmbeddingWriter
from callbacks.metrics_file import MetricsFile
from callbacks.reason_diagnostics import ReasonDiagnostics
from callbacks.similarity_heatmap import SimilarityHeatmap
from callbacks.stage_switch import StageSwitch

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
