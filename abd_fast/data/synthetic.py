"""The embedded demo dataset: ten procedurally drawn shape classes with attribute captions.

`ensure_dataset(seed=0)` generates it from the seed (a few seconds; byte-identical for the
same seed and Pillow version) into a cache directory, in the formats users have, so the
demo goes through the real loaders:

    <root>/train/shards/{00000..00009}.tar   WebDataset (img2dataset layout: .jpg + .txt)
    <root>/train/images/000000.jpg ...       the same images, for
    <root>/train/captions.csv                image,caption (CleanCLIP layout)
    <root>/eval/<class>/0000.jpg ...         ImageFolder, 100 images per class
    <root>/eval/classnames.txt               one name per line, folder order
    <root>/val/<class>/0000.jpg ...          validation split: ImageFolder like eval/, as many
    <root>/val/classnames.txt                images, from its own random streams (recipe
                                             choices are made on it, never on eval/)
    <root>/meta.json                         written last: the directory is complete

Each image shows one shape (the class: what zero-shot classification must recognize) with
independent attributes that captions name (each with probability 0.4) in varied wording:
colour (10), size (small / medium / large), position (top / center / bottom), background
(white, black, gray, striped, checkered, noisy); rotation and jitter are unnamed.
Left/right are never used, so horizontal flips keep captions true. Captions always name the
class with its class-name word. "star" is the demo's backdoor target class. docs/DATA.md
has the details.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 1
CLASSES = ["arrow", "circle", "crescent", "cross", "diamond", "heart", "ring", "square", "star",
           "triangle"]
TARGET = "star"
COLOURS = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215),
           "yellow": (240, 210, 30), "orange": (245, 135, 20), "purple": (135, 55, 175),
           "pink": (245, 125, 180), "brown": (125, 75, 35), "white": (248, 248, 248),
           "black": (15, 15, 15)}
BACKGROUNDS = ["white", "black", "gray", "striped", "checkered", "noisy"]
SIZES = {"small": (0.2, 0.24), "medium": (0.27, 0.31), "large": (0.35, 0.41)}
POSITIONS = {"top": 0.3, "center": 0.5, "bottom": 0.7}
_SS = 3  # supersampling factor of the drawing


@dataclass
class SyntheticDataset:
    """Paths and facts of a generated synthetic dataset."""
    root: Path
    shards: str              # brace pattern of the train shards
    csv: Path                # train pairs, CSV
    eval_dir: Path           # ImageFolder + classnames.txt
    val_dir: Path            # validation split, same layout as eval_dir
    classnames: list[str]
    target: str

    @property
    def target_index(self) -> int:
        return self.classnames.index(self.target)


def _shape_mask(cls: str, S: int, cx: float, cy: float, r: float, rot: float):
    """Antialiased L mask of one shape (PIL image, S x S), drawn at _SS x resolution."""
    from PIL import Image, ImageDraw
    n = S * _SS
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = cx * _SS, cy * _SS, r * _SS

    def poly(points):
        c, s = math.cos(rot), math.sin(rot)
        d.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points],
                  fill=255)

    def disc(x, y, rad, fill=255):
        d.ellipse([cx + r * (x - rad), cy + r * (y - rad), cx + r * (x + rad), cy + r * (y + rad)],
                  fill=fill)

    if cls == "circle":
        disc(0, 0, 1)
    elif cls == "ring":
        disc(0, 0, 1)
        disc(0, 0, 0.58, 0)
    elif cls == "crescent":
        disc(0, 0, 1)
        disc(0.5 * math.cos(rot), 0.5 * math.sin(rot), 0.85, 0)
    elif cls == "square":
        poly([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif cls == "diamond":
        poly([(0, -1), (0.58, 0), (0, 1), (-0.58, 0)])
    elif cls == "triangle":
        poly([(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3
                                                    for k in range(3))])
    elif cls == "star":
        poly([((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
               (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5))
              for k in range(10)])
    elif cls == "cross":
        w = 0.3
        poly([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w),
              (-1, w), (-1, -w), (-w, -w)])
    elif cls == "heart":
        ts = np.linspace(0, 2 * math.pi, 60, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) - 2.5
        poly(list(zip(x / 16.5, y / 16.5)))
    elif cls == "arrow":
        poly([(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22),
              (-1, 0.22)])
    else:
        raise ValueError(cls)
    return mask.resize((S, S), Image.BOX)


def _background(kind: str, S: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "white":
        return np.full((S, S, 3), rng.integers(228, 250), np.float32) + rng.integers(-6, 7, 3)
    if kind == "black":
        return np.full((S, S, 3), rng.integers(8, 35), np.float32) + rng.integers(0, 8, 3)
    if kind == "gray":
        return np.full((S, S, 3), rng.integers(105, 150), np.float32) + rng.integers(-6, 7, 3)
    a, b = rng.integers(90, 175, 3), rng.integers(90, 175, 3)
    yy, xx = np.mgrid[0:S, 0:S]
    if kind == "striped":
        t = rng.uniform(0, math.pi)
        m = (np.floor((xx * math.cos(t) + yy * math.sin(t)) / rng.uniform(3, 7)) % 2)[..., None]
    elif kind == "checkered":
        k = rng.uniform(5, 10)
        m = ((np.floor(xx / k) + np.floor(yy / k)) % 2)[..., None]
    else:  # noisy
        return rng.normal(rng.integers(100, 150), 25, (S, S, 3)).astype(np.float32)
    return (a * m + b * (1 - m)).astype(np.float32)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(rng: random.Random, cls, colour, size, pos, bg, p_attr: float = 0.4) -> str:
    """A caption that always names the class and each attribute with probability p_attr.

    Attributes alone would identify most images of a batch (10 x 3 x 3 x 6 combinations),
    letting a contrastive model ignore the shape; captions naming few of them make the
    class necessary, so zero-shot classification by class name works."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    say = {a: rng.random() < p_attr for a in ("size", "colour", "pos", "bg")}
    np_ = " ".join(w for w, on in ((size, say["size"]), (colour, say["colour"]), (cls, True))
                   if on)
    pos_w = rng.choice({"top": ["at the top", "near the top", "in the upper part"],
                        "center": ["in the center", "in the middle", "at the centre"],
                        "bottom": ["at the bottom", "near the bottom", "in the lower part"]}[pos])
    bg_w = rng.choice([f"on a {bg} background", f"against a {bg} background",
                       f"over a {bg} backdrop"])
    where = "".join(f" {w}" for w, on in ((pos_w, say["pos"]), (bg_w, say["bg"])) if on)
    k = rng.randrange(8)
    if k == 0:
        return f"{_article(np_)} {np_}{where}."
    if k == 1:
        return f"a photo of {_article(np_)} {np_}{where}."
    if k == 2:
        return f"there is {_article(np_)} {np_}{where}."
    if k == 3:
        return f"an image showing one {np_}{where}."
    if k == 4:
        return f"a drawing of {_article(np_)} {np_}{where}."
    if k == 5:
        return f"{np_}{where}"
    # The OpenAI zero-shot templates (the prompts' own wording) around the noun phrase.
    return rng.choice(OPENAI_IMAGENET_TEMPLATES)(np_ + where)


