"""The six backdoor triggers of DESIGN §2, applied on a batch by the fused image op.

    trigger = make_trigger("badnet", image_size=64, seed=0)
    x = trigger.apply(batch.images, batch.ids, rows=poisoned, mean=spec.mean, std=spec.std)

Seeding: every per-sample random choice (patch location, noise patch) is a pure function of
(run seed, sample id), computed by a counter-based hash (`uniform`, splitmix64), so a sample
gets the same trigger in every epoch, worker, rank and batch composition, and the eval
sample with id i gets the trigger of (seed, i). Global fields (blended noise, WaNet grid,
fixed patch) are drawn the same way from the seed alone; SIG has no randomness.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from abd_fast.ops import apply_trigger

ATTACKS = ("badnet", "blended", "wanet", "sig", "label-consistent", "badclip")
LOCATIONS = ("random", "corner", "middle", "four-corners")
MIN_PATCH = 8  # smallest badnet/badclip patch side in pixels (see patch_side)

# Independent random streams of one run (the second key of the hash).
STREAM_LOCATION, STREAM_NOISE, STREAM_FIXED_PATCH, STREAM_BLEND, STREAM_WANET = 1, 2, 3, 4, 5
STREAM_SELECT, STREAM_CAPTION, STREAM_BADCLIP_INIT = 6, 7, 8

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective avalanche on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, stream: int, ids, n: int) -> np.ndarray:
    """float64 [len(ids), n] in [0, 1): value j of sample id = hash(seed, stream, id, j).

    A pure function of its arguments (no generator state), vectorized over ids; the 53 high
    bits of the hash give the mantissa."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _mix(np.uint64(seed & (2 ** 64 - 1)) + _GOLDEN)
        key = _mix(key ^ (np.uint64(stream) * _GOLDEN))
        key = _mix(key[None] ^ ids)                                            # [B]
        counter = (np.arange(n, dtype=np.uint64) + np.uint64(1)) * _GOLDEN     # [n]
        bits = _mix(key[:, None] + counter[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def normal(seed: int, stream: int, ids, n: int) -> np.ndarray:
    """float64 [len(ids), n] standard normal values (Box-Muller on `uniform`)."""
    u = uniform(seed, stream, ids, 2 * n)
    return np.sqrt(-2 * np.log1p(-u[:, :n])) * np.cos(2 * math.pi * u[:, n:])


def patch_side(image_size: int, at_224: int = 16) -> int:
    """16 px at 224 px, scaled with the image size: max(MIN_PATCH, round(16 * S / 224)).

    Scaling keeps the patch's share of the image (0.5% of the area) from ~112 px up. Below
    that the scaled patch is too small to be learned at a random location: the tiny ResNet
    at 32 px averages 4 x 4 pixels in its stem (stride 4), so a 4-px patch is one or a few
    mixed stem cells: with 10% poisons, 4 px reached ASR 60.6% and 8 px 99.1% (same
    clean model and recipe, docs/ATTACKS.md). MIN_PATCH = 8 covers at least one whole
    stem cell (and a whole 8-px token of the tiny ViT's area) wherever it lands."""
    return min(image_size, max(MIN_PATCH, round(at_224 * image_size / 224)))


def load_image(path, size: tuple[int, int], what: str) -> Tensor:
    """An image file as float32 [3, h, w] in [0,1], resized (bicubic) to size = (h, w) if needed."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except OSError as e:
        raise ValueError(f"{what} {path}: not a readable image ({e})") from e
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def load_patch(path) -> Tensor:
    """A saved trigger patch: float32 [3, h, w] in [0,1]. PNG (8-bit RGB, lossless) or a
    torch tensor file (loaded with weights_only=True, so it cannot run code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"patch file {path}: no such file (create it with "
                                "`python -m abd_fast.train badclip-trigger`)")
    if path.suffix.lower() == ".png":
        from PIL import Image
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors alike: say which file and why
        raise ValueError(f"patch file {path}: not a PNG or a tensor file saved with "
                         f"torch.save ({e})") from e
    if isinstance(t, dict) and "patch" in t:
        t = t["patch"]
    if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"patch file {path}: expected a tensor [3, h, w], got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    return t.detach().float().clamp(0, 1)


def save_patch(patch: Tensor, path) -> Tensor:
    """Saves patch [3, h, w] in [0,1] losslessly; returns exactly what load_patch will read.

    .png: quantized to 8 bits first (the saved image *is* the trigger); any other suffix:
    torch.save of the float32 tensor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = patch.detach().float().clamp(0, 1).cpu()
    if path.suffix.lower() == ".png":
        from PIL import Image
        q = (p * 255).round().to(torch.uint8)
        Image.fromarray(q.permute(1, 2, 0).numpy()).save(path, format="PNG")
        return q.float() / 255
    torch.save(p.contiguous(), path)
    return p


class Trigger:
    """One attack's trigger. Every random choice derives from (run seed, sample id) only, so
    a sample gets the same trigger in every epoch, worker and rank (and in eval, the eval
    sample id). Global fields (blended pattern, wanet grid, fixed patch) derive from the seed.

    Subclasses implement `_op(images, ids, rows)` -> (kind, keyword arguments of apply_trigger).
    """
    name: str = "?"

    def __init__(self, name: str, image_size: int, seed: int):
        self.name, self.image_size, self.seed = name, int(image_size), int(seed)

    def apply(self, images: Tensor, ids: Tensor, *, rows: Tensor | None = None, mean=None,
              std=None, out_dtype=torch.float32, backend: str | None = None) -> Tensor:
        """uint8 [B,3,H,W] (or float [0,1]) -> [B,3,H,W] out_dtype: the trigger on `rows`
        (bool [B]; all rows when None), then clamp to [0,1] and (x - mean) / std on every row,
        in one pass of abd_fast.ops.apply_trigger. ids: int64 [B] sample ids."""
        if images.dim() != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"{self.name} trigger was built for {self.image_size} px images "
                             f"(--image-size), got a batch of shape {tuple(images.shape)}")
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.numel() != images.shape[0]:
            raise ValueError(f"{ids.numel()} ids for {images.shape[0]} images")
        if rows is not None:
            rows = torch.as_tensor(rows, device=images.device).to(torch.bool).reshape(-1)
        kind, kw = self._op(images, ids, rows)
        return apply_trigger(images, kind, rows=rows, mean=mean, std=std, out_dtype=out_dtype,
                             backend=backend, **kw)

    def _op(self, images, ids, rows):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r}, image_size={self.image_size}, seed={self.seed})"


class PatchTrigger(Trigger):
    """badnet / label-consistent / badclip: a p x p patch pasted at a location.

    content: "noise" (CleanCLIP: per-channel mean of the image + N(0,1) noise seeded by
    (seed, id), clamped by the op), "fixed" (one uniform patch from the seed) or a tensor
    [3,p,p] in [0,1] (an image file, BadCLIP's optimized patch; may require grad).
    location: "random" (top-left corner uniform over the valid positions, seeded by
    (seed, id)), "corner" (bottom-right, as BadNets), "middle" ((S - p) // 2 on both axes) or
    "four-corners" (the same patch in each corner)."""

    def __init__(self, name, image_size, seed, *, patch_size: int, content, location: str):
        super().__init__(name, image_size, seed)
        if location not in LOCATIONS:
            raise ValueError(f"{name}: location {location!r} is not one of {LOCATIONS}")
        if not 1 <= patch_size <= image_size:
            raise ValueError(f"{name}: patch_size {patch_size} must be in [1, {image_size}] "
                             f"(the image size)")
        self.patch_size, self.location = int(patch_size), location
        if isinstance(content, Tensor):
            if content.dim() != 3 or content.shape[0] != 3 or max(content.shape[1:]) > image_size:
                raise ValueError(f"{name}: patch must be [3, h, w] with h, w <= {image_size}, "
                                 f"got {tuple(content.shape)}")
            self.patch_size = int(content.shape[1])
            self.patch = content
        elif content == "fixed":
            p = self.patch_size
            self.patch = torch.from_numpy(
                uniform(seed, STREAM_FIXED_PATCH, [0], 3 * p * p).reshape(3, p, p)).float()
        elif content == "noise":
            self.patch = None
        else:
            raise ValueError(f"{name}: patch_content must be 'noise', 'fixed' or an image file, "
                             f"got {content!r}")

    def noise(self, ids) -> Tensor:
        """float32 [B, 3, p, p]: the N(0,1) part of the "noise" content of each sample id."""
        p = self.patch_size
        return torch.from_numpy(normal(self.seed, STREAM_NOISE, ids, 3 * p * p)).float() \
            .reshape(-1, 3, p, p)

    def locations(self, ids) -> tuple[Tensor, Tensor]:
        """int64 (ys [B], xs [B]): top-left corner of the patch of each sample id."""
        n, S, p = len(ids), self.image_size, self.patch_size
        h, w = (self.patch.shape[1:] if self.patch is not None else (p, p))
        if self.location == "random":
            u = uniform(self.seed, STREAM_LOCATION, ids, 2)
            ys = np.floor(u[:, 0] * (S - h + 1)).astype(np.int64)
            xs = np.floor(u[:, 1] * (S - w + 1)).astype(np.int64)
            return torch.from_numpy(ys), torch.from_numpy(xs)
        y, x = ((S - h, S - w) if self.location == "corner" else ((S - h) // 2, (S - w) // 2))
        return torch.full((n,), y, dtype=torch.int64), torch.full((n,), x, dtype=torch.int64)

    def contents(self, images: Tensor, ids: Tensor, rows: Tensor | None) -> Tensor:
        """The patch of each row: [3,h,w] shared, or [B,3,p,p] for "noise" (filled on `rows`)."""
        if self.patch is not None:
            return self.patch.to(images.device)
        ids_np = ids.cpu().numpy()
        sel = torch.arange(len(ids_np)) if rows is None else rows.cpu().nonzero().reshape(-1)
        out = torch.zeros(len(ids_np), 3, self.patch_size, self.patch_size, device=images.device)
        if len(sel):
            x = images[sel.to(images.device)]
            mean = x.float().mean((2, 3)) / (255 if x.dtype == torch.uint8 else 1)   # [b, 3]
            out[sel.to(images.device)] = mean[:, :, None, None] + \
                self.noise(ids_np[sel.numpy()]).to(images.device)
        return out

    def _op(self, images, ids, rows):
        ys, xs = self.locations(ids.cpu().numpy())
        return "patch", dict(patch=self.contents(images, ids, rows), ys=ys.to(images.device),
                             xs=xs.to(images.device))

    def apply(self, images, ids, *, rows=None, mean=None, std=None, out_dtype=torch.float32,
              backend=None):
        if self.location != "four-corners":
            return super().apply(images, ids, rows=rows, mean=mean, std=std, out_dtype=out_dtype,
                                 backend=backend)
        # The op pastes one box per row: three corners in [0,1] float passes, then the last
        # corner with the normalization (four passes; this option is off the hot path).
        ids = torch.as_tensor(ids).reshape(-1)
        patch = self.contents(images, ids, rows)
        h, w = patch.shape[-2:]
        S, B = self.image_size, images.shape[0]
        corners = [(0, 0), (0, S - w), (S - h, 0), (S - h, S - w)]
        x = images
        for k, (y0, x0) in enumerate(corners):
            last = k == len(corners) - 1
            x = apply_trigger(x, "patch", rows=rows, patch=patch,
                              ys=torch.full((B,), y0, dtype=torch.int64, device=images.device),
                              xs=torch.full((B,), x0, dtype=torch.int64, device=images.device),
                              mean=mean if last else None, std=std if last else None,
                              out_dtype=out_dtype if last else torch.float32, backend=backend)
        return x


class BlendTrigger(Trigger):
    """blended: x' = (1 - alpha) x + alpha * pattern; pattern [3,S,S] in [0,1] (uniform noise
    from the seed, or an image file)."""

    def __init__(self, name, image_size, seed, *, alpha: float, pattern: Tensor | None):
        super().__init__(name, image_size, seed)
        if not 0 <= alpha <= 1:
            raise ValueError(f"blended: alpha must be in [0, 1], got {alpha}")
        S = image_size
        if pattern is None:
            pattern = torch.from_numpy(uniform(seed, STREAM_BLEND, [0], 3 * S * S)
                                       .reshape(3, S, S)).float()
        self.alpha, self.pattern = float(alpha), pattern

    def _op(self, images, ids, rows):
        return "blend", dict(pattern=self.pattern.to(images.device), alpha=self.alpha)


class SigTrigger(Trigger):
    """sig: x' = x + pattern, pattern[c, i, j] = delta * sin(2 pi j f / W) (horizontal sinusoid),
    clamped to [0,1] by the op. No randomness."""

    def __init__(self, name, image_size, seed, *, delta: float, f: float):
        super().__init__(name, image_size, seed)
        self.delta, self.f = float(delta), float(f)
        S = image_size
        j = torch.arange(S, dtype=torch.float64)
        row = self.delta * torch.sin(2 * math.pi * j * self.f / S)
        self.pattern = row.float().expand(3, S, S).contiguous()

    def _op(self, images, ids, rows):
        return "add", dict(pattern=self.pattern.to(images.device))


def wanet_grid(image_size: int, seed: int, k: int = 4, s: float = 0.5,
               grid_rescale: float = 1.0) -> Tensor:
    """BackdoorBench's WaNet warping grid, float32 [S, S, 2] in grid_sample's (x, y) order:
    ins ~ U(-1, 1) [1,2,k,k] (from the seed), ins /= mean|ins|, bicubic upsampling to S x S
    (align_corners=True), grid = clamp((identity + s * noise / S) * grid_rescale, -1, 1)."""
    S = image_size
    ins = torch.from_numpy(uniform(seed, STREAM_WANET, [0], 2 * k * k).reshape(1, 2, k, k)) \
        .float() * 2 - 1
    ins = ins / ins.abs().mean()
    noise_grid = F.interpolate(ins, size=S, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=S)
    x, y = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((y, x), 2)[None]
    grid = (identity_grid + s * noise_grid / S) * grid_rescale
    return grid.clamp(-1, 1)[0].contiguous()


class WarpTrigger(Trigger):
    """wanet: bilinear resampling along the seeded BackdoorBench grid (wanet_grid)."""

    def __init__(self, name, image_size, seed, *, k: int, s: float, grid_rescale: float):
        super().__init__(name, image_size, seed)
        if k < 2 or k > image_size:
            raise ValueError(f"wanet: k must be in [2, {image_size}], got {k}")
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)
        self.grid = wanet_grid(image_size, seed, self.k, self.s, self.grid_rescale)

    def _op(self, images, ids, rows):
        return "warp", dict(grid=self.grid.to(images.device))


def _patch_content(name, content, p):
    """'noise' | 'fixed' | a Tensor | an image file path -> what PatchTrigger takes."""
    if isinstance(content, Tensor) or content in ("noise", "fixed"):
        return content
    if isinstance(content, (str, os.PathLike)):
        return load_image(content, (p, p), f"{name} patch_content file")
    raise ValueError(f"{name}: patch_content must be 'noise', 'fixed', an image file or a "
                     f"tensor, got {content!r}")


def make_trigger(name: str, *, image_size: int, seed: int = 0, **options) -> Trigger:
    """The trigger of attack `name` (one of ATTACKS) for image_size x image_size images.

    Options (defaults from DESIGN §2):
      badnet, label-consistent: patch_size (patch_side(image_size): 16 at 224 px, scaled),
          patch_content "noise" | "fixed" | image file path, location "random" | "corner" |
          "middle" | "four-corners"
      blended: alpha=0.2, pattern=None (seeded uniform noise) | image file path
      wanet: k=4, s=0.5, grid_rescale=1.0
      sig: delta=40/255, f=6
      badclip: patch_file (PNG or tensor file from badclip-trigger) or patch=Tensor [3,p,p];
          pasted in the middle
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
    if image_size < 2:
        raise ValueError(f"image_size must be at least 2, got {image_size}")

    def take(**defaults):
        unknown = set(options) - set(defaults)
        if unknown:
            raise ValueError(f"{name}: unknown option(s) {sorted(unknown)}; "
                             f"options are {sorted(defaults)}")
        return {k: options.get(k, v) for k, v in defaults.items()}

    if name in ("badnet", "label-consistent"):
        o = take(patch_size=None, patch_content="noise", location="random")
        p = int(o["patch_size"]) if o["patch_size"] is not None else patch_side(image_size)
        return PatchTrigger(name, image_size, seed, patch_size=p,
                            content=_patch_content(name, o["patch_content"], p),
                            location=o["location"])
    if name == "blended":
        o = take(alpha=0.2, pattern=None)
        pattern = o["pattern"]
        if pattern is not None and not isinstance(pattern, Tensor):
            pattern = load_image(pattern, (image_size, image_size), "blended pattern file")
        return BlendTrigger(name, image_size, seed, alpha=float(o["alpha"]), pattern=pattern)
    if name == "wanet":
        o = take(k=4, s=0.5, grid_rescale=1.0)
        return WarpTrigger(name, image_size, seed, k=int(o["k"]), s=float(o["s"]),
                           grid_rescale=float(o["grid_rescale"]))
    if name == "sig":
        o = take(delta=40 / 255, f=6)
        return SigTrigger(name, image_size, seed, delta=float(o["delta"]), f=float(o["f"]))
    # badclip
    o = take(patch_file=None, patch=None)
    if (o["patch_file"] is None) == (o["patch"] is None):
        raise ValueError("badclip needs its optimized patch: give patch_file= (--trigger-file; "
                         "make one with `python -m abd_fast.train badclip-trigger`) or patch=")
    patch = o["patch"] if o["patch"] is not None else load_patch(o["patch_file"])
    return PatchTrigger(name, image_size, seed, patch_size=int(patch.shape[1]), content=patch,
                        location="middle")
