"""Where the published MMEB-v2 snapshots put their tables and media under ``--data-root``.

The VLM2Vec layout (``image/``, ``video/``, ``visdoc/`` and their media folders, described in
``lame_pl.evaluation.mmeb``) is one of the layouts looked in; the snapshots users download are
read where they lie (README "MMEB-v2 and MRMR on disk"): ``ANNOTATION_HOMES`` lists the folders
the task tables may be in, ``MEDIA_ROOTS`` those the media may be in. ``scan_tasks`` finds every
task table (and warns about folders it does not read), ``select_tasks`` picks the ones asked for,
``find_media_root`` the media folder that holds a task's first media path.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lame_pl.evaluation.mmeb_tasks import MODALITY_ORDER, TASKS, TaskInfo, tasks_named, tasks_of
from lame_pl.evaluation.tables import TABLE_SUFFIXES, EvalDataError, Row

# Where the snapshots users download put things, relative to --data-root, in the order they are
# searched (a task found in two places is read from the first; the other is reported as not read).
# ``.`` is the data root itself (--data-root pointed at one snapshot). Only these folders are
# looked in: no recursive scan of a data root that may hold terabytes of frames.
ANNOTATION_HOMES: dict[str, tuple[str, ...]] = {
    "image": ("image", "MMEB_Test_Instruct", "MMEB-eval", ".", "image-tasks", "image-tasks/MMEB"),
    "video": ("video", "."),
    "visdoc": ("visdoc", ".", "visdoc-tasks", "visdoc-tasks/data"),
}
# Folders where every entry is a task of that modality, known to the task table or not (an unknown
# one is shown, not averaged); elsewhere only known task names (or their snapshot names) count.
DEDICATED_HOMES = {"image", "video", "visdoc", "MMEB_Test_Instruct", "MMEB-eval"}
MEDIA_ROOTS: dict[str, tuple[str, ...]] = {
    "image": ("image-tasks", "image-tasks/MMEB", "eval_images", "MMEB-eval/eval_images"),
    "video": (
        "video-tasks",
        "video-tasks/frames",
        "video-tasks/frames/video_cls",
        "video-tasks/frames/video_ret",
        "video-tasks/frames/video_mret",
        "video-tasks/frames/video_qa",
    ),
    "visdoc": ("visdoc-tasks",),
}
KNOWN_TOP = {p.split("/")[0] for homes in (*ANNOTATION_HOMES.values(), *MEDIA_ROOTS.values()) for p in homes} - {"."}
ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Found:
    """One task's table as found on disk: ``path`` is a table file or a folder of tables."""

    info: TaskInfo
    path: Path
    home: str

    @property
    def stem(self) -> str:
        """The name ``find_table`` looks the table up by in ``path.parent``."""
        return self.path.name if self.path.is_dir() else self.path.stem


def _has_table(folder: Path, depth: int = 2) -> bool:
    """Whether ``folder`` holds a table file within ``depth`` levels (a snapshot's ``<config>/test/0000.parquet``)."""
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix in TABLE_SUFFIXES:
            return True
        if depth > 1 and entry.is_dir() and not entry.name.startswith(".") and _has_table(entry, depth - 1):
            return True
    return False


def _has_beir(folder: Path) -> bool:
    return any((folder / f"corpus{s}").is_file() for s in TABLE_SUFFIXES) or (folder / "corpus").is_dir()


def _entry_name(path: Path) -> str | None:
    if path.name.startswith((".", "_")):
        return None
    if path.is_dir():
        return path.name
    return path.stem if path.is_file() and path.suffix in TABLE_SUFFIXES else None


def scan_tasks(root: Path) -> tuple[dict[str, list[Found]], list[str]]:
    """Every task table under the known folders of ``root``, and warnings about folders not read."""
    found: dict[str, list[Found]] = {}
    warnings: list[str] = []
    for modality in MODALITY_ORDER:
        for home in ANNOTATION_HOMES[modality]:
            folder = root / home
            if not folder.is_dir():
                continue
            dedicated = home in DEDICATED_HOMES
            for path in sorted(folder.iterdir()):
                name = _entry_name(path)
                if name is None:
                    continue
                infos = [t for t in tasks_named(name) if t.modality == modality]
                if modality == "visdoc":
                    holds = path.is_dir() and _has_beir(path)
                else:
                    holds = path.is_file() or (path.is_dir() and _has_table(path))
                if not infos:
                    if not dedicated or (home in ("MMEB_Test_Instruct", "MMEB-eval") and not holds):
                        continue  # not a task here (media, a snapshot's other folders): see the top-level check
                    infos = [_info(name, modality)]
                elif not holds and not dedicated:
                    continue  # e.g. image-tasks/<Task>/ holding only the task's images
                for info in infos:
                    found.setdefault(info.name, []).append(Found(info, path, home))
    for home in ("MMEB_Test_Instruct", "MMEB-eval"):
        folder = root / home
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if (
                    path.is_dir()
                    and not path.name.startswith(".")
                    and path.name != "eval_images"
                    and not _has_table(path)
                ):
                    warnings.append(f"warning: folder {path} is not read: it holds no .jsonl, .json or .parquet table")
    used_top = {f.path.relative_to(root).parts[0] for hits in found.values() for f in hits}
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and path.name not in KNOWN_TOP | used_top:
            warnings.append(
                f"warning: folder {path} is not read: it is neither a task folder holding tables nor one of "
                f"{', '.join(sorted(KNOWN_TOP))} (see --list-tasks)"
            )
    return found, warnings


