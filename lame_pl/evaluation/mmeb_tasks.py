"""The MMEB-v2 task list: modality, leaderboard group, ranking scope and candidate naming of each task.

Sources (TIGER-AI-Lab/VLM2Vec): the task lists and main metrics of ``experiments/report_score_v2.py``
(image hit@1, video hit@1, visdoc ndcg_linear@5), the ``eval_type`` (local/global) and parser of
each task in ``experiments/public/eval/{image,video,visdoc}.yaml``, and the candidate names of the
image parsers (``src/data/eval_dataset/image_*``). Groups and their order follow the MMEB-v2
leaderboard columns: image CLS, QA, RET, VG; video CLS, QA, RET, MRET; visdoc ViDoRe-v1,
ViDoRe-v2, VisRAG, OOD. 36 + 18 + 24 = 78 tasks count towards the overall score; the three
multilingual ViDoRe-v2 variants that ``report_score_v2.py`` also lists are kept as known tasks
outside the 24 (that they are outside is our reading of the published count, not confirmed).

Folder names: a visual-document task's BEIR tables are a Hugging Face dataset snapshot, which
VLM2Vec names after the dataset (``src/constant/dataset_hf_path.py``: ``ViDoRe_arxivqa`` is
``vidore/arxivqa_test_subsampled_beir``, ``VisRAG_ArxivQA`` is ``openbmb/VisRAG-Ret-Test-ArxivQA``),
and whose pages ``experiments/public/eval/visdoc.yaml`` puts under ``visdoc-tasks/<folder>`` (the
ViDoRe-v2 tasks without their ``ViDoRe_`` prefix). ``TaskInfo.folders`` holds those names. The
three English ViDoRe-v2 tasks and their multilingual variants share one dataset: the English ones
keep the queries whose ``language`` is ``english``, as VLM2Vec filters them.
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
    folders: tuple[str, ...] = ()
    language: str | None = None

    @property
    def metric(self) -> str:
        """The main metric the benchmark reports for this task."""
        return MAIN_METRIC[self.modality]


def _tasks() -> dict[str, TaskInfo]:
    table: list[TaskInfo] = []
    cls = [
        "ImageNet-1K",
        "N24News",
        "HatefulMemes",
        "VOC2007",
        "SUN397",
        "Place365",
        "ImageNet-A",
        "ImageNet-R",
        "ObjectNet",
        "Country211",
    ]
    qa = [
        "OK-VQA",
        "A-OKVQA",
        "DocVQA",
        "InfographicsVQA",
        "ChartQA",
        "Visual7W",
        "ScienceQA",
        "VizWiz",
        "GQA",
        "TextVQA",
    ]
    table += [TaskInfo(n, "image", "CLS", "local", "text") for n in cls]
    table += [TaskInfo(n, "image", "QA", "local", "text") for n in qa]
    ret = [
        ("VisDial", "image"),
        ("CIRR", "image+text"),
        ("VisualNews_t2i", "image"),
        ("VisualNews_i2t", "text"),
        ("MSCOCO_t2i", "image"),
        ("MSCOCO_i2t", "text"),
        ("NIGHTS", "image+text"),
        ("WebQA", "image"),
        ("FashionIQ", "image+text"),
        ("Wiki-SS-NQ", "image"),
        ("OVEN", "image+text"),
        ("EDIS", "image"),
    ]
    table += [TaskInfo(n, "image", "RET", "local", naming) for n, naming in ret]
    table += [
        TaskInfo(n, "image", "VG", "local", "image+text")
        for n in ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]
    ]
    video = [
        ("K700", "CLS", "global"),
        ("SmthSmthV2", "CLS", "local"),
        ("HMDB51", "CLS", "global"),
        ("UCF101", "CLS", "global"),
        ("Breakfast", "CLS", "global"),
        ("MVBench", "QA", "local"),
        ("Video-MME", "QA", "local"),
        ("NExTQA", "QA", "local"),
        ("EgoSchema", "QA", "local"),
        ("ActivityNetQA", "QA", "local"),
        ("DiDeMo", "RET", "global"),
        ("MSR-VTT", "RET", "global"),
        ("MSVD", "RET", "global"),
        ("VATEX", "RET", "global"),
        ("YouCook2", "RET", "global"),
        ("QVHighlight", "MRET", "local"),
        ("Charades-STA", "MRET", "local"),
        ("MomentSeeker", "MRET", "local"),
    ]
    table += [TaskInfo(n, "video", g, scope) for n, g, scope in video]
    v1 = [
        "arxivqa",
        "docvqa",
        "infovqa",
        "tabfquad",
        "tatdqa",
        "shiftproject",
        "syntheticDocQA_artificial_intelligence",
        "syntheticDocQA_energy",
        "syntheticDocQA_government_reports",
        "syntheticDocQA_healthcare_industry",
    ]
    subsampled = {"arxivqa", "docvqa", "infovqa", "tabfquad"}
    table += [
        TaskInfo(
            f"ViDoRe_{n}",
            "visdoc",
            "ViDoRe-v1",
            "global",
            folders=(f"{n}_test{'_subsampled' if n in subsampled else ''}_beir",),
        )
        for n in v1
    ]
    table.append(
        TaskInfo(
            "ViDoRe_esg_reports_human_labeled_v2",
            "visdoc",
            "ViDoRe-v2",
            "global",
            folders=("esg_reports_human_labeled_v2",),
        )
    )
    for n in ["biomedical_lectures_v2", "economics_reports_v2", "esg_reports_v2"]:
        table.append(TaskInfo(f"ViDoRe_{n}", "visdoc", "ViDoRe-v2", "global", folders=(n,), language="english"))
    table += [
        TaskInfo(
            f"ViDoRe_{n}_multilingual", "visdoc", "ViDoRe-v2", "global", counted=False, folders=(f"{n}_multilingual", n)
        )
        for n in ["biomedical_lectures_v2", "economics_reports_v2", "esg_reports_v2"]
    ]
    table += [
        TaskInfo(f"VisRAG_{n}", "visdoc", "VisRAG", "global", folders=(f"VisRAG-Ret-Test-{n}",))
        for n in ["ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA"]
    ]
    table += [
        TaskInfo("ViDoSeek-page", "visdoc", "OOD", "global", folders=("ViDoSeek-page-fixed",)),
        TaskInfo("ViDoSeek-doc", "visdoc", "OOD", "global", folders=("ViDoSeek",)),
        TaskInfo("MMLongBench-page", "visdoc", "OOD", "global", folders=("MMLongBench-page-fixed", "MMLongBench")),
        TaskInfo("MMLongBench-doc", "visdoc", "OOD", "global"),
    ]
    return {t.name: t for t in table}


TASKS: dict[str, TaskInfo] = _tasks()

GROUP_NAMES = {
    "CLS": "classification",
    "QA": "question answering",
    "RET": "retrieval",
    "VG": "visual grounding",
    "MRET": "moment retrieval",
    "ViDoRe-v1": "document retrieval",
    "ViDoRe-v2": "document retrieval",
    "VisRAG": "document retrieval",
    "OOD": "document retrieval, out of domain",
}


def _folder_index() -> dict[str, list[TaskInfo]]:
    index: dict[str, list[TaskInfo]] = {}
    for info in TASKS.values():
        for name in (info.name, *info.folders):
            index.setdefault(name.casefold(), []).append(info)
    return index


# Every name a task's folder may have on disk, compared without regard to case: the task names
# differ by more than case, so a case-only difference cannot pick the wrong task (and metric).
_BY_FOLDER = _folder_index()


def tasks_named(name: str) -> list[TaskInfo]:
    """The known tasks whose name or snapshot folder name is ``name``, ignoring case (several for a shared folder)."""
    return list(_BY_FOLDER.get(name.casefold(), []))


def tasks_of(modality: str) -> list[TaskInfo]:
    """The known tasks of one modality, in leaderboard order (group by group)."""
    order = GROUP_ORDER[modality]
    listed = [t for t in TASKS.values() if t.modality == modality]
    return sorted(listed, key=lambda t: order.index(t.group))
