"""Data layer: caption data (CSV, WebDataset), evaluation data (ImageFolder, labels CSV),
two decoding engines (DALI, torch) behind one API, and the synthetic demo dataset.

    from abd_fast.data import build_loader
    loader = build_loader("shards/{00000..00009}.tar", train=True, batch_size=128, image_size=224)
    for batch in loader:          # Batch(images uint8 [B,3,H,W], ids int64 [B], captions, labels)
        ...

Formats, sample ids, the bad-data policy and the DALI design: docs/DATA.md.
"""
from .build import build_loader
from .loader import Batch, BadDataError, Loader
from .sources import Manifest, open_source

__all__ = ["Batch", "BadDataError", "Loader", "Manifest", "build_loader", "open_source"]
