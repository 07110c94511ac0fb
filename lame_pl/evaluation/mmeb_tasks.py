"""The MMEB-v2 task list: modality, leaderboard group, ranking scope and candidate naming of each task.

Sources (TIGER-AI-Lab/VLM2Vec): the task lists and main metrics of ``experiments/report_score_v2.py``
(image hit@1, video hit@1, visdoc ndcg_linear@5), the ``eval_type`` (local/global) and parser of
each task in ``experiments/public/eval/{image,video,visdoc}.yaml``, and the candidate names of the
image parsers (``src/data/eval_dataset/image_*``). Groups and their order follow the MMEB-v2
leaderboard columns: image CLS, QA, RET, VG; video CLS, QA, RET, MRET; visdoc ViDoRe-v1,
ViDoRe-v2, VisRAG, OOD. 36 + 18 + 24 = 78 tasks count towards the overall score; the three
multilingual ViDoRe-v2 variants that ``report_score_v2.py`` also lists are kept as known tasks
outside the 24 (that they are outside is our reading of the published count, not confirmed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MODALITY_ORDER = ("image", "video", "visdoc")
MAIN_METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg@5"}
GROUP_ORDER = {
    "image": ("CLS", "QA", "RET", "VG"),
    "video": ("CLS", "QA", "RET", "MRET"),
    "visdoc": ("ViDoRe-v1", "ViDoRe-v2", "VisRAG", "OOD"),
}

# How a candidate is named, which decides which candidates are the same one (dedup) and which
# is the gold: its text (classification, QA, image-to-text), its image path (text-to-image), or
# both (image-to-image, grounding: one image can hold several targets).
Naming = Literal["text", "image", "image+text"]


@dataclass(frozen=True)
class TaskInfo:
    """What the evaluator needs to know about one MMEB-v2 task."""

    name: str
    modality: str
    group: str
    scope: Literal["local", "global"]
    naming: Naming = "image+text"
    counted: bool = True


def _tasks() -> dict[str, TaskInfo]:
    table: list[TaskInfo] = []
    cls = ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A", "ImageNet-R",
           "ObjectNet", "Country211"]
    qa = ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
          "TextVQA"]
    table += [TaskInfo(n, "image", "CLS", "local", "text") for n in cls]
    table += [TaskInfo(n, "image", "QA", "local", "text") for n in qa]
    ret = [("VisDial", "image"), ("CIRR", "image+text"), ("VisualNews_t2i", "image"), ("VisualNews_i2t", "text"),
           ("MSCOCO_t2i", "image"), ("MSCOCO_i2t", "text"), ("NIGHTS", "image+text"), ("WebQA", "image"),
           ("FashionIQ", "image+text"), ("Wiki-SS-NQ", "image"), ("OVEN", "image+text"), ("EDIS", "image")]
    table += [TaskInfo(n, "image", "RET", "local", naming) for n, naming in ret]
    table += [TaskInfo(n, "image", "VG", "local", "image+text")
              for n in ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]]
    video = [("K700", "CLS", "global"), ("SmthSmthV2", "CLS", "local"), ("HMDB51", "CLS", "global"),
             ("UCF101", "CLS", "global"), ("Breakfast", "CLS", "global"),
             ("MVBench", "QA", "local"), ("Video-MME", "QA", "local"), ("NExTQA", "QA", "local"),
             ("EgoSchema", "QA", "local"), ("ActivityNetQA", "QA", "local"),
             ("DiDeMo", "RET", "global"), ("MSR-VTT", "RET", "global"), ("MSVD", "RET", "global"),
             ("VATEX", "RET", "global"), ("YouCook2", "RET", "global"),
             ("QVHighlight", "MRET", "local"), ("Charades-STA", "MRET", "local"), ("MomentSeeker", "MRET", "local")]
    table += [TaskInfo(n, "video", g, scope) for n, g, scope in video]
    v1 = ["arxivqa", "docvqa", "infovqa", "tabfquad", "tatdqa", "shiftproject", "syntheticDocQA_artificial_intelligence",
          "syntheticDocQA_energy", "syntheticDocQA_government_reports", "syntheticDocQA_healthcare_industry"]
    table += [TaskInfo(f"ViDoRe_{n}", "visdoc", "ViDoRe-v1", "global") for n in v1]
    v2 = ["esg_reports_human_labeled_v2", "biomedical_lectures_v2", "economics_reports_v2", "esg_reports_v2"]
    table += [TaskInfo(f"ViDoRe_{n}", "visdoc", "ViDoRe-v2", "global") for n in v2]
    table += [TaskInfo(f"ViDoRe_{n}_multilingual", "visdoc", "ViDoRe-v2", "global", counted=False)
              for n in ["biomedical_lectures_v2", "economics_reports_v2", "esg_reports_v2"]]
    table += [TaskInfo(f"VisRAG_{n}", "visdoc", "VisRAG", "global")
              for n in ["ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA"]]
    table += [TaskInfo(n, "visdoc", "OOD", "global")
              for n in ["ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc"]]
    return {t.name: t for t in table}


TASKS: dict[str, TaskInfo] = _tasks()


def tasks_of(modality: str) -> list[TaskInfo]:
    """The known tasks of one modality, in leaderboard order (group by group)."""
    order = GROUP_ORDER[modality]
    listed = [t for t in TASKS.values() if t.modality == modality]
    return sorted(listed, key=lambda t: order.index(t.group))
