"""Skipped input, counted by reason: one counter for the shard writers, one for the readers built on it.

Writers (``tools/make_shards.py``, the converters in ``lame_pl.data``) count what they leave out in
a ``Skips`` and print or store its ``report``. Readers (the WebDataset pipeline stages of
``lame_pl.datamodules``) count bad samples in a ``SkipCounter``: the same counts, plus ``strict``
(the first bad sample raises ``BadSampleError`` naming the shard, key and reason), a limit on skips
in a row (``NoGoodSamplesError``), and ``drain``, which is how counts leave a loader worker.
"""

from __future__ import annotations

import logging
from collections import Counter

SKIP_REASONS = (
    "corrupt_tar",
    "bad_image",
    "empty_caption",
    "missing_image",
    "image_too_large",
    "bad_json",
    "vision_token",
    "member_too_large",
    "tar_link",
    "empty_shard",
    "decoder_unseen_token",
)
# Skips in a row with no good sample before a pipeline gives up (data.max_consecutive_skips).
DEFAULT_MAX_CONSECUTIVE_SKIPS = 1000
SHARDS_NAMED = 5  # shards listed by name in an error; the rest are counted

log = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A bad sample met with ``strict`` on; the message names the shard, the key and the reason."""


class NoGoodSamplesError(RuntimeError):
    """Shards that yield no good sample: a run of skips too long, or a split with none at all."""


def name_shards(urls: list[str], total: int | None = None) -> str:
    """The first few of ``urls`` quoted, and how many more there are (of ``total``, default all)."""
    total = len(urls) if total is None else total
    named = ", ".join(repr(u) for u in urls[:SHARDS_NAMED])
    return named + (f" and {total - SHARDS_NAMED} more" if total > SHARDS_NAMED else "")


def describe_counts(counts: dict[str, int]) -> str:
    """``bad_image 3, empty_caption 1``, by reason."""
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "none"


class Skips:
    """Skipped input counted by reason, with the first few examples of each.

    Args:
        examples: How many examples (``where`` strings) to keep per reason.
    """

    def __init__(self, examples: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_examples = examples

    def add(self, reason: str, where: str) -> None:
        """Count one skipped sample; ``where`` says which (a path, file:line, or a row's key)."""
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(where)

    def report(self) -> str:
        """One line per reason, e.g. ``missing_caption: 3 (e.g. a/b.jpg, ...)``."""
        if not self.counts:
            return "skipped: 0"
        lines = [f"skipped: {sum(self.counts.values())}"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n} (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


class SkipCounter(Skips):
    """Counts skipped samples by reason, in the process that runs the pipeline (a reader's ``Skips``).

    All stages of one pipeline share one counter; the batching stage drains it into each batch,
    which is how counts leave a worker process.

    Args:
        strict: Raise ``BadSampleError`` at the first bad sample instead of counting it.
        max_consecutive: Raise ``NoGoodSamplesError`` at this many skips in a row with no good
            sample (``good``) between them; None never does.
        what: The config key of the shards (``data.train_shards``), named in that error.
    """

    def __init__(self, strict: bool = False, max_consecutive: int | None = None, what: str = "the shards") -> None:
        super().__init__()
        self.strict = strict
        self.max_consecutive = max_consecutive
        self.what = what
        self.total = 0  # skips ever counted here, never drained: tells whether a stage skipped
        self._warned: set[str] = set()
        self._run: Counter[str] = Counter()  # skips since the last good sample, by reason
        self._run_shards: dict[str, None] = {}  # their shards, in order met

    def good(self) -> None:
        """A good sample went through: a run of skips ends."""
        if self._run:
            self._run, self._run_shards = Counter(), {}

    def skip(self, reason: str, url: str, key: str | None, detail: str, dropped: bool = True) -> None:
        """Count one skipped sample (or raise, when strict).

        Args:
            reason: One of ``SKIP_REASONS``.
            url: The shard.
            key: The sample's key, if known.
            detail: What was wrong.
            dropped: Whether the whole sample was lost (False: only a part, such as its decoder
                label); only lost samples make up a run of skips.
        """
        where = f"shard {url!r}, sample {key!r}" if key is not None else f"shard {url!r}, sample of unknown key"
        message = f"{where}: {reason} ({detail})"
        if self.strict:
            raise BadSampleError(f"{message}; set data.strict false to skip and count such samples")
        self.add(reason, where)
        self.total += 1
        # One warning per reason and process names a shard to inspect; the rest are only counted.
        (log.debug if reason in self._warned else log.warning)("skipping %s", message)
        self._warned.add(reason)
        if not dropped:
            return
        self._run[reason] += 1
        self._run_shards.setdefault(url)
        run = sum(self._run.values())
        if self.max_consecutive is not None and run >= self.max_consecutive:
            # Without this a stream of only bad samples (resampled for ever) spins without a batch.
            shards = list(self._run_shards)
            raise NoGoodSamplesError(
                f"{self.what}: {run} samples in a row skipped with no good one ({describe_counts(self._run)}) "
                f"in shard(s) {name_shards(shards)}; fix or remove them, or raise data.max_consecutive_skips"
            )

    def drain(self) -> dict[str, int]:
        """The counts since the last drain, which start again from zero."""
        counts, self.counts = dict(self.counts), Counter()
        return counts
