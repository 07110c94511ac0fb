"""VLM2Vec-V2's training mixture: every subset, where it comes from, its weight and its row cap.

Transcribed from VLM2Vec's ``experiments/public/train/train_alltasks.yaml`` (the data config of
its Qwen2-VL-2B run, ``train_v2-qwen2vl-2B.sh``). The peer draws each subset with probability
``weight / sum(weights)``, whole (interleaved) batches from one subset at a time; our
``data.train_mixture`` does the same with ``homogeneous: true``.

Row caps are the peer's ``num_sample_per_subset`` (the first N rows of an MMEB-train subset) and,
for the LLaVA-Hound video sets, its ``num_rows`` (300k captions; the first 240k rows of
``video_240k_caption_15k.jsonl``, which is what its download script keeps as
``video_qa_240k.jsonl``). The two visual-document sets have no cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from lame_pl.media import DEFAULT_NUM_FRAMES

# Source kinds, one reader each (lame_pl.data.vlm2vec_sources).
MMEB = "mmeb"  # an MMEB-train subset: qry / pos_text / neg_text with image paths
VIDORE = "vidore"  # vidore/colpali_train_set: page image + query -> answer
VISRAG = "visrag"  # openbmb/VisRAG-Ret-Train-In-domain-data: query -> page image
VIDEO_CAPTION = "video_caption"  # LLaVA-Hound, caption_retrieval: video (+ request) -> caption
VIDEO_RETRIEVAL = "video_retrieval"  # LLaVA-Hound, video_retrieval: caption -> video
VIDEO_QA = "video_qa"  # LLaVA-Hound QA: video + question -> answer
VIDEO_KINDS = (VIDEO_CAPTION, VIDEO_RETRIEVAL, VIDEO_QA)

_CAPTIONS = ("video_caption_300k.jsonl",)
# The download script's ``head -n 240000`` copy first, else the file the peer's config names (capped to the same rows).
_QA = ("video_qa_240k.jsonl", "video_240k_caption_15k.jsonl")


@dataclass(frozen=True)
class Subset:
    """One subset of the mixture.

    Attributes:
        name: The peer's name for it; also the output folder and the mixture set's name.
        kind: Which reader converts it (one of the kinds above).
        weight: The peer's sampling weight.
        row_cap: The peer's cap on source rows (the first N), or None for every row.
        num_frames: Frames sampled per video (video kinds only).
        annotations: Video kinds: file names to look for under ``--video-annotations``, first match wins.
    """

    name: str
    kind: str
    weight: float
    row_cap: int | None
    num_frames: int | None = None
    annotations: tuple[str, ...] = ()


def _mmeb(name: str, cap: int, weight: float) -> Subset:
    return Subset(name, MMEB, weight, cap)


SUBSETS: tuple[Subset, ...] = (
    _mmeb("ImageNet_1K", 100_000, 1),
    _mmeb("N24News", 50_000, 1),
    _mmeb("HatefulMemes", 10_000, 0.5),
    _mmeb("VOC2007", 10_000, 0.5),
    _mmeb("SUN397", 20_000, 0.5),
    _mmeb("OK-VQA", 10_000, 0.5),
    _mmeb("A-OKVQA", 20_000, 0.5),
    _mmeb("DocVQA", 40_000, 1),
    _mmeb("InfographicsVQA", 25_000, 0.5),
    _mmeb("ChartQA", 28_000, 0.5),
    _mmeb("Visual7W", 70_000, 1),
    _mmeb("VisDial", 130_000, 1),
    _mmeb("CIRR", 30_000, 0.5),
    _mmeb("VisualNews_t2i", 100_000, 1),
    _mmeb("VisualNews_i2t", 100_000, 1),
    _mmeb("MSCOCO_t2i", 100_000, 1),
    _mmeb("MSCOCO_i2t", 120_000, 1),
    _mmeb("NIGHTS", 20_000, 0.5),
    _mmeb("WebQA", 20_000, 0.5),
    _mmeb("MSCOCO", 100_000, 1),
    Subset("colpali_train_set", VIDORE, 10, None),
    Subset("visrag-indomain", VISRAG, 12, None),
    Subset("video_caption_300k", VIDEO_CAPTION, 5, 300_000, DEFAULT_NUM_FRAMES, _CAPTIONS),
    Subset("video_caption_300k-video", VIDEO_RETRIEVAL, 5, 300_000, DEFAULT_NUM_FRAMES, _CAPTIONS),
    Subset("video_qa_240k", VIDEO_QA, 5, 240_000, DEFAULT_NUM_FRAMES, _QA),
)

SUBSET_BY_NAME: dict[str, Subset] = {subset.name: subset for subset in SUBSETS}
