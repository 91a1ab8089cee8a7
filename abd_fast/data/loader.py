"""The engine-independent part of the loaders and the torch engine (`TorchLoader`); the DALI
engine is data/dali.py, and `build_loader` (data/build.py) chooses between them.

Both engines run the same *epoch plan*, computed here from (seed, epoch) alone: which
usable samples, in which order, split over ranks, and for each sample its crop box (in
source pixels) and flip. The engines only decode, crop, resize (bicubic, antialiased) and
flip, so they yield the same samples in the same batches, and nothing depends on the
number of workers. See docs/DATA.md.
"""
from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .sources import Manifest
from .validate import CONVERTIBLE, validate

log = logging.getLogger("abd_fast.data")


@dataclass
class Batch:
    """A batch of samples.

    images: uint8 [B, 3, H, W] (RGB, not normalized); ids: int64 [B], stable sample ids;
    captions: B raw strings (caption data) or None; labels: int64 [B] (evaluation data) or
    None."""
    images: torch.Tensor
    ids: torch.Tensor
    captions: list[str] | None = None
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())


class BadDataError(RuntimeError):
    """Too many unusable samples in a source."""


@dataclass
class BatchPlan:
    """One batch of the epoch plan: manifest indices, crop boxes (x, y, w, h) in source
    pixels, horizontal flips."""
    positions: np.ndarray   # int64 [b]
    boxes: np.ndarray       # int64 [b, 4]
    flips: np.ndarray       # bool [b]


def random_resized_crop_boxes(rng, width, height, scale, ratio, attempts: int = 10):
    """torchvision's RandomResizedCrop.get_params, vectorized over samples: int64 [n, 4]
    boxes (x, y, w, h). width/height: int64 [n] source sizes."""
    n = len(width)
    W, H = width.astype(np.float64), height.astype(np.float64)
    area = W * H
    target = area * rng.uniform(scale[0], scale[1], (attempts, n))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (attempts, n)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = ok.argmax(0)
    cols = np.arange(n)
    w, h, found = w[first, cols], h[first, cols], ok[first, cols]
    # Fallback (no attempt fits): the whole image, aspect clamped to `ratio`, centered.
    in_ratio = W / np.maximum(H, 1)
    fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.round(H * ratio[1]), W))
    fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]),
                  np.where(in_ratio > ratio[1], H, H))
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    u, v = rng.random(n), rng.random(n)
    x = np.where(found, np.floor(u * (W - w + 1)), np.floor((W - w) / 2))
    y = np.where(found, np.floor(v * (H - h + 1)), np.floor((H - h) / 2))
    return np.stack([x, y, w, h], 1).astype(np.int64)


