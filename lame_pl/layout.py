"""The README's "Layout" block, generated from the tree: every module beside its docstring's summary.

The block sits between ``<!-- layout:start -->`` and ``<!-- layout:end -->`` in README.md.
``tools/layout.py`` prints, writes (``--write``) or checks (``--check``) it; ``tests/test_layout.py``
fails when README.md's block is not the generated one, so a moved or deleted file cannot stay named.
Modules are read with ``ast`` (nothing is imported), and a module without a docstring is an error
naming it, so every module says what it is for.
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

START = "<!-- layout:start -->"
END = "<!-- layout:end -->"
# Folders whose Python modules are listed one by one with their docstring's summary.
CODE_FOLDERS = ("lame_pl", "datamodules", "callbacks", "tools")
# Folders listed by sub-folder, each with the names of its files.
LISTED_FOLDERS = ("configs", "tests")
WIDTH = 120  # the project's line length (ruff); the prose around wraps at 100
INDENT = "  "
# Test modules are many and come and go; the listing names their pattern, not each one.
COLLAPSED = {"tests": re.compile(r"test_.*\.py")}
# A sentence ends at a full stop followed by a space, except in these abbreviations.
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)\.\s")


class LayoutError(ValueError):
    """The tree cannot be described: a module without a docstring, or a README without the markers."""


@dataclass(frozen=True)
class Entry:
    """One line of the block: a file or folder (``path`` relative to the root; folders end in ``/``)."""

    path: str
    summary: str

    @property
    def depth(self) -> int:
        return self.path.rstrip("/").count("/")

    @property
    def name(self) -> str:
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        return base + "/" if self.path.endswith("/") else base


def tree_files(root: Path, folders: tuple[str, ...]) -> list[str]:
    """Files under ``folders`` that git tracks or would track (not ignored), as sorted POSIX paths.

    Untracked files count, so a file added but not yet committed is listed; outside a git work tree
    every file is, but for caches. Files deleted from the work tree are not.
    """
    try:
        listed = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *folders],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = []
        for folder in folders:
            for dirpath, dirnames, filenames in os.walk(root / folder):
                dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
                rel = Path(dirpath).relative_to(root)
                listed += [(rel / name).as_posix() for name in filenames if not name.endswith(".pyc")]
    return sorted({path for path in listed if path and (root / path).is_file()})


def summary_of(text: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line, literals in single backticks."""
    paragraph = " ".join(line.strip() for line in text.strip().split("\n\n", 1)[0].splitlines())
    end = SENTENCE_END.search(paragraph)
    sentence = paragraph[: end.start() + 1] if end else paragraph
    return sentence.replace("``", "`")  # reStructuredText literals read as Markdown's in the README


def module_summary(root: Path, path: str) -> str:
    """The summary of ``path``'s module docstring; ``LayoutError`` naming the file when it has none."""
    try:
        docstring = ast.get_docstring(ast.parse((root / path).read_text(encoding="utf-8"), filename=path))
    except SyntaxError as error:
        raise LayoutError(f"{path}: not valid Python ({error.msg}, line {error.lineno})") from None
    if not docstring or not docstring.strip():
        raise LayoutError(f"{path} has no module docstring")
    return summary_of(docstring)


def script_summary(path: Path) -> str:
    """The summary of a script's first comment block after the shebang, or ``""``."""
    comment = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    return summary_of("\n".join(comment)) if comment else ""


def _folders_of(files: list[str]) -> set[str]:
    """Every folder that holds one of ``files``, at any depth, as ``a/b/``."""
    folders = set()
    for path in files:
        parts = path.split("/")[:-1]
        folders |= {"/".join(parts[: i + 1]) + "/" for i in range(len(parts))}
    return folders


