"""WebDataset pipeline stages that read tar shards, decode and check samples, and batch them.

Bad input (damaged tar data, an image that will not decode or is absurdly large, a missing image,
an empty caption, an instruction pair's JSON that does not parse or lacks a field, a tar member
over the size cap or stored as a link, a shard that holds no sample) is skipped and counted by
reason in a ``SkipCounter`` shared by the stages of one pipeline; the batching stage hands each
batch its worker's counts in ``batch["skipped"]``. With ``strict`` the first bad sample raises a
``BadSampleError`` naming the shard, key and reason. A run of ``max_consecutive`` skips with no good
sample between them raises ``NoGoodSamplesError`` naming the shards, rather than spinning forever.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch.utils.data
import webdataset as wds
from PIL import Image

from lame_pl.data.instruction_pairs import parse_pair_json
from lame_pl.data.shard_writer import IMAGE_EXTENSIONS, TAR_BLOCK
from lame_pl.data.text import caption_text
from lame_pl.media import IMAGE_FORMATS
from lame_pl.prompt import VISION_TOKENS

SKIP_REASONS = ("corrupt_tar", "bad_image", "empty_caption", "missing_image", "image_too_large", "bad_json",
                "vision_token", "member_too_large", "tar_link", "empty_shard", "decoder_unseen_token")
# Tar members larger than this are passed over unread (data.max_member_bytes): a sample is small.
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
# Skips in a row with no good sample before a pipeline gives up (data.max_consecutive_skips).
DEFAULT_MAX_CONSECUTIVE_SKIPS = 1000
SHARDS_NAMED = 5  # shards listed by name in an error; the rest are counted
# Qwen-VL's resizing refuses images longer than this ratio; one such image would fail its batch.
MAX_ASPECT_RATIO = 200
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")

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


class SkipCounter:
    """Counts skipped samples by reason, in the process that runs the pipeline.

    All stages of one pipeline share one counter; the batching stage drains it into each batch,
    which is how counts leave a worker process.

    Args:
        strict: Raise ``BadSampleError`` at the first bad sample instead of counting it.
        max_consecutive: Raise ``NoGoodSamplesError`` at this many skips in a row with no good
            sample (``good``) between them; None never does.
        what: The config key of the shards (``data.train_shards``), named in that error.
    """

    def __init__(self, strict: bool = False, max_consecutive: int | None = None, what: str = "the shards") -> None:
        self.strict = strict
        self.max_consecutive = max_consecutive
        self.what = what
        self.counts: Counter[str] = Counter()
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
        self.counts[reason] += 1
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


def _complete(sample: dict[str, Any]) -> bool:
    return "txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


def open_image(data: bytes, ext: str, max_pixels: int) -> tuple[Image.Image | None, str, str]:
    """(image, "", "") for usable image bytes, else (None, skip reason, detail).

    The header is read before any pixel is decoded, so an absurdly large image costs nothing
    but its bytes. Only ``lame_pl.media.IMAGE_FORMATS`` are tried: PIL's other plugins (EPS runs
    Ghostscript) never see shard bytes.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
    except Image.DecompressionBombError as exn:
        return None, "image_too_large", str(exn)
    except Exception as exn:  # PIL's format plugins raise many types on malformed headers
        return None, "bad_image", f"{ext}: {exn}"
    if width * height > max_pixels:
        return None, "image_too_large", f"{width}x{height} pixels > data.max_image_pixels {max_pixels}"
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return None, "bad_image", f"{width}x{height}: aspect ratio beyond {MAX_ASPECT_RATIO}"
    try:
        image.load()
    except Exception as exn:  # truncated or corrupt pixel data, in whatever form the plugin reports it
        return None, "bad_image", f"{ext}: {exn}"
    return image, "", ""


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

    def __init__(self, skips: SkipCounter, complete: Callable[[dict[str, Any]], bool] = _complete,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
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
                                log.warning("%s: the members of sample %r are not adjacent; write tars with "
                                            "`tar --sort=name`", url, key)
                            seen.add(key)
                            sample = {"__key__": key, "__url__": url}
                            if gap is not None:
                                sample["__gap__"] = gap
                        if ext in sample:
                            sample["__corrupt__"] = f"member {info.name!r} appears twice"
                            continue
                        if linked:
                            kind = "hard" if info.islnk() else "symbolic"
                            sample.setdefault("__skip__", (
                                "tar_link", f"member {info.name!r} is a {kind} link to {info.linkname!r}; "
                                "write shards with `tar --hard-dereference` (or tools/make_shards.py)"))
                            continue
                        if info.size > self.max_member_bytes:
                            # Passed over unread: the stream reads past it in blocks, never whole.
                            sample.setdefault("__skip__", (
                                "member_too_large",
                                f"member {info.name!r} has {info.size} bytes > data.max_member_bytes {self.max_member_bytes}"))
                            continue
                        reading = key
                        sample[ext] = tar.extractfile(info).read()
                        reading = None
                if not stream.compressed and stream.data_end > expected:
                    raise tarfile.ReadError("no valid tar header" if not expected else f"damaged data after byte {expected}")
                read_cleanly = True
            except BadSampleError:
                raise
            except Exception as exn:  # tarfile, zlib and the opener raise many types on damaged data
                read_cleanly = False
                if sample is not None and (reading == sample["__key__"] or not self.complete(sample)):
                    sample["__corrupt__"] = f"unreadable tar data: {exn}"
                else:
                    self._unexplained(url, None if sample is None else sample["__key__"], f"unreadable tar data ({exn})")
            if sample is not None:
                yield self._close(sample, url)
        finally:
            try:
                stream.raw.close()
            except Exception as exn:  # a pipe: whose command failed reports it here
                if read_cleanly:
                    self.skips.skip("corrupt_tar", url, None, f"closing the shard failed: {exn}")


class DecodeStage(wds.PipelineStage):
    """Raw samples to decoded ones; a subclass's ``_decode`` returns None for a sample it skipped.

    Args:
        skips: The pipeline's skip counter.
        max_image_pixels: Images with more pixels are skipped as ``image_too_large``.
    """

    # Whether a raw sample holds all its members; TarSamples asks next to damaged tar data.
    complete = staticmethod(_complete)

    def __init__(self, skips: SkipCounter, max_image_pixels: int) -> None:
        self.skips = skips
        self.max_image_pixels = max_image_pixels

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for sample in src:
            if "__corrupt__" in sample:  # marked by TarSamples next to damaged tar data
                self._skip(sample, "corrupt_tar", sample["__corrupt__"])
                continue
            if "__skip__" in sample:  # a member TarSamples would not read (too large, a link)
                self._skip(sample, *sample["__skip__"])
                continue
            decoded = self._decode(sample)
            if decoded is not None:
                self.skips.good()
                # Where the sample came from, so that a later stage can name it in a skip.
                decoded.setdefault("__url__", sample["__url__"])
                yield decoded

    def _skip(self, sample: dict[str, Any], reason: str, detail: str) -> None:
        self.skips.skip(reason, sample["__url__"], sample["__key__"], detail)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError


class DecodePairs(DecodeStage):
    """Raw samples to ``{"key", "image", "text"}`` pairs; bad ones are counted and dropped.

    The image header is read before any pixel is decoded, so an absurdly large image costs
    nothing but its bytes.
    """

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample["__key__"]
        skip = partial(self._skip, sample)
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            return skip("missing_image", f"no {'/'.join(IMAGE_EXTENSIONS)} member; it has {members}")
        # The one caption normalisation, shared with tools/decoder_vocab.py.
        text = caption_text(sample.get("txt", b""))
        if not text:
            return skip("empty_caption", "no txt member" if "txt" not in sample else "the txt member is blank")
        token = next((t for t in VISION_TOKENS if t in text), None)
        if token is not None:  # the processor would expect an image the caption does not carry
            return skip("vision_token", f"the caption holds the special token {token}")
        image, reason, detail = open_image(sample[ext], ext, self.max_image_pixels)
        if image is None:
            return skip(reason, detail)
        return {"key": key, "image": image, "text": text}


def _pair_complete(sample: dict[str, Any]) -> bool:
    # Only the JSON knows which image members belong; without it nothing of the sample is usable.
    return "json" in sample


class DecodeInstructionPairs(DecodeStage):
    """Raw instruction pairs (``KEY.json`` + media members) to decoded samples; bad ones are counted and dropped.

    Samples come out as ``{"key", "query": side, "target": side, "negatives": [side, ...]}``,
    each side ``{"instruction": str, "text": str, "images": [PIL image, ...], "video": [PIL image,
    ...] | None}`` (``images`` holds the side's image, if any; ``video`` its frames, in order). The
    JSON is read by ``lame_pl.data.instruction_pairs.parse_pair_json``: one that does not parse or
    lacks a field is ``bad_json``; a text or instruction holding a vision special token is
    ``vision_token``; an
    image or frame member the JSON names but the sample lacks is ``missing_image``; images and
    frames get the checks of ``DecodePairs``, and a video whose frames differ in size is ``bad_image``.
    """

    complete = staticmethod(_pair_complete)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample["__key__"]
        skip = partial(self._skip, sample)
        if "json" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            return skip("bad_json", f"no json member; it has {members}")
        try:
            pair = parse_pair_json(sample["json"])
        except ValueError as exn:
            return skip("bad_json", str(exn))
        decoded = {}
        for name, side in (("query", pair["query"]), ("target", pair["target"]),
                           *((f"negatives[{i}]", n) for i, n in enumerate(pair["negatives"]))):
            # A vision token in a text would make the processor expect media the side lacks and
            # fail the whole batch; the record is bad, not the run.
            token = next((t for t in VISION_TOKENS for part in ("instruction", "text") if t in side[part]), None)
            if token is not None:
                return skip("vision_token", f"{name}: its instruction or text holds the special token {token}")
            images = self._open_members(sample, name, [] if side["image"] is None else [side["image"]])
            if images is None:
                return None
            video = None
            if side["video"] is not None:
                video = self._open_members(sample, name, side["video"])
                if video is None:
                    return None
                sizes = sorted({frame.size for frame in video})
                if len(sizes) > 1:  # the video processor stacks frames: they must share one size
                    return skip("bad_image", f"{name}: the video's frames differ in size {sizes}")
            decoded[name] = {"instruction": side["instruction"], "text": side["text"], "images": images, "video": video}
        query, target = decoded.pop("query"), decoded.pop("target")
        return {"key": key, "query": query, "target": target, "negatives": list(decoded.values())}

    def _open_members(self, sample: dict[str, Any], side: str, members: list[str]) -> list[Image.Image] | None:
        """The decoded images of ``members``, or None (skip counted) at the first one missing or bad."""
        images = []
        for member in members:
            # Member extensions are read lower-cased (``_split_name``), as the writer writes them.
            data = sample.get(member.lower())
            if data is None:
                present = sorted(k for k in sample if not k.startswith("__"))
                self._skip(sample, "missing_image", f"{side}: the json names member {member!r}; the sample has {present}")
                return None
            image, reason, detail = open_image(data, member, self.max_image_pixels)
            if image is None:
                self._skip(sample, reason, f"{side} {member}: {detail}")
                return None
            images.append(image)
        return images


SKIPS_ONLY = "skips_only"  # marks an item of an evaluation stream that carries counts and no sample


class CountedBatches(wds.PipelineStage):
    """Collated batches that carry ``skipped``: what this process skipped since its previous batch.

    Samples drawn from a mixture also give their set's name, as ``batch["sources"]``. A collator
    that dropped a row's decoder label (a token outside the decoder's vocabulary) lists it in
    ``batch["decoder_unseen"]`` as ``(row, detail)``; it is counted here as ``decoder_unseen_token``
    (or raised, when strict) with the row's shard and key.

    A batch goes out only when the next good sample arrives or the stream ends, so the last batch
    of a finite stream also carries the skips behind its last sample. With ``partial`` (a finite
    evaluation stream), skips that no batch is left to carry go out as ``{"skipped": counts,
    SKIPS_ONLY: True}``, which the evaluation loader folds into a batch (``image_text._EvalLoader``).
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
            self.skips.skip("decoder_unseen_token", sample.get("__url__", "?"), sample.get("key"), detail, dropped=False)
        batch["skipped"] = self.skips.drain()
        if "source" in samples[0]:  # the mixture set of each sample (datamodules.mixture)
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
            log.warning("skipped %s at the end of a stream with no batch left to report them",
                        dict(self.skips.counts))


class EpochState:
    """The training epoch and resume offset, shared with loader worker processes.

    Workers are persistent, so they keep the pipeline they were started with; the main process
    writes here before each epoch's iteration and the workers read it when their epoch starts.
    Create it before the workers start (``fork`` inherits it; ``spawn`` pickles it with the dataset).
    """

    def __init__(self) -> None:
        # [epoch, batches this rank had consumed in that epoch before a resume, times set]
        self._values = multiprocessing.RawArray("q", 3)

    @property
    def epoch(self) -> int:
        return int(self._values[0])

    @property
    def resumed_batches(self) -> int:
        return int(self._values[1])

    @property
    def generation(self) -> int:
        """How often ``set`` was called: tells a new loader epoch from another pass inside one."""
        return int(self._values[2])

    def set(self, epoch: int, resumed_batches: int = 0) -> None:
        """Set what the workers read when their next epoch starts."""
        self._values[0], self._values[1] = epoch, resumed_batches
        self._values[2] += 1

    def worker_role(self) -> tuple[int, int]:
        """(the worker this process stands in for, number of workers).

        The loader takes batches from its workers in turn, starting again at worker 0 on every
        epoch; after a resume mid-epoch the workers swap roles so that the worker the loader asks
        first carries on the stream the old run would have asked next, and the order holds.
        """
        worker, num_workers = _worker()
        return (worker + self.resumed_batches) % num_workers, num_workers

    def first_pass(self, holder: Any) -> bool:
        """Whether ``holder`` (a stage in a worker) starts its first pass of this loader epoch.

        A finite stream cut by ``with_epoch`` is run again when it ends early; a stage sees that
        as another call in the same generation.
        """
        first = getattr(holder, "_generation", None) != self.generation
        holder._generation = self.generation
        return first


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class EpochShards(torch.utils.data.IterableDataset):
    """Training shard URLs for this rank and worker, seeded by (seed, epoch, rank, worker).

    Resampled: an endless draw with replacement; after a resume the draw is also seeded by the
    batches consumed before it, so the resumed epoch does not repeat its start. Not resampled:
    every shard once per epoch over all ranks and workers (one shuffle per epoch, the same on
    every rank, then split by rank and by worker), one pass per call; ``with_epoch`` calls again
    when a worker's shards run dry before its share of batches (bad samples), and that pass
    reads them in a new order, so every rank still does the same number of steps.

    Args:
        urls: The training shards.
        seed: Base seed.
        state: Epoch and resume offset, written by the main process.
        rank: This process's rank, known in the main process (workers may lack the process group).
        world_size: Number of ranks.
        resampled: Draw with replacement rather than reading each shard once per epoch.
    """

    def __init__(self, urls: list[str], seed: int, state: EpochState, rank: int, world_size: int,
                 resampled: bool) -> None:
        super().__init__()
        self.urls = list(urls)
        self.seed = seed
        self.state = state
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled

    def __iter__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = self.state.worker_role()
        epoch = self.state.epoch
        if self.resampled:
            rng = random.Random(f"{self.seed}-{epoch}-{self.state.resumed_batches}-{self.rank}-{worker}")
            while True:
                yield {"url": rng.choice(self.urls)}
        self.lap = 0 if self.state.first_pass(self) else self.lap + 1
        order = list(self.urls)
        # The same shuffle on every rank and worker, so that the split below is a partition.
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        mine = order[self.rank :: self.world_size][worker::num_workers]
        if self.lap:
            random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}-{self.lap}").shuffle(mine)
        yield from ({"url": url} for url in mine)


class SkipConsumed(wds.PipelineStage):
    """Drops the raw samples this worker had already delivered in the epoch a run resumed in.

    The loader takes batches from its workers in turn, so the worker in role ``w`` of ``n``
    (``EpochState.worker_role``) had delivered ``consumed // n`` batches, one more if
    ``w < consumed % n``. Placed after the shuffle and
    before decoding, it skips ``batch_size`` raw samples per batch; samples skipped as bad before
    the resume are not counted, so as many good samples as were skipped may be seen again.

    Args:
        state: Epoch and resume offset, written by the main process.
        batch_size: Samples per batch.
    """

    def __init__(self, state: EpochState, batch_size: int) -> None:
        self.state = state
        self.batch_size = batch_size

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker, num_workers = self.state.worker_role()
        consumed = self.state.resumed_batches if self.state.first_pass(self) else 0
        skip = (consumed // num_workers + (worker < consumed % num_workers)) * self.batch_size
        for sample in src:
            if skip:
                skip -= 1
                continue
            yield sample


class WorkerShuffle(wds.PipelineStage):
    """Buffer shuffle seeded by (seed, epoch, rank, worker): reproducible, yet different per worker and epoch.

    Args:
        bufsize: Samples held in the buffer.
        seed: Base seed.
        state: Where the epoch and the worker's role come from.
        rank: This process's rank.
    """

    def __init__(self, bufsize: int, seed: int | str, state: EpochState, rank: int) -> None:
        self.bufsize = bufsize
        self.seed = seed
        self.state = state
        self.rank = rank

    def run(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker = self.state.worker_role()[0]
        rng = random.Random(f"{self.seed}-{self.rank}-{worker}-{self.state.epoch}")
        return wds.filters.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)