def center_square_boxes(width, height):
    """The centered square of side min(w, h): int64 [n, 4] (x, y, w, h). Resizing it to S x S
    is CLIP's eval transform (resize shorter side to S, center crop S)."""
    side = np.minimum(width, height)
    return np.stack([(width - side) // 2, (height - side) // 2, side, side], 1).astype(np.int64)


def to_rgb(im):
    """A PIL image as RGB, as DALI's decoder does it: alpha dropped, palette and grey levels
    expanded, CMYK converted; 16-bit grey (I;16, or I from older Pillow) scaled to 8 bits by
    round(v / 257), where PIL's own convert("RGB") would clip every value above 255 to white."""
    from PIL import Image
    if im.mode in ("I;16", "I"):
        v = np.asarray(im).astype(np.int64).clip(0, 65535)
        im = Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode_sample(data: bytes, box, flip: bool, size: int) -> np.ndarray:
    """PIL path: decode, convert to RGB (`to_rgb`), crop `box` (x, y, w, h), bicubic resize to
    size x size, flip. Returns uint8 [3, size, size]."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        im = to_rgb(im)
        x, y, w, h = (int(v) for v in box)
        im = im.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im).transpose(2, 0, 1)


def decode_batch(manifest: Manifest, plan: BatchPlan, size: int):
    """Decode one planned batch with PIL. Returns (uint8 [b', 3, S, S] tensor, int64 [b']
    positions that decoded, [(position, reason)] for those that did not)."""
    out = np.empty((len(plan.positions), 3, size, size), np.uint8)
    ok, bad = [], []
    for i, box, flip in zip(plan.positions.tolist(), plan.boxes, plan.flips):
        try:
            out[len(ok)] = decode_sample(manifest.read(i), box, bool(flip), size)
            ok.append(i)
        except Exception as e:  # noqa: BLE001 - the data changed after validation
            bad.append((i, f"failed at load time ({type(e).__name__}: {str(e)[:60]})"))
    return torch.from_numpy(out[:len(ok)]), torch.tensor(ok, dtype=torch.int64), bad


class Loader:
    """Common part of the engines: the epoch plan, batches assembly, bad-sample report.

    Iterate for `Batch`es; `len()` is the number of batches of this rank in an epoch;
    `set_epoch(e)` reshuffles with (seed, e); `classnames` for evaluation data;
    `bad_samples` / `report()` describe the samples skipped in the last epoch, `converted`
    ({mode: count}) the non-RGB images of the current epoch's plan (all ranks) converted to
    RGB."""
    engine = "?"

    def __init__(self, manifest: Manifest, *, train: bool, batch_size: int, image_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 bad_threshold: float = 0.01, non_rgb: str = "convert",
                 crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3), flip: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if non_rgb not in ("skip", "convert"):
            raise ValueError("non_rgb must be 'skip' or 'convert'")
        self.manifest, self.train, self.batch_size = manifest, train, batch_size
        self.image_size, self.seed, self.rank, self.world_size = image_size, seed, rank, world_size
        self.num_workers, self.bad_threshold = num_workers, bad_threshold
        self.crop_scale, self.crop_ratio, self.flip = crop_scale, crop_ratio, flip
        self.epoch, self.start_batch = 0, 0
        checked = validate(manifest, num_workers)
        self.width, self.height = checked.width, checked.height
        self._invalid = {}
        # Mode of each sample as an index into _modes (0 = RGB), to count conversions.
        self._modes = ["RGB"] + sorted(set(checked.modes) - {"RGB"})
        code = {m: k for k, m in enumerate(self._modes)}
        self._mode_index = np.asarray([code[m] for m in checked.modes], np.int64)
        for i, (reason, mode) in enumerate(zip(checked.reasons, checked.modes)):
            if not reason and mode != "RGB" and not (non_rgb == "convert" and mode in CONVERTIBLE):
                reason = f"non-RGB image (mode {mode})"
            if reason:
                self._invalid[i] = reason
        self.converted: dict[str, int] = {}
        self.usable = np.asarray([i for i in range(len(manifest)) if i not in self._invalid],
                                 np.int64)
        self.bad_samples: list[tuple[int, str]] = self._named(self._invalid.items())
        self._check_threshold(self.bad_samples)
        if train and len(self.usable) < batch_size * world_size:
            raise ValueError(f"{manifest.source}: {len(self.usable)} usable samples, fewer than "
                             f"one batch per rank ({batch_size} x {world_size})")

    # -- public --------------------------------------------------------------------------
    @property
    def classnames(self) -> list[str] | None:
        return self.manifest.classnames

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return self._count()

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Reshuffle (train) with (seed, epoch); call before iterating epoch `epoch`.
        start_batch: skip the first start_batch planned batches of that epoch without decoding
        them (resuming mid-epoch: the plan depends on (seed, epoch) only)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        n = self._count()
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        plan = self.plan()[self.start_batch:]
        runtime_bad: list[tuple[int, str]] = []
        m = self.manifest
        for images, positions, bad in self._decoded(plan):
            runtime_bad += bad
            if len(positions) == 0:
                continue
            pos = positions.numpy()
            yield Batch(images=images, ids=torch.from_numpy(m.ids[pos]),
                        captions=[m.captions[i] for i in pos] if m.captions is not None else None,
                        labels=torch.from_numpy(m.labels[pos]) if m.labels is not None else None)
        self.bad_samples = self._named(self._invalid.items()) + self._named(runtime_bad)
        if self.rank == 0 and (self.bad_samples or self.converted):
            (log.warning if self.bad_samples else log.info)(self.report(limit=20))
        self._check_threshold(self.bad_samples)

    @property
    def epoch_stats(self) -> dict[str, int]:
        """For an end-of-epoch summary: samples skipped (this rank's last epoch, as in
        `report()`) and images converted to RGB (the epoch, all ranks)."""
        return {"skipped": len(self.bad_samples), "converted": sum(self.converted.values())}

    def report(self, limit: int | None = None) -> str:
        """Summary of the last epoch: the non-RGB images converted to RGB (counts per mode),
        the samples skipped (counts per reason, then one line per sample, id: reason, the
        first `limit` of them; all by default)."""
        lines = []
        if self.converted:
            lines.append(f"{self.manifest.source}: converted {sum(self.converted.values())} "
                         f"non-RGB images to RGB (epoch {self.epoch}; "
                         + ", ".join(f"{n} {m}" for m, n in sorted(self.converted.items()))
                         + ")")
        if not self.bad_samples:
            return "\n".join(lines + [f"{self.manifest.source}: no bad samples"])
        counts = Counter(r.split(" (")[0] for _, r in self.bad_samples)
        lines += [f"{self.manifest.source}: skipped {len(self.bad_samples)} of "
                  f"{len(self.manifest)} samples (epoch {self.epoch}; "
                  + ", ".join(f"{n} {r}" for r, n in counts.most_common()) + ")"]
        lines += [f"  id {i}: {r}" for i, r in self.bad_samples[:limit]]
        if limit is not None and len(self.bad_samples) > limit:
            lines.append(f"  ... {len(self.bad_samples) - limit} more in loader.bad_samples")
        return "\n".join(lines)

    def plan(self) -> list[BatchPlan]:
        """This rank's batches for the current epoch (see the module docstring). Also sets
        `converted`, the non-RGB images among the epoch's samples of all ranks."""
        order = self.usable
        W, H = self.width[order], self.height[order]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(len(order))
            order, W, H = order[perm], W[perm], H[perm]
            boxes = random_resized_crop_boxes(rng, W, H, self.crop_scale, self.crop_ratio)
            flips = rng.random(len(order)) < 0.5 if self.flip else np.zeros(len(order), bool)
            # Global batches of world_size x batch_size in plan order; rank r takes part r of
            # each, so batch k of every rank together is batch k of a one-process run with
            # the global batch size (same samples, crops and flips).
            G, n_global = self.world_size * self.batch_size, len(order) // (
                self.world_size * self.batch_size)
            self._count_converted(order[:n_global * G])
            pick = (np.arange(n_global)[:, None] * G + self.rank * self.batch_size
                    + np.arange(self.batch_size)[None, :]).reshape(-1)
            order, boxes, flips = order[pick], boxes[pick], flips[pick]
            sl = slice(None)
        else:
            self._count_converted(order)
            boxes = center_square_boxes(W, H)
            flips = np.zeros(len(order), bool)
            bounds = np.linspace(0, len(order), self.world_size + 1).astype(np.int64)
            sl = slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))
        order, boxes, flips = order[sl], boxes[sl], flips[sl]
        B = self.batch_size
        stop = len(order) - len(order) % B if self.train else len(order)
        return [BatchPlan(order[k:k + B], boxes[k:k + B], flips[k:k + B])
                for k in range(0, stop, B)]

    # -- internals -----------------------------------------------------------------------
    def _count_converted(self, positions):
        counts = np.bincount(self._mode_index[positions], minlength=len(self._modes))
        self.converted = {m: int(c) for m, c in zip(self._modes[1:], counts[1:]) if c}

    def _count(self) -> int:
        n, W, B = len(self.usable), self.world_size, self.batch_size
        if self.train:  # equal whole batches on every rank (DDP); the tail changes per epoch
            return n // (W * B) * B
        bounds = np.linspace(0, n, W + 1).astype(np.int64)
        return int(bounds[self.rank + 1] - bounds[self.rank])

    def _named(self, items) -> list[tuple[int, str]]:
        return [(int(self.manifest.ids[i]), r) for i, r in sorted(items)]

    def _check_threshold(self, bad):
        n = len(self.manifest)
        if n == 0:
            raise BadDataError(f"data source {self.manifest.source!r} has no samples")
        if len(bad) / n > self.bad_threshold:
            counts = Counter(r.split(" (")[0] for _, r in bad)
            examples = "; ".join(f"id {i}: {r}" for i, r in bad[:5])
            raise BadDataError(
                f"data source {self.manifest.source!r}: {len(bad)} of {n} samples "
                f"({100 * len(bad) / n:.1f}%) are unusable, above the threshold of "
                f"{100 * self.bad_threshold:g}% ("
                + ", ".join(f"{c} {r}" for r, c in counts.most_common())
                + f"). First: {examples}. Fix the data or raise bad_threshold.")

    def _decoded(self, plan):
        raise NotImplementedError


