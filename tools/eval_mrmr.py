"""Evaluate a LaME checkpoint on MRMR (knowledge, theorem, design, traffic, negation) from a local folder.

    python tools/eval_mrmr.py --checkpoint runs/x/checkpoints/last.ckpt --data-root /data/MRMR \
        --output-dir runs/x/mrmr [--tasks knowledge negation] [--device cuda]

nDCG@10 (recall@1 for negation) over each subset's whole corpus; one JSON per subset, summary.json
and a table. Each figure is printed twice: official (the benchmark's own scorer: trec_eval as MRMR's
evaluator runs it; quote this one) and strict (the project's rules: ties against the query,
duplicate candidates merged); a gap of 5 points or more is flagged with '!'. Embeddings are cached,
so a re-run only scores. The folder layout is described in lame_pl/evaluation/mrmr.py and the README
("MMEB-v2 and MRMR on disk"); `python tools/eval_mrmr.py --list-tasks` prints every accepted task
with its group and metric.

A CLIP anchor checkpoint (configs/demo/clip.yaml) is evaluated the same way: the tool reads the
model class the checkpoint stores and embeds through lame_pl/evaluation/clip_encoder.py.
"""

from lame_pl.evaluation.run import main

if __name__ == "__main__":
    main("mrmr")