def _code_entries(root: Path, files: list[str]) -> list[Entry]:
    """A code folder's tree: each folder (its ``__init__`` summary), its modules, then its sub-folders."""
    entries, missing = [], []

    def summary(path: str) -> str:
        try:
            return module_summary(root, path)
        except LayoutError as error:
            missing.append(str(error))
            return ""

    def walk(folder: str) -> None:
        init = folder + "__init__.py"
        entries.append(Entry(folder, summary(init) if init in files else ""))
        here = [p for p in files if p.rsplit("/", 1)[0] + "/" == folder and p != init]
        for path in here:
            if path.endswith(".py"):
                entries.append(Entry(path, summary(path)))
            else:  # a script: its first comment line after the shebang
                entries.append(Entry(path, script_summary(root / path)))
        for sub in sorted(f for f in _folders_of(files) if f.rsplit("/", 2)[0] + "/" == folder and f != folder):
            walk(sub)

    tops = sorted({p.split("/", 1)[0] for p in files}, key=CODE_FOLDERS.index)
    for top in tops:
        walk(top + "/")
    if missing:
        raise LayoutError("every listed module needs a docstring that says what it is for: " + "; ".join(missing))
    return entries


def _listed_entries(files: list[str]) -> list[Entry]:
    """A listed folder's tree: each folder with the names of its own files (collapsed patterns once)."""
    entries = []
    for folder in sorted(_folders_of(files)):
        top = folder.split("/", 1)[0]
        collapse = COLLAPSED.get(top)
        names, pattern_seen = [], False
        for path in files:
            if path.rsplit("/", 1)[0] + "/" != folder:
                continue
            name = path.rsplit("/", 1)[-1]
            if collapse and collapse.fullmatch(name):
                if not pattern_seen:
                    names.append(collapse.pattern.replace(".*", "*").replace("\\.", "."))
                    pattern_seen = True
                continue
            names.append(name)
        entries.append(Entry(folder, ", ".join(names)))
    return entries


def layout_entries(root: Path) -> list[Entry]:
    """The block's lines, in order: the code folders' modules, then the listed folders' files."""
    root = Path(root)
    code = [p for p in tree_files(root, CODE_FOLDERS) if "/" in p]
    listed = [p for p in tree_files(root, LISTED_FOLDERS) if "/" in p]
    if not code:
        raise LayoutError(f"{root}: no file under {', '.join(CODE_FOLDERS)} (not a checkout of this repository?)")
    return _code_entries(root, code) + _listed_entries(listed)


def render(entries: list[Entry], width: int = WIDTH) -> str:
    """The block's text: a fenced tree, names indented by depth, summaries wrapped in one column."""
    column = max(len(INDENT * e.depth + e.name) for e in entries) + 2
    lines = []
    for entry in entries:
        name = INDENT * entry.depth + entry.name
        wrapped = textwrap.wrap(entry.summary, width - column, break_long_words=False, break_on_hyphens=False)
        if not wrapped:
            lines.append(name)
            continue
        lines.append(name.ljust(column) + wrapped[0])
        lines += [" " * column + line for line in wrapped[1:]]
    return "```text\n" + "\n".join(lines) + "\n```"


def generate(root: Path) -> str:
    """The block that README.md should hold between the markers."""
    return render(layout_entries(Path(root)))


def readme_block(readme: str) -> str:
    """What ``readme`` holds between the markers (without them), stripped of surrounding newlines."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise LayoutError(f"README.md needs exactly one {START} followed by one {END}")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def replace_block(readme: str, block: str) -> str:
    """``readme`` with the text between the markers replaced by ``block``."""
    readme_block(readme)  # checks the markers
    head, rest = readme.split(START, 1)
    return head + START + "\n" + block + "\n" + END + rest.split(END, 1)[1]


def difference(root: Path, readme_path: Path | None = None) -> str:
    """A unified diff from README.md's block to the generated one; empty when they agree."""
    root = Path(root)
    readme_path = readme_path or root / "README.md"
    if not readme_path.is_file():
        raise LayoutError(f"{readme_path} is not a file")
    current = readme_block(readme_path.read_text(encoding="utf-8"))
    wanted = generate(root)
    return "".join(
        difflib.unified_diff(
            (current + "\n").splitlines(keepends=True),
            (wanted + "\n").splitlines(keepends=True),
            f"{readme_path.name} (layout block)",
            "generated from the tree",
        )
    )