class _PlanSampler:
    """Feeds the current epoch's plan to a (persistent-worker) DataLoader."""
    def __init__(self):
        self.plan: list[BatchPlan] = []

    def __iter__(self):
        return iter(self.plan)

    def __len__(self):
        return len(self.plan)


class _PlanDataset(torch.utils.data.Dataset):
    def __init__(self, manifest, size):
        self.manifest, self.size = manifest, size

    def __getitem__(self, plan: BatchPlan):
        return decode_batch(self.manifest, plan, self.size)


def _worker_init(_):
    torch.set_num_threads(1)


class TorchLoader(Loader):
    """PIL decoding in DataLoader worker processes, one planned batch per work item. The
    plan carries all randomness, so the output does not depend on num_workers."""
    engine = "torch"

    def __init__(self, manifest, **kw):
        super().__init__(manifest, **kw)
        self._sampler = _PlanSampler()
        self._dl = torch.utils.data.DataLoader(
            _PlanDataset(manifest, self.image_size), batch_size=None, sampler=self._sampler,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            worker_init_fn=_worker_init if self.num_workers > 0 else None,
            # Its own generator: iterating never draws from the global torch RNG, which the
            # training stages own (exact resume restores it; the plan carries all randomness).
            generator=torch.Generator().manual_seed(self.seed),
            prefetch_factor=2 if self.num_workers > 0 else None)

    def _decoded(self, plan):
        self._sampler.plan = plan
        yield from self._dl
