"""README's Layout block is generated from the tree (``lame_pl.layout``, ``tools/layout.py``), so it names no stale path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import load_tool

from lame_pl.layout import END, START, LayoutError, difference, generate, layout_entries, summary_of

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_layout_block_is_the_generated_one():
    diff = difference(ROOT)
    assert not diff, f"README.md's layout block is stale; run python tools/layout.py --write\n{diff}"


def test_the_generator_names_existing_files_with_their_docstrings():
    entries = {entry.path: entry.summary for entry in layout_entries(ROOT)}
    assert all((ROOT / path).exists() for path in entries), [p for p in entries if not (ROOT / p).exists()]
    doc = ast.get_docstring(ast.parse((ROOT / "lame_pl" / "layout.py").read_text()))
    assert entries["lame_pl/layout.py"] == doc.splitlines()[0]
    assert "tools/layout.py" in entries and "configs/demo/" in entries
    assert not any(path.startswith("tests/test_") for path in entries)  # test modules are named by their pattern


def _tree(root: Path, files: dict[str, str]) -> Path:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def test_a_module_without_a_docstring_fails_naming_it(tmp_path):
    _tree(
        tmp_path,
        {"lame_pl/__init__.py": '"""The package."""\n', "lame_pl/a.py": '"""A."""\n', "lame_pl/b.py": "x = 1\n"},
    )
    with pytest.raises(LayoutError, match=r"lame_pl/b\.py has no module docstring"):
        generate(tmp_path)


def test_the_summary_is_the_first_sentence_of_the_first_paragraph():
    assert summary_of("One line.\n\nMore.") == "One line."
    assert summary_of("A summary that wraps\nonto a second line. Then more,\ne.g. this.\n\nBody.") == (
        "A summary that wraps onto a second line."
    )
    assert summary_of("Names ``a.b``, e.g. this one") == "Names `a.b`, e.g. this one"


def test_check_and_write_through_the_command_line(tmp_path, capsys):
    tool = load_tool("layout")
    _tree(
        tmp_path,
        {
            "lame_pl/__init__.py": '"""The package."""\n',
            "lame_pl/gone.py": '"""A module that will be deleted."""\n',
            "lame_pl/sub/__init__.py": '"""A sub-package."""\n',
            "lame_pl/sub/kept.py": '"""Kept, with a summary\nthat wraps. And a body.\n"""\n',
            "tools/run.py": '"""A tool."""\n',
            "configs/demo/base.yaml": "a: 1\n",
            "tests/conftest.py": "",
            "tests/test_x.py": "",
            "README.md": f"# x\n\n## Layout\n\n{START}\nold\n{END}\n\n## After\n",
        },
    )
    assert tool.main(["--root", str(tmp_path), "--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert tool.main(["--root", str(tmp_path), "--write"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# x\n\n## Layout\n\n") and readme.endswith(f"{END}\n\n## After\n")
    assert "  gone.py" in readme and "Kept, with a summary that wraps." in readme and "test_*.py" in readme
    capsys.readouterr()
    assert tool.main(["--root", str(tmp_path), "--check"]) == 0

    (tmp_path / "lame_pl" / "gone.py").unlink()  # a deleted module makes the block stale, naming it
    assert tool.main(["--root", str(tmp_path), "--check"]) == 1
    assert "-  gone.py" in capsys.readouterr().err

    (tmp_path / "README.md").write_text("# no markers\n")
    assert tool.main(["--root", str(tmp_path), "--check"]) == 2
    assert START in capsys.readouterr().err
