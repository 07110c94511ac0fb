"""What the bottleneck carries: the latent decoder's text for test images, beside their captions.

Greedy-decodes the K reason states of the first ``-n`` images of a WebDataset split (image +
caption pairs, as ``tools/make_shards.py`` writes them) through ``LaMEEmbedder.explain``, and
scores the word overlap of each text with its own caption against its overlap with the other
captions (chance: ``lame_pl.latent_text.overlap_rows``), with the paired difference's standard
error and how many distinct texts the decoder wrote (one for every image: a decoder that ignores
its input).

    python tools/explain.py --checkpoint runs/demo/stage2/checkpoints/last.ckpt --shards data/demo/test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lame_pl.data.shard_args import positive_int


def read_pairs(shards: Path, limit: int) -> list[tuple[str, object, str]]:
    """The first ``limit`` (key, PIL image, caption) samples of the ``.tar`` shards in ``shards``, in file order."""
    import webdataset as wds

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    if not urls:
        raise SystemExit(f"error: {shards} holds no .tar shard")
    pairs = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        image = next((sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
        if image is None or "txt" not in sample:
            continue
        pairs.append((sample["__key__"], image.convert("RGB"), sample["txt"].strip()))
        if len(pairs) == limit:
            break
    if len(pairs) < 2:
        raise SystemExit(f"error: {shards} holds {len(pairs)} image-caption samples; need at least 2")
    return pairs


def main(argv: list[str] | None = None) -> int:
    """``tools/explain.py``: decodes, prints and scores the split; the exit status (2 for bad arguments)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a lightning fit checkpoint (or use --model)")
    parser.add_argument("--model", type=Path, help="a folder exported with tools/export.py --with-decoder")
    parser.add_argument("--shards", type=Path, required=True, help="folder of image-caption .tar shards")
    parser.add_argument("-n", type=positive_int, default=64, help="images to explain (default 64)")
    parser.add_argument("--max-tokens", type=positive_int, default=32, help="most tokens a text (default 32)")
    parser.add_argument(
        "--instruction",
        default=None,
        help="query instruction (default: the training run's, from the checkpoint or folder)",
    )
    parser.add_argument("--show", type=int, default=8, help="pairs to print (default 8)")
    parser.add_argument("--json", type=Path, default=None, help="write the texts and scores here")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.model is None):
        parser.error("give one of --checkpoint and --model")

    from lame_pl.embedder import LaMEEmbedder
    from lame_pl.latent_text import overlap_rows

    if args.checkpoint is not None:
        embedder = LaMEEmbedder.from_checkpoint(args.checkpoint, device="cpu")
    else:
        embedder = LaMEEmbedder.from_pretrained(args.model, device="cpu")
    instruction = args.instruction
    if instruction is None:  # images laid out as the training run laid out its queries
        instruction = embedder.trained_instructions.get("query", "")
    pairs = read_pairs(args.shards, args.n)
    texts = embedder.explain(
        images=[image for _, image, _ in pairs], instructions=instruction, max_tokens=args.max_tokens
    )
    captions = [caption for _, _, caption in pairs]
    rows = overlap_rows(texts, captions)
    n = len(rows)
    differences = [own - chance for own, chance in rows]
    mean = sum(differences) / n
    se = (sum((d - mean) ** 2 for d in differences) / (n - 1) / n) ** 0.5
    scores = {
        "word_f1": sum(own for own, _ in rows) / n,
        "chance_word_f1": sum(c for _, c in rows) / n,
        "difference": mean,
        "difference_se": se,
        "distinct_texts": len(set(texts)),
    }
    for (key, _, caption), text in list(zip(pairs, texts, strict=True))[: args.show]:
        print(f"{key}: caption {caption!r}\n{' ' * len(key)}  decoded {text!r}")
    print(
        f"{n} images: word F1 with their own caption {scores['word_f1']:.3f}, with the other captions "
        f"(chance) {scores['chance_word_f1']:.3f}; difference {mean:.4f} +- {se:.4f} (standard error, paired); "
        f"{scores['distinct_texts']} distinct texts"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    **scores,
                    "count": len(pairs),
                    "instruction": instruction,
                    "max_tokens": args.max_tokens,
                    "rows": [{"key": k, "caption": c, "decoded": t} for (k, _, c), t in zip(pairs, texts, strict=True)],
                },
                indent=1,
            )
        )
    return 0
