"""Write WebDataset shards: image-caption pairs (img2dataset layout) or instruction pairs.

Shards go to ``OUT/<split>/shard-000000.tar ...`` with ``OUT/<split>/manifest.json`` beside
them: ``{"num_samples": N, "shards": [{"url": "shard-000000.tar", "num_samples": n}, ...], ...}``
plus provenance fields and, for ``folder`` and ``manifest``, the skipped input counted by reason.
The datamodule reads it for its epoch length and progress bars. This tool only parses arguments:
each format's writer lives with its format in the package (``lame_pl/data/image_text.py``,
``lame_pl/data/instruction_pairs.py``; a manifest's rows: ``lame_pl/data/manifest.py``; the split
and its manifest: ``lame_pl/data/shard_writer.py``).

    python tools/make_shards.py synthetic --out data/synthetic
    python tools/make_shards.py folder --src photos/ --out data/photos [--split-name train]
    python tools/make_shards.py folder --src photos/ --out data/photos --val-fraction 0.1 --test-fraction 0.1
    python tools/make_shards.py manifest --manifest pairs.jsonl --out data/pairs [--image-root imgs/]

Subcommands:
    synthetic   coloured shapes on a 3x3 grid with plain-words captions (lame_pl/synthetic/scenes.py);
                writes train/, val/ and test/. With ``--tasks caption,count,relation,binding``:
                contrast groups of compositional statements instead (lame_pl/synthetic/tasks.py),
                keyed ``<kind>-<group>-<member>``, the kind and the group's statements in KEY.json
    folder      images with same-named caption files, found recursively: ``a/b/cat1.jpg`` +
                ``a/b/cat1.txt``; an image without a caption, or with an empty one, is skipped.
                One split (``--split-name``, default train), or with ``--val-fraction`` and/or
                ``--test-fraction`` train/, val/ and test/ in one call, each image's split
                chosen by a hash of its path (``split_of``): the same folder always splits the
                same way, and images added later never move the old ones
    manifest    a JSONL or CSV file of image-text rows or of instruction pairs (see below)
    mmeb-train  VLM2Vec-V2's training data as stored locally (MMEB-train, visual documents,
                LLaVA-Hound video), one instruction-pair split per subset, plus a mixture config
                overlay; its options and layout are in ``lame_pl/data/mmeb_train.py``

Shard size (every subcommand): ``--samples-per-shard`` (default 1000) and/or ``--shard-bytes``
(``500MB``, ``1GB``, ``64KiB`` or plain bytes; KB/MB/GB are powers of 1000, KiB/MiB/GiB of
1024). With both, a shard is closed at whichever limit comes first. No shard file exceeds
``--shard-bytes`` unless it holds a single sample larger than that.

Image-text layout (``folder``, ``synthetic``, ``manifest`` with ``image``/``text`` rows): documented
once, with the format's reader, in ``lame_pl/data/image_text.py``.

Instruction-pair layout: the schema is documented once, in ``lame_pl/data/instruction_pairs.py``.

Manifest input: a ``.jsonl`` file (one JSON object per line, blank lines ignored) or a ``.csv``
file (a header row, then one row per sample). Image and frame-folder paths are relative to
``--image-root``, which defaults to the manifest's folder; absolute paths are kept. A sample's key
is its 0-based data-row index as 9 digits (``000000041``), skipped rows included, so a key leads
back to its row. ``folder`` keys are the relative path without extension, ``/`` as ``__`` and
other characters outside ``[A-Za-z0-9_-]`` as ``_``. The first row (a CSV's header) decides the
kind of the whole file:
    image-text          columns ``image`` and ``text``
    instruction pairs   any of ``query_text``, ``query_image``, ``query_video``, ``target_text``,
                        ``target_image``, ``target_video``; plus optional ``query_instruction``,
                        ``target_instruction`` and ``negatives``
``*_video`` is a folder of extracted frames; ``--num-frames`` of them (default 8, VLM2Vec-V2's)
are sampled evenly, in natural file-name order (``lame_pl/media.py``). A side has an image or a
video, not both. ``negatives`` is a list whose items are a string (a text negative) or an object
with ``text``, ``image``, ``video`` and/or ``instruction``; in a CSV it is a JSON-encoded list in
one cell (an empty cell means none). A row whose image file or frame folder is missing, whose
frame folder holds no frame, or whose caption (query, target) is empty, is skipped and counted; a
malformed row (bad JSON, a missing column, a wrong type, a side with both an image and a video,
a negative with nothing in it) stops the tool before anything is written, with the file and line
number.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lame_pl.data import mmeb_train
from lame_pl.data.shard_args import add_shard_size_args, fraction, positive_int
from lame_pl.data.shard_commands import run_folder, run_manifest, run_synthetic
from lame_pl.data.shard_writer import MANIFEST, DataError
from lame_pl.media import DEFAULT_NUM_FRAMES
from lame_pl.synthetic.tasks import BLOCK, TASKS, parse_tasks

SPLITS = ("train", "val", "test")


def _task_list(text: str) -> tuple[str, ...]:
    try:
        return parse_tasks(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser, one subcommand per data source."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="coloured-shape scenes with unique plain-words captions")
    syn.add_argument("--out", required=True, type=Path, help="output directory (gets train/, val/, test/)")
    syn.add_argument("--train", type=positive_int, default=6000, help="training samples (default 6000)")
    syn.add_argument("--val", type=positive_int, default=256, help="validation samples (default 256)")
    syn.add_argument("--test", type=positive_int, default=256, help="test samples (default 256)")
    syn.add_argument("--image-size", type=positive_int, default=112, help="square image side in pixels (default 112)")
    syn.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same shards")
    syn.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding (default png)")
    syn.add_argument(
        "--tasks",
        type=_task_list,
        default=None,
        help="write the compositional set instead of plain captions: contrast groups of these tasks, "
        f"comma-separated, from {','.join(TASKS)} (lame_pl/synthetic/tasks.py); sample counts and "
        f"--samples-per-shard must then be multiples of {BLOCK}",
    )
    add_shard_size_args(syn)

    folder = sub.add_parser("folder", help="images with same-named caption files (a/b/cat1.jpg + a/b/cat1.txt)")
    folder.add_argument("--src", required=True, type=Path, help="folder searched recursively for images")
    folder.add_argument("--out", required=True, type=Path, help="output directory (gets SPLIT_NAME/)")
    folder.add_argument(
        "--split-name", default=None, help="subfolder of --out for the shards when no fraction is given (default train)"
    )
    folder.add_argument(
        "--val-fraction",
        type=fraction,
        default=None,
        help="share of the images for OUT/val/, chosen by a hash of each image's path (default: none)",
    )
    folder.add_argument(
        "--test-fraction",
        type=fraction,
        default=None,
        help="share of the images for OUT/test/, chosen the same way (default: none)",
    )
    add_shard_size_args(folder)

    man = sub.add_parser("manifest", help="a JSONL/CSV of image-text rows or instruction pairs")
    man.add_argument("--manifest", required=True, type=Path, help="the .jsonl or .csv file")
    man.add_argument("--out", required=True, type=Path, help="output directory (gets SPLIT_NAME/)")
    man.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="folder that relative image and frame-folder paths start from (default: the manifest's folder)",
    )
    man.add_argument("--split-name", default="train", help="subfolder of --out for the shards (default train)")
    man.add_argument(
        "--num-frames",
        type=positive_int,
        default=DEFAULT_NUM_FRAMES,
        help=f"frames sampled from each video's frame folder (default {DEFAULT_NUM_FRAMES})",
    )
    add_shard_size_args(man)

    mmeb = sub.add_parser(
        "mmeb-train",
        help="VLM2Vec-V2's training data (MMEB-train, visual documents, video) "
        "to one instruction-pair split per subset",
    )
    mmeb_train.add_arguments(mmeb)
    return parser


def _check_out(parser: argparse.ArgumentParser, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            parser.error(f"--out {str(out)!r} exists and is not empty; pass --overwrite to replace its shards")
        # Remove only what this tool writes, so a mistyped --out never wipes unrelated files.
        for split in SPLITS:
            split_dir = out / split
            if split_dir.is_dir():
                for old in [*split_dir.glob("shard-*.tar"), split_dir / MANIFEST]:
                    old.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (bad arguments or input exit with status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "synthetic":
        _check_out(parser, args.out, args.overwrite)
        try:
            run_synthetic(args)
        except RuntimeError as err:
            parser.error(str(err))
    else:
        try:
            if args.command == "folder":
                run_folder(args, parser)
            elif args.command == "mmeb-train":
                mmeb_train.run(args)
            else:
                run_manifest(args, parser)
        except DataError as err:
            parser.error(str(err))
    return 0
