"""Reading tar shards through damaged data, and batching decoded samples with their skip counts.

``TarSamples`` turns shard URLs into raw samples (``{"__key__", "__url__", ext: bytes}``) and
recovers from bad input: damaged tar data, a tar member over the size cap or stored as a link, a
shard that holds no sample. A format's decode stage (``lame_pl.data.image_text``,
``lame_pl.data.instruction_pairs``) then checks and decodes each sample; ``CountedBatches``
collates them and hands each batch its process's skip counts in ``batch["skipped"]``. Every stage
of one pipeline shares one ``lame_pl.data.skips.SkipCounter``: with ``strict`` the first bad sample
raises a ``BadSampleError`` naming the shard, key and reason; a run of ``max_consecutive`` skips
with no good sample between them raises ``NoGoodSamplesError`` naming the shards.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import webdataset as wds

from lame_pl.data.image_text import complete as image_text_complete
from lame_pl.data.shard_writer import TAR_BLOCK
from lame_pl.data.skips import BadSampleError, SkipCounter

# Tar members larger than this are passed over unread (data.max_member_bytes): a sample is small.
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
SKIPS_ONLY = "skips_only"  # marks an item of an evaluation stream that carries counts and no sample

log = logging.getLogger(__name__)


class _WatchedStream:
    """A read-only byte stream that remembers where its last non-zero byte was.

    tarfile passes silently over garbage after the last valid header, so the end of the real data
    is compared with the end of the last member to see damage there.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.position = 0
        self.data_end = 0
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        if not self.position:
            self.head = chunk[:8]
        kept = len(chunk.rstrip(b"\0"))
        if kept:
            self.data_end = self.position + kept
        self.position += len(chunk)
        return chunk

    @property
    def compressed(self) -> bool:
        return self.head.startswith(COMPRESSED_MAGIC)


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, the WebDataset way: the key ends at the basename's first dot."""
    while name.startswith("./"):  # ``tar -cf x.tar -C folder .`` prefixes every member
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarSamples(wds.PipelineStage):
    """Shard URLs to raw samples ``{"__key__", "__url__", ext: bytes}``, through damaged tar data.

    tarfile resynchronises at the next valid header after a damaged one (``ignore_zeros``), so
    the samples after a corrupt member still arrive. A jump in member offsets shows where data was
    passed over: a sample that spans it, or an incomplete neighbour of it, is marked
    ``__corrupt__``; when no neighbour explains a jump, one sample of unknown key is counted.
    Members of one sample must be adjacent in the tar, as WebDataset requires.

    A member larger than ``max_member_bytes`` is passed over unread and its sample skipped as
    ``member_too_large``; a hard or symbolic link member (GNU tar stores a repeated file as a hard
    link, which a stream cannot read back) skips its sample as ``tar_link``; a shard that yields
    no sample and no other skip counts once as ``empty_shard``.

    Args:
        skips: The pipeline's skip counter.
        complete: Whether a raw sample has every member its format needs (judges damage
            next to a gap); defaults to the image-caption format's.
        max_member_bytes: Largest member read into memory.
    """

    def __init__(
        self,
        skips: SkipCounter,
        complete: Callable[[dict[str, Any]], bool] = image_text_complete,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        self.skips = skips
        self.complete = complete
        self.max_member_bytes = max_member_bytes

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for shard in src:
            url, before, samples = shard["url"], self.skips.total, 0
            for sample in self._shard(url):
                samples += 1
                yield sample
            if not samples and self.skips.total == before:
                # Counted, so that endless draws of empty shards end at max_consecutive_skips.
                self.skips.skip("empty_shard", url, None, "the shard holds no sample")

    def _unexplained(self, url: str, after: str | None, detail: str) -> None:
        where = "at the start of the shard" if after is None else f"after sample {after!r}"
        self.skips.skip("corrupt_tar", url, None, f"{detail}, {where}")

    def _close(self, sample: dict[str, Any], url: str) -> dict[str, Any]:
        gap = sample.pop("__gap__", None)
        if gap is not None and "__corrupt__" not in sample:
            if not self.complete(sample):
                sample["__corrupt__"] = "incomplete next to damaged tar data"
            elif not gap["explained"]:
                self._unexplained(url, gap["after"], "tar data passed over")
        return sample

    def _shard(self, url: str) -> Iterator[dict[str, Any]]:
        try:
            stream = _WatchedStream(wds.gopen(url))
        except Exception as exn:  # whatever the opener (a file, a pipe:, a URL) fails with
            self.skips.skip("corrupt_tar", url, None, f"cannot open the shard: {exn}")
            return
        sample: dict[str, Any] | None = None
        read_cleanly = False  # a close error then still means a damaged shard (a pipe: that failed late)
        try:
            expected, jump, reading, seen = 0, False, None, set()
            try:
                with tarfile.open(fileobj=stream, mode="r|*", ignore_zeros=True) as tar:
                    for info in tar:
                        jump = jump or info.offset != expected
                        expected = info.offset_data + -(-info.size // TAR_BLOCK) * TAR_BLOCK
                        linked = info.islnk() or info.issym()
                        parsed = _split_name(info.name) if info.isreg() or linked else None
                        if parsed is None:
                            continue
                        key, ext = parsed
                        gap = None
                        if jump:
                            jump = False
                            if sample is not None and sample["__key__"] == key:
                                sample["__corrupt__"] = "tar data passed over inside the sample"
                            else:
                                explained = sample is not None and not self.complete(sample)
                                if explained:
                                    sample["__corrupt__"] = "incomplete next to damaged tar data"
                                gap = {"explained": explained, "after": None if sample is None else sample["__key__"]}
                        if sample is not None and sample["__key__"] != key:
                            yield self._close(sample, url)
                            sample = None
                        if sample is None:
                            if key in seen:
                                log.warning(
                                    "%s: the members of sample %r are not adjacent; write tars with `tar --sort=name`",
                                    url,
                                    key,
                                )
                            seen.add(key)
                            sample = {"__key__": key, "__url__": url}
                            if gap is not None:
                                sample["__gap__"] = gap
                        if ext in sample:
                            sample["__corrupt__"] = f"member {info.name!r} appears twice"
                            continue
                        if linked:
                            kind = "hard" if info.islnk() else "symbolic"
                            sample.setdefault(
                                "__skip__",
                                (
                                    "tar_link",
                                    f"member {info.name!r} is a {kind} link to {info.linkname!r}; "
                                    "write shards with `tar --hard-dereference` (or tools/make_shards.py)",
                                ),
                            )
                            continue
                        if info.size > self.max_member_bytes:
                            # Passed over unread: the stream reads past it in blocks, never whole.
                            sample.setdefault(
                                "__skip__",
                                (
                                    "member_too_large",
                                    f"member {info.name!r} has {info.size} bytes > data.max_member_bytes {self.max_member_bytes}",
                                ),
                            )
                            continue
                        reading = key
                        sample[ext] = tar.extractfile(info).read()
                        reading = None
                if not stream.compressed and stream.data_end > expected:
                    raise tarfile.ReadError(
                        "no valid tar header" if not expected else f"damaged data after byte {expected}"
                    )
                read_cleanly = True
            except BadSampleError:
                raise
            except Exception as exn:  # tarfile, zlib and the opener raise many types on damaged data
                read_cleanly = False
                if sample is not None and (reading == sample["__key__"] or not self.complete(sample)):
                    sample["__corrupt__"] = f"unreadable tar data: {exn}"
                else:
                    self._unexplained(
                        url, None if sample is None else sample["__key__"], f"unreadable tar data ({exn})"
                    )
            if sample is not None:
                yield self._close(sample, url)
        finally:
            try:
                stream.raw.close()
            except Exception as exn:  # a pipe: whose command failed reports it here
                if read_cleanly:
                    self.skips.skip("corrupt_tar", url, None, f"closing the shard failed: {exn}")


class CountedBatches(wds.PipelineStage):
    """Collated batches that carry ``skipped``: what this process skipped since its previous batch.

    Samples drawn from a mixture also give their set's name, as ``batch["sources"]``. A collator
    that dropped a row's decoder label (a token outside the decoder's vocabulary) lists it in
    ``batch["decoder_unseen"]`` as ``(row, detail)``; it is counted here as ``decoder_unseen_token``
    (or raised, when strict) with the row's shard and key.

    A batch goes out only when the next good sample arrives or the stream ends, so the last batch
    of a finite stream also carries the skips behind its last sample. With ``partial`` (a finite
    evaluation stream), skips that no batch is left to carry go out as ``{"skipped": counts,
    SKIPS_ONLY: True}``, which the evaluation loader folds into a batch (``epoch_state.EvalLoader``).
    """

    def __init__(self, skips: SkipCounter, batch_size: int, collate: Callable[[list], dict], partial: bool) -> None:
        self.skips = skips
        self.batch_size = batch_size
        self.collate = collate
        self.partial = partial

    def _emit(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(samples)
        for row, detail in batch.pop("decoder_unseen", ()):
            sample = samples[row]
            self.skips.skip(
                "decoder_unseen_token", sample.get("__url__", "?"), sample.get("key"), detail, dropped=False
            )
        batch["skipped"] = self.skips.drain()
        if "source" in samples[0]:  # the mixture set of each sample (lame_pl.datamodules.mixture)
            batch["sources"] = [s["source"] for s in samples]
        return batch

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        samples: list[dict[str, Any]] = []
        for sample in src:
            if len(samples) == self.batch_size:
                yield self._emit(samples)
                samples = []
            samples.append(sample)
        if samples and (self.partial or len(samples) == self.batch_size):
            yield self._emit(samples)
        elif self.skips.counts and self.partial:
            yield {"skipped": self.skips.drain(), SKIPS_ONLY: True}
        elif self.skips.counts:
            # No batch is left to carry them: they ride on this process's next batch, if it has one.
            log.warning("skipped %s at the end of a stream with no batch left to report them", dict(self.skips.counts))
