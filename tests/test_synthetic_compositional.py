"""The compositional synthetic set: contrast groups per task, balanced answers, and the round trip to batches."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lame_pl.synthetic import scenes as synthetic_scenes
from lame_pl.synthetic import tasks as synthetic_tasks
from lame_pl.synthetic.tasks import BLOCK, GROUP_SIZES, TASKS, draw_group, parse_tasks, task_samples

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _samples(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS, size: int = 56) -> list[tuple]:
    return list(task_samples(n, tasks, random.Random(seed), set(), size))


def _groups(samples: list[tuple]) -> dict[str, list[tuple]]:
    groups: dict[str, list[tuple]] = {}
    for sample in samples:
        groups.setdefault(sample[3]["group"], []).append(sample)
    return groups


def _cells(meta: dict) -> dict[tuple[int, int], tuple[str, str]]:
    return {(o["row"], o["col"]): (o["color"], o["shape"]) for o in meta["objects"]}


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = _samples(32, seed=3), _samples(32, seed=3), _samples(32, seed=4)
    assert [(k, t, m) for k, _, t, m in a] == [(k, t, m) for k, _, t, m in b]
    assert [i.tobytes() for _, i, _, _ in a] == [i.tobytes() for _, i, _, _ in b]
    assert [t for _, _, t, _ in a] != [t for _, _, t, _ in c]


def test_default_scenes_are_unchanged():
    """The plain `synthetic` set (make demo) draws exactly what it drew before the compositional tasks."""
    rng = random.Random("0-test")
    digest = hashlib.sha256()
    captions = []
    for _ in range(5):
        image, caption, _ = synthetic_scenes.make_scene(rng, 112)
        digest.update(image.tobytes())
        captions.append(caption)
    assert captions[0] == "two red diamonds at the top right"
    assert captions[2] == "two yellow circles in the center"
    assert digest.hexdigest() == "2334442ed8baac6fba2791cb3285e29360c9a653d5376c0eebaef09af24869e6"


def test_kinds_and_answers_are_balanced():
    samples = _samples(320)
    kinds = Counter(m["kind"] for _, _, _, m in samples)
    assert kinds == dict.fromkeys(TASKS, 80)
    counts = Counter(m["answer"] for _, _, _, m in samples if m["kind"] == "count")
    assert counts == {"1": 20, "2": 20, "3": 20, "4": 20}
    # In every group each member is the positive once: within a group the answers are all distinct.
    for members in _groups(samples).values():
        assert len(members) == GROUP_SIZES[members[0][3]["kind"]]
        assert len({m["answer"] for _, _, _, m in members}) == len(members)
        assert [m["member"] for _, _, _, m in members] == list(range(len(members)))


def test_groups_arrive_whole_in_blocks():
    samples = _samples(64)
    for start in range(0, len(samples), BLOCK):
        block = samples[start : start + BLOCK]
        groups = Counter(m["group"] for _, _, _, m in block)
        assert all(n == GROUP_SIZES[g.split("-")[0]] for g, n in groups.items())


def test_binding_negative_differs_only_in_the_swapped_colours():
    for seed in range(20):
        pos, neg = draw_group("binding", random.Random(seed))
        (layout_a, text_a, _), (layout_b, text_b, _) = pos, neg
        assert text_a != text_b and sorted(text_a.split()) == sorted(text_b.split())
        assert [(g["cell"], g["shape"]) for g in layout_a] == [(g["cell"], g["shape"]) for g in layout_b]
        colors_a, colors_b = [g["color"] for g in layout_a], [g["color"] for g in layout_b]
        assert colors_a == colors_b[::-1] and colors_a[0] != colors_a[1]
        # Bag of attributes: the same colours and shapes in both scenes and both statements.
        assert Counter(colors_a) == Counter(colors_b)


def test_binding_images_differ_only_in_colour():
    """Members share the per-cell jitter: the same pixels are covered, only their colours change."""
    samples = [s for s in _samples(32) if s[3]["kind"] == "binding"]
    (_, a, _, meta_a), (_, b, _, meta_b) = samples[0], samples[1]
    assert meta_a["group"] == meta_b["group"]
    background = synthetic_scenes.BACKGROUND
    covered_a = [p != background for p in a.getdata()]
    covered_b = [p != background for p in b.getdata()]
    assert covered_a == covered_b and a.tobytes() != b.tobytes()


def test_relation_negative_swaps_the_objects():
    for seed in range(20):
        (layout_a, text_a, answer_a), (layout_b, text_b, answer_b) = draw_group("relation", random.Random(seed))
        assert sorted(text_a.split()) == sorted(text_b.split()) and text_a != text_b
        place_a = {g["cell"]: (g["color"], g["shape"]) for g in layout_a}
        place_b = {g["cell"]: (g["color"], g["shape"]) for g in layout_b}
        assert set(place_a) == set(place_b)
        left, right = sorted(place_a, key=lambda cell: cell % 3)
        assert left % 3 < right % 3
        assert place_a[left] == place_b[right] and place_a[right] == place_b[left]
        assert text_a.startswith(f"the {' '.join(place_a[left])} is left of") and answer_a == " ".join(place_a[left])
        assert answer_b == " ".join(place_b[left])


def test_count_members_differ_only_in_the_number_of_one_colour():
    for seed in range(20):
        members = draw_group("count", random.Random(seed))
        color = members[0][1].split()[1]
        for n, (layout, text, answer) in enumerate(members, 1):
            assert answer == str(n) and text.startswith(("one", "two", "three", "four")[n - 1])
            assert sum(g["color"] == color for g in layout) == n
        distractors = [[g for g in layout if g["color"] != color] for layout, _, _ in members]
        assert all(d == distractors[0] for d in distractors) and distractors[0]
        # Nested: each scene adds one shape of the colour to the previous one.
        for smaller, larger in zip(members, members[1:], strict=False):
            assert all(g in larger[0] for g in smaller[0])


def test_caption_negative_changes_one_colour():
    for seed in range(20):
        (layout_a, text_a, _), (layout_b, text_b, _) = draw_group("caption", random.Random(seed))
        changed = [(a, b) for a, b in zip(layout_a, layout_b, strict=True) if a != b]
        assert len(changed) == 1 and text_a != text_b
        a, b = changed[0]
        assert {k: v for k, v in a.items() if k != "color"} == {k: v for k, v in b.items() if k != "color"}
        assert b["color"] not in {g["color"] for g in layout_a}


def test_bad_task_lists_and_sizes_are_named():
    with pytest.raises(ValueError, match="unknown task 'colour'"):
        parse_tasks("count,colour")
    with pytest.raises(ValueError, match="twice"):
        parse_tasks("count,count")
    with pytest.raises(ValueError, match="no task"):
        parse_tasks(" , ")
    with pytest.raises(ValueError, match="not a multiple of 4"):
        _samples(30)
    with pytest.raises(ValueError, match="unknown task"):
        synthetic_tasks.draw_group("colour", random.Random(0))


def _make_shards(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / "make_shards.py"), "synthetic", "--out", str(out), "--image-size", "56", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_shards_refuses_sizes_that_split_groups(tmp_path):
    result = _make_shards(tmp_path / "a", "--tasks", "count", "--test", "10")
    assert result.returncode == 2 and "--test 10 is not a multiple of 4" in result.stderr
    result = _make_shards(tmp_path / "b", "--tasks", "count", "--samples-per-shard", "6")
    assert result.returncode == 2 and "--samples-per-shard 6" in result.stderr
    result = _make_shards(tmp_path / "c", "--tasks", "count,colour")
    assert result.returncode == 2 and "unknown task 'colour'" in result.stderr
    result = _make_shards(tmp_path / "d", "--tasks", "count", "--shard-bytes", "1MB")
    assert result.returncode == 2 and "--shard-bytes cannot be used with --tasks" in result.stderr


def test_kinds_round_trip_through_shards_and_datamodule(tmp_path, tiny_spec):
    from lame_pl.datamodules import ImageTextDataModule

    out = tmp_path / "set"
    result = _make_shards(
        out, "--tasks", ",".join(TASKS), "--train", "16", "--val", "8", "--test", "32", "--samples-per-shard", "16"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "test" / "manifest.json").read_text())
    assert manifest["tasks"] == list(TASKS) and manifest["num_samples"] == 32

    import webdataset as wds

    urls = sorted(str(p) for p in (out / "test").glob("*.tar"))
    meta = {s["__key__"]: (json.loads(s["json"]), s["txt"].decode()) for s in wds.WebDataset(urls, shardshuffle=False)}
    assert {m["kind"] for m, _ in meta.values()} == set(TASKS)

    data = ImageTextDataModule(tiny_spec, test_shards=str(out / "test"), batch_size=8, num_workers=0)
    seen = {}
    for batch in data.test_dataloader():
        seen.update(zip(batch["keys"], batch["texts"], strict=True))
    assert seen.keys() == meta.keys()
    for key, text in seen.items():
        record, written = meta[key]
        assert key.split("-")[0] == record["kind"] and key.rsplit("-", 1)[0] == record["group"]
        assert text == written == record["candidates"][record["member"]]


def test_default_synthetic_output_has_no_task_tags(tmp_path):
    result = _make_shards(tmp_path / "plain", "--train", "4", "--val", "4", "--test", "4")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "plain" / "test" / "manifest.json").read_text())
    assert "tasks" not in manifest
    import webdataset as wds

    urls = sorted(str(p) for p in (tmp_path / "plain" / "test").glob("*.tar"))
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == ["000000000", "000000001", "000000002", "000000003"]
