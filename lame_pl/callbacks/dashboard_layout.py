"""A TensorBoard custom-scalars layout, so that the dashboard opens with related curves side by side."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer

from lame_pl.callbacks.tensorboard_writer import summary_writer

# Category -> chart -> ["Multiline", tag regexes]. Curves of one scale share a chart. Every chart
# matches a tag that the demo run (both stages, then its test) logs (tests/test_tensorboard_acceptance.py),
# so that none opens empty; a chart for tags that only some runs log is added by ``layout_for``
# to those runs alone.
LAYOUT: dict[str, dict[str, list]] = {
    "1 training": {
        "losses": ["Multiline", [r"^train/loss"]],
        "temperature": ["Multiline", [r"^train/temperature$", r"^diag/temperature$"]],
        "learning rate": ["Multiline", [r"^lr-"]],
        "samples per second": ["Multiline", [r"^throughput/"]],
        "stage": ["Multiline", [r"^train/stage$"]],
        "skipped steps (non-finite, zero gradient)": ["Multiline", [r"^train/(nonfinite|zero_gradient)_steps$"]],
    },
    "2 retrieval": {
        "validation": ["Multiline", [r"^val/(recall|mrr|ndcg)"]],
        "validation losses": ["Multiline", [r"^val/loss"]],
        "test and chance": ["Multiline", [r"^test/(recall|mrr|ndcg)", r"^chance/"]],
        "test losses": ["Multiline", [r"^test/loss"]],
    },
    "3 embedding space": {
        "alignment and uniformity": ["Multiline", [r"^diag/(alignment|uniformity)"]],
        "positive vs hardest negative cosine": ["Multiline", [r"^diag/cosine/"]],
        "collapse alarm: std x sqrt(d) (about 1 is healthy)": ["Multiline", [r"^diag/std_ratio/"]],
        "effective rank": ["Multiline", [r"^diag/effective_rank/"]],
        "norm before normalisation": ["Multiline", [r"^diag/norm/"]],
    },
    "4 reason tokens": {
        "norms": ["Multiline", [r"^diag/reason/norm/"]],
        "pairwise cosine (1 = collapsed)": ["Multiline", [r"^diag/reason/pairwise_cosine$"]],
        "[EMBED] attention shares": ["Multiline", [r"^diag/attention/"]],
        "decoder loss per stage": ["Multiline", [r"^diag/decoder_loss/", r"^(train|val)/loss/decoder$"]],
        "latent text: word overlap vs chance, information (nats)": ["Multiline", [r"^diag/latent_text/"]],
    },
    "5 data": {
        # DataHealth: training's cumulative count per reason and in all (0 on clean data), and
        # each validation's and test's count per reason.
        "skipped samples": ["Multiline", [r"^(val/|test/)?data/skipped/"]],
        "rows with a decoder label": ["Multiline", [r"^train/decoder/labelled_fraction$"]],
    },
}
# Logged only when training draws from a mixture of sets (data.train_mixture).
MIXTURE_CHART = ("5 data", "mixture shares", ["Multiline", [r"^data/mixture/"]])


def layout_for(trainer: Trainer) -> dict[str, dict[str, list]]:
    """``LAYOUT``, with the mixture chart when the trainer's data module trains on a mixture."""
    layout = {category: dict(charts) for category, charts in LAYOUT.items()}
    if getattr(getattr(trainer, "datamodule", None), "mixture", None):
        category, title, chart = MIXTURE_CHART
        layout[category][title] = chart
    return layout


class DashboardLayout(Callback):
    """Writes ``layout_for(trainer)`` (TensorBoard's custom-scalars plugin) once per run, on rank 0."""

    def __init__(self) -> None:
        self.written = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.written:
            return
        writer = summary_writer(trainer, type(self).__name__)
        if writer is not None:
            writer.add_custom_scalars(layout_for(trainer))
            self.written = True