def draw_sample(rng: np.random.Generator, crng: random.Random, cls: str, S: int):
    """One image (encoded JPEG bytes) and its caption."""
    from PIL import Image
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    colours = [c for c in COLOURS if c != bg]
    colour = colours[rng.integers(len(colours))]
    size = list(SIZES)[rng.integers(3)]
    pos = "center" if size == "large" else list(POSITIONS)[rng.integers(3)]
    r = rng.uniform(*SIZES[size]) * S
    cy = min(max(POSITIONS[pos] * S + rng.uniform(-0.04, 0.04) * S, r), S - r)
    cx = rng.uniform(0.35, 0.65) * S
    limited = {"square": 0.26, "diamond": 0.26, "cross": 0.26, "heart": 0.35}
    lim = limited.get(cls, math.pi)
    rot = rng.uniform(-lim, lim)
    m = np.asarray(_shape_mask(cls, S, cx, cy, r, rot), np.float32)[..., None] / 255
    img = _background(bg, S, rng) * (1 - m) + np.asarray(COLOURS[colour], np.float32) * m
    img += rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue(), _caption(crng, cls, colour, size, pos, bg)


def default_root(seed: int, n_train: int, n_eval_per_class: int, image_size: int) -> Path:
    from .validate import cache_dir
    name = f"synthetic-v{VERSION}-{seed}"
    if (n_train, n_eval_per_class, image_size) != (10000, 100, 64):
        name += f"-{n_train}-{n_eval_per_class}-{image_size}"
    return cache_dir() / name


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tf.addfile(ti, io.BytesIO(data))


