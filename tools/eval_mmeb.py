"""Evaluate a LaME checkpoint on MMEB-v2 from a local folder.

    python tools/eval_mmeb.py --checkpoint runs/x/checkpoints/last.ckpt --data-root /data/MMEB-v2 \
        --output-dir runs/x/mmeb [--tasks ImageNet-1K ViDoRe_arxivqa] [--device cuda] [--batch-size 32]

Hit@1 for image and video tasks, nDCG@5 (linear gain) for visual-document tasks; one JSON per task
under OUTPUT_DIR/<modality>/, summary.json and a table per group, modality and overall. Each figure
is printed twice: official (the benchmark's own scorer: VLM2Vec's evaluation code; quote this one)
and strict (the project's rules: ties against the query, duplicate candidates merged); a gap of 5
points or more is flagged with '!'. Embeddings are cached (OUTPUT_DIR/cache by default), so a re-run
only scores. The folder layout is described in lame_pl/evaluation/mmeb.py and the README ("MMEB-v2
and MRMR on disk"); `python tools/eval_mmeb.py --list-tasks` prints every accepted task with its
group and metric.

A CLIP anchor checkpoint (configs/demo/clip.yaml) is evaluated the same way: the tool reads the
model class the checkpoint stores and embeds through lame_pl/evaluation/clip_encoder.py.
"""

from lame_pl.evaluation.run import main

if __name__ == "__main__":
    main("mmeb")
