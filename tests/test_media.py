"""Video frames: natural order on disk and VLM2Vec-V2's even sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lame_pl.media import list_frames, natural_key, sample_frames


def test_frames_listed_in_natural_order_without_other_files(tmp_path: Path) -> None:
    for name in ("frame_10.jpg", "frame_2.JPG", "frame_1.png", ".hidden.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_frames(tmp_path)] == ["frame_1.png", "frame_2.JPG", "frame_10.jpg"]
    assert natural_key("f2") < natural_key("f10")


def test_missing_frame_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_frames(tmp_path / "nowhere")


@pytest.mark.parametrize("n,k", [(31, 23), (61, 23), (100, 8), (9, 8), (17, 1)])
def test_sampling_matches_numpy_linspace_truncated(n: int, k: int) -> None:
    # VLM2Vec-V2's indices are np.linspace(0, n - 1, k, dtype=int), float rounding included:
    # (31, 23) is a case where exact integer division picks another frame.
    assert sample_frames(list(range(n)), k) == np.linspace(0, n - 1, k, dtype=int).tolist()


def test_short_videos_keep_every_frame_and_bad_counts_fail() -> None:
    assert sample_frames(["a", "b", "c"], 8) == ["a", "b", "c"]
    assert sample_frames(list(range(10)), 2) == [0, 9]
    with pytest.raises(ValueError, match="num_frames"):
        sample_frames([1, 2], 0)