def _close(name: str, names: Sequence[str]) -> str:
    folded = {n.casefold(): n for n in names}
    match = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.6)
    return f" (did you mean {folded[match[0]]!r}?)" if match else ""


def select_tasks(root: Path, found: dict[str, list[Found]], names: Sequence[str] | None, log: Log) -> list[Found]:
    """The tasks to read: every one found (leaderboard order), or ``names`` resolved without regard to case."""
    if names is None:
        order = {t.name: i for i, t in enumerate(t for m in MODALITY_ORDER for t in tasks_of(m))}
        return [
            found[n][0]
            for n in sorted(
                found, key=lambda n: (MODALITY_ORDER.index(found[n][0].info.modality), order.get(n, len(order)), n)
            )
        ]
    chosen = []
    for name in names:
        hits = found.get(name)
        if hits is None:
            folded = [n for n in found if n.casefold() == name.casefold()]
            known = [t.name for t in tasks_named(name) if t.name.casefold() == name.casefold()]
            if folded or known:
                canonical = (folded or known)[0]
                log(f"note: task {name!r} read as {canonical!r} (task names are matched without regard to case)")
                name, hits = canonical, found.get(canonical)
        if hits is None:
            homes = ", ".join(f"{h}/" for m in MODALITY_ORDER for h in ANNOTATION_HOMES[m] if (root / h).is_dir())
            if name in TASKS:
                raise EvalDataError(f"task {name!r} not found under {root} (looked in {homes or 'no known folder'})")
            raise EvalDataError(
                f"task {name!r} not found: no MMEB-v2 task of that name and no table of that "
                f"name under {root}{_close(name, [*TASKS, *found])}"
            )
        chosen.append(hits[0])
    return chosen


def _first_media(rows: Sequence[Row], field: str) -> tuple[Row, str, str] | None:
    for row in rows:
        for key in (f"qry_{field}", f"tgt_{field}"):
            value = row.data.get(key)
            values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
            for v in values:
                if isinstance(v, str) and v:
                    return row, key, v
    return None


def find_media_root(task: str, rows: Sequence[Row], field: str, candidates: Sequence[Path]) -> Path:
    """The first candidate folder holding the task's first media path (a file, or a frame folder for video)."""
    probe = _first_media(rows, field)
    if probe is None:
        return candidates[0]
    row, key, relative = probe
    for candidate in candidates:
        target = candidate / relative
        if target.is_dir() if field == "video_path" else target.is_file():
            return candidate
    archives = sorted(
        str(p) for c in candidates if c.is_dir() for p in c.iterdir() if p.is_file() and p.name.endswith(ARCHIVES)
    )
    hint = f"; unpack {', '.join(archives)} first" if archives else ""
    raise EvalDataError(
        f"task {task}: {row.where}: {key} {relative!r} is in none of the media folders "
        f"{', '.join(str(c) for c in candidates)}{hint}"
    )


def relative_path(path: Path, root: Path) -> str:
    """``path`` as the log shows it: relative to ``root`` where it lies under it (``.`` for ``root``)."""
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _info(name: str, modality: str) -> TaskInfo:
    if name in TASKS and TASKS[name].modality == modality:
        return TASKS[name]
    # A task the table does not know: ranked the way its modality mostly is, reported apart.
    return TaskInfo(name, modality, "other", "global" if modality == "visdoc" else "local", counted=False)


__all__ = [
    "ANNOTATION_HOMES",
    "KNOWN_TOP",
    "MEDIA_ROOTS",
    "Found",
    "Log",
    "find_media_root",
    "relative_path",
    "scan_tasks",
    "select_tasks",
]
