"""Search an index built by ``tools/index.py``: with predicted query embeddings, a text or an image.

    python tools/search.py --index runs/demo/index --queries runs/demo/embeddings [-k 5] [--json]
    python tools/search.py --index runs/demo/index --checkpoint CKPT --text "a red circle" [-k 5]
    python tools/search.py --index runs/demo/index --checkpoint CKPT --image scene.png [--instruction "..."]

What each way of querying prints and which instruction a free query gets: ``lame_pl/search.py``.
"""

from lame_pl.search import main

if __name__ == "__main__":
    main()
