"""Callbacks that a config can name as ``callbacks.<Name>``."""

from callbacks.metrics_file import MetricsFile
from callbacks.stage_switch import StageSwitch

__all__ = ["MetricsFile", "StageSwitch"]
