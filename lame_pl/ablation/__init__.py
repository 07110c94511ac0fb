"""The quality ablation of the encode modes (``tools/ablate_modes.py``; its options: ``cli``).

``spec`` names the rows and the set, ``data`` writes and reads the compositional shards,
``runs`` trains, predicts and times each row through the project's command line, ``scoring``
turns a row's test embeddings into per-kind recall, ``report`` writes the table.
"""
