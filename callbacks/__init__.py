"""Callbacks that a config can name as ``callbacks.<Name>``."""

from callbacks.data_health import DataHealth
from callbacks.embedding_writer import EmbeddingWriter
from callbacks.metrics_file import MetricsFile
from callbacks.stage_switch import StageSwitch

__all__ = ["DataHealth", "EmbeddingWriter", "MetricsFile", "StageSwitch"]