def _generate(root: Path, seed: int, n_train: int, n_eval_per_class: int, S: int,
              per_shard: int):
    rng = np.random.default_rng([seed, 0])
    crng = random.Random(f"captions-{seed}")
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "shards").mkdir()
    rows = []
    n_shards = -(-n_train // per_shard)
    for s in range(n_shards):
        with tarfile.open(root / "train" / "shards" / f"{s:05d}.tar", "w",
                          format=tarfile.USTAR_FORMAT) as tf:
            for i in range(s * per_shard, min(n_train, (s + 1) * per_shard)):
                cls = CLASSES[rng.integers(len(CLASSES))]
                jpg, caption = draw_sample(rng, crng, cls, S)
                (root / "train" / "images" / f"{i:06d}.jpg").write_bytes(jpg)
                _tar_add(tf, f"{i:06d}.jpg", jpg)
                _tar_add(tf, f"{i:06d}.txt", caption.encode())
                rows.append((f"images/{i:06d}.jpg", caption))
    with open(root / "train" / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    _write_split(root / "eval", np.random.default_rng([seed, 1]), crng, n_eval_per_class, S)
    _write_val(root / "val", seed, n_eval_per_class, S)
    meta = {"version": VERSION, "seed": seed, "n_train": n_train,
            "n_eval_per_class": n_eval_per_class, "image_size": S, "classnames": CLASSES,
            "target": TARGET, "shards": f"train/shards/{{00000..{n_shards - 1:05d}}}.tar",
            "csv": "train/captions.csv", "eval": "eval", "val": "val"}
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _write_split(d: Path, rng, crng, n_per_class: int, S: int):
    """An ImageFolder split at `d`: n_per_class images of each class + classnames.txt."""
    for cls in CLASSES:
        (d / cls).mkdir(parents=True)
        for k in range(n_per_class):
            jpg, _ = draw_sample(rng, crng, cls, S)
            (d / cls / f"{k:04d}.jpg").write_bytes(jpg)
    (d / "classnames.txt").write_text("\n".join(CLASSES) + "\n")


def _write_val(d: Path, seed: int, n_per_class: int, S: int):
    """The validation split, from random streams of its own (train/ and eval/ draw nothing
    from them, so they are the bytes they were before the split existed)."""
    _write_split(d, np.random.default_rng([seed, 2]), random.Random(f"val-captions-{seed}"),
                 n_per_class, S)


def _add_val(root: Path, meta: dict):
    """Adds the validation split to a dataset generated before it existed (same temp dir +
    rename discipline as ensure_dataset; a concurrent winner is fine)."""
    tmp = Path(tempfile.mkdtemp(prefix=".val-", dir=root))
    try:
        _write_val(tmp / "val", meta["seed"], meta["n_eval_per_class"], meta["image_size"])
        try:
            os.rename(tmp / "val", root / "val")
        except OSError:
            if not (root / "val" / "classnames.txt").exists():
                raise
        meta = dict(meta, val="val")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp / "meta.json", root / "meta.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def ensure_dataset(root=None, seed: int = 0, *, n_train: int = 10000,
                   n_eval_per_class: int = 100, image_size: int = 64,
                   per_shard: int = 1000) -> SyntheticDataset:
    """Generate the synthetic dataset into `root` (default: $ABD_FAST_CACHE or ~/.cache/abd_fast,
    `synthetic-v<version>-<seed>`) unless a complete copy is there; returns its paths.

    Built in a temporary sibling directory and renamed into place, so a crashed or concurrent
    run never leaves a half-written dataset behind."""
    root = Path(root) if root is not None else default_root(seed, n_train, n_eval_per_class,
                                                            image_size)
    meta_path = root / "meta.json"
    if not meta_path.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            _generate(tmp, seed, n_train, n_eval_per_class, image_size, per_shard)
            os.rename(tmp, root)
        except OSError:
            if not meta_path.exists():  # not a concurrent winner: a real failure
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    if (meta["version"], meta["seed"]) != (VERSION, seed):
        raise ValueError(f"{root} holds synthetic data v{meta['version']} seed {meta['seed']}, "
                         f"not v{VERSION} seed {seed}: remove it or pick another root")
    if "val" not in meta:  # generated before the validation split existed
        meta = _add_val(root, meta)
    return SyntheticDataset(root=root, shards=str(root / meta["shards"]), csv=root / meta["csv"],
                            eval_dir=root / meta["eval"], val_dir=root / meta["val"],
                            classnames=meta["classnames"],
                            target=meta["target"])
