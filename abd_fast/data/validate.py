"""The validation pass: every image is decoded once with PIL before any engine sees it.

DALI's decoders abort the whole pipeline on one corrupt image, so the DALI engine can only
skip bad samples that are known in advance; the torch engine uses the same result so both
engines see the same samples. The pass decodes JPEGs at 1/8 scale (the whole entropy-coded
stream is still read, so truncation and corruption are caught, ~10x faster than a full
decode), runs on `num_workers` processes and is cached in `<cache>/index/`, keyed by the
source's fingerprint (listing, CSV and shard sizes and mtimes).
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("abd_fast.data")

CACHE_VERSION = 1
FORMATS = ("JPEG", "PNG", "WEBP")
# Modes that `non_rgb="convert"` turns into RGB (loader.to_rgb); PIL and DALI agree on these
# exactly. I;16: a 16-bit grey PNG (mode I in older Pillow).
CONVERTIBLE = ("L", "LA", "RGBA", "RGBX", "P", "PA", "CMYK", "1", "I;16", "I")


def cache_dir() -> Path:
    """$ABD_FAST_CACHE, else ~/.cache/abd_fast."""
    return Path(os.environ.get("ABD_FAST_CACHE") or Path.home() / ".cache" / "abd_fast")


def cached_json(name: str, compute):
    """`compute()` (JSON-serializable), cached as <cache>/index/<name>.json; written atomically."""
    path = cache_dir() / "index" / f"{name}.json"
    try:
        payload = json.loads(path.read_text())
        if payload.get("version") == CACHE_VERSION:
            return payload["value"]
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "value": value}, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs the re-validation
        log.warning("abd_fast.data: cannot write the index cache %s (%s)", path, e)
    return value


def check_image(data: bytes) -> tuple[str, str, int, int]:
    """Decode-check encoded image bytes: (reason, mode, width, height); reason "" when the
    image decodes. Only JPEG, PNG and WebP are accepted (what img2dataset writes and DALI
    decodes)."""
    from PIL import Image
    if not data:
        return "zero-byte file", "", 0, 0
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            if fmt not in FORMATS:
                return f"unsupported format {fmt}", mode, w, h
            if fmt == "JPEG":
                im.draft(mode, (1, 1))  # DCT scaling: 1/8 size, every coefficient decoded
            im.load()
    except Image.UnidentifiedImageError:
        return "corrupt image (not a known image format)", "", 0, 0
    except Exception as e:  # noqa: BLE001 - every decoder failure is a bad sample
        msg = str(e)
        if "truncat" in msg.lower():
            return "truncated image", "", 0, 0
        return f"corrupt image ({type(e).__name__}: {msg[:80]})", "", 0, 0
    return "", mode, w, h


def _check_one(manifest, i: int) -> tuple[str, str, int, int]:
    try:
        data = manifest.read(i)
    except FileNotFoundError:
        return "missing file", "", 0, 0
    except OSError as e:
        return f"unreadable file ({e.strerror or e})", "", 0, 0
    except ValueError as e:  # a path the OS cannot take (embedded NUL)
        return f"unreadable path ({e})", "", 0, 0
    return check_image(data)


_WORKER_MANIFEST = None


def _check_chunk(indices):
    return [_check_one(_WORKER_MANIFEST, i) for i in indices]


@dataclass
class Checked:
    """Result of the validation pass for a manifest of N samples."""
    reasons: list[str]     # "" = decodes
    modes: list[str]
    width: np.ndarray      # int64 [N]
    height: np.ndarray     # int64 [N]


def validate(manifest, num_workers: int = 2) -> Checked:
    """Decode-check every sample of `manifest` (cached). Samples whose problem is known from
    the manifest are not decoded."""
    def compute():
        global _WORKER_MANIFEST
        todo = [i for i in range(len(manifest)) if i not in manifest.problems]
        if len(todo) > 2000:
            log.warning("abd_fast.data: validating %d images of %s (once; cached in %s)",
                        len(todo), manifest.source, cache_dir() / "index")
        chunks = [todo[k:k + 256] for k in range(0, len(todo), 256)]
        _WORKER_MANIFEST = manifest
        try:
            if num_workers > 1 and len(todo) > 512:
                import multiprocessing as mp
                with mp.get_context("fork").Pool(num_workers) as pool:
                    results = [r for chunk in pool.imap(_check_chunk, chunks) for r in chunk]
            else:
                results = [r for chunk in chunks for r in _check_chunk(chunk)]
        finally:
            _WORKER_MANIFEST = None
        out = {"reason": {}, "mode": {}, "w": [0] * len(manifest), "h": [0] * len(manifest)}
        for i, (reason, mode, w, h) in zip(todo, results):
            if reason:
                out["reason"][str(i)] = reason
            if mode != "RGB":
                out["mode"][str(i)] = mode
            out["w"][i], out["h"][i] = w, h
        return out

    v = cached_json(f"valid-{manifest.fingerprint}", compute)
    n = len(manifest)
    reasons = [""] * n
    modes = ["RGB"] * n
    for i, r in v["reason"].items():
        reasons[int(i)] = r
    for i, m in v["mode"].items():
        modes[int(i)] = m
    for i, r in manifest.problems.items():
        reasons[i] = r
    return Checked(reasons, modes, np.asarray(v["w"], np.int64), np.asarray(v["h"], np.int64))
