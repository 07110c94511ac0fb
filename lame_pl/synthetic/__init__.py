"""Synthetic image-caption data: the demo's scenes (``scenes``) and compositional contrast groups (``tasks``).

``tools/make_shards.py synthetic`` writes them as shards; the tests draw them directly.
"""
