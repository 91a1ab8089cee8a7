"""One loader API, two engines (DALI, torch): `build_loader(source, ...)` -> iterable of `Batch`.

The engines share the epoch plan and decoding rules of loader.py; this module only picks one
(its own module, so that the DALI engine, which builds on loader.py, is imported only here).
"""
from __future__ import annotations

import os

import torch

from .loader import Loader, TorchLoader
from .sources import Manifest, open_source


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _dali_cpu_resize() -> bool:
    """Whether the DALI engine's CPU resize operator (abd_fast/data/dali_resize.cc) builds and
    loads here: without it DALI on CPU is slower than the torch engine."""
    from .dali import resize_plugin
    return resize_plugin()


def build_loader(source, *, train: bool, batch_size: int, image_size: int,
                 loader: str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, classnames=None, bad_threshold: float = 0.01,
                 non_rgb: str = "convert", crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 flip: bool = True, image_key: str | None = None,
                 caption_key: str | None = None, label_key: str = "label",
                 delimiter: str | None = None) -> Loader:
    """Loader over a caption or evaluation data source, yielding `Batch`es.

    source: path of a caption CSV, labels CSV, WebDataset shards (brace pattern, .tar or
    directory of .tar) or ImageFolder (see `abd_fast.data.sources`), or a `Manifest`.
    train: random resized crop (scale `crop_scale`, aspect `crop_ratio`) + horizontal flip,
    reshuffled per epoch, whole batches only; else center crop, listing order, every sample.
    Images: uint8 [B, 3, image_size, image_size]. loader: "dali" (the default where DALI is
    installed and either a GPU is there or, on CPU, our resize operator builds: 1.3-1.8x the
    torch engine's images/s on 2 cores, docs/PERFORMANCE.md) or "torch" (PIL + DataLoader
    workers; the default otherwise).
    rank/world_size: this process's share (disjoint; together complete up to the train tail).
    bad_threshold: fraction of unusable samples above which BadDataError is raised.
    non_rgb: "convert" (the default) L/LA/RGBA/P/PA/CMYK/1/I;16 images to RGB as open_clip
    and img2dataset do (`loader.to_rgb`; `converted` counts them), or "skip" them as bad
    samples.
    image_key / caption_key / delimiter: a CSV/TSV's columns and separator, found from its
    header when None (`abd_fast.data.sources.open_source`).
    """
    if loader is None:  # DALI's own CPU resize is slower than Pillow's (docs/PERFORMANCE.md)
        loader = "dali" if _dali_available() and (torch.cuda.is_available()
                                                  or _dali_cpu_resize()) else "torch"
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    manifest = source if isinstance(source, Manifest) else open_source(
        source, classnames=classnames, image_key=image_key, caption_key=caption_key,
        label_key=label_key, delimiter=delimiter)
    kw = dict(train=train, batch_size=batch_size, image_size=image_size, seed=seed, rank=rank,
              world_size=world_size, num_workers=num_workers, bad_threshold=bad_threshold,
              non_rgb=non_rgb, crop_scale=crop_scale, crop_ratio=crop_ratio, flip=flip)
    if loader == "torch":
        return TorchLoader(manifest, **kw)
    if loader == "dali":
        if not _dali_available():
            raise ImportError("loader='dali' needs NVIDIA DALI (pip install "
                              "nvidia-dali-cuda130, see requirements.txt); or use loader='torch'")
        from .dali import DaliLoader
        return DaliLoader(manifest, **kw)
    raise ValueError(f"loader must be 'dali' or 'torch', not {loader!r}")
