"""The universal adversarial perturbation (UAP) of ABD: AdvCLIP's generator and discriminator,
AdvCLIP's generator loss, and ABD's backdoor loss (ABD Eq. 2).

One perturbation for every image (universal, not image-conditioned): the generator maps a
fixed z ~ N(0, 1), drawn once from the seed and saved with the weights, through a
transposed-convolution stack to a [3, h, w] map, then Tanh. AdvCLIP feeds a batch of z and
mixes it with a convolution whose channel count is the batch size, so its generator only
works at the batch size it was trained with; here there is one z and no such layer.
BatchNorm normalizes over the spatial positions of that one map and keeps no running
statistics, so training and evaluation produce the same perturbation.

Three modes (abd_fast.ops.apply_perturbation applies them, with the gradient to the generator):
  patch:      the perturbation is a square patch whose area is `area` (3%) of the image,
              content (tanh + 1) / 2 in [0, 1], pasted at `place`: "corner", near the
              bottom-right corner (AdvCLIP, and what ABD means by "0.03"), or "random", a new
              place per image (issue 17: a patch that must work anywhere, as a BadNets
              trigger at a random place does)
  linf:       x + eps * tanh(g), eps = 0.03
  patch+linf: both: x + eps * tanh(g1) everywhere, then the patch (tanh(g2) + 1) / 2 pasted
              at `place` (the generator's output has 6 channels: g1's 3, then g2's 3, whose
              top-left side x side crop is the patch)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abd_fast.ops import apply_perturbation, info_nce
from abd_fast.precision import full_precision

MODES = ("patch", "linf", "patch+linf")
PLACES = ("corner", "random")
# The random patch places of an evaluation are a pure function of (seed, image id), like the
# attacks' triggers (abd_fast.attacks.triggers.uniform; its streams are 1-8).
STREAM_UAP_PLACE = 9


def patch_geometry(image_size: int, area: float = 0.03) -> tuple[int, int]:
    """(side, corner) of the patch-mode UAP: side = int(sqrt(area) * S); its top-left corner is
    at (corner, corner), AdvCLIP's bottom-right placement (S - 14 - side at 224 px, i.e. 172),
    scaled with the image size."""
    if not 0.0 < area < 1.0:
        raise ValueError(f"--patch-area must be in (0, 1), got {area}")
    side = max(1, int(math.sqrt(area) * image_size))
    margin = round(14 * image_size / 224)
    return side, max(0, image_size - margin - side)


class UAPGenerator(nn.Module):
    """z [1, z_dim, 1, 1] (fixed buffer) -> transposed convs with BN + ReLU -> Tanh ->
    the perturbation [3, size, size] of `mode`: patch -> (tanh + 1) / 2 in [0, 1];
    linf -> eps * tanh, within [-eps, eps]; patch+linf -> [6, size, size]: eps * tanh of the
    first 3 channels, (tanh + 1) / 2 of the last 3 (what apply_uap takes).

    size: the patch side (patch mode) or the image size (linf, patch+linf)."""

    def __init__(self, size: int, mode: str = "patch", eps: float = 0.03, z_dim: int = 100,
                 width: int = 64, seed: int = 0):
        super().__init__()
        if size < 1:
            raise ValueError(f"generator output size must be positive, got {size}")
        if mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
        if not eps > 0:
            raise ValueError(f"--eps must be positive, got {eps}")
        self.size, self.mode, self.eps = size, mode, float(eps)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("z", torch.randn(1, z_dim, 1, 1, generator=g))
        n_up = max(0, math.ceil(math.log2(max(size, 4) / 4)))  # 4 -> 8 -> ... >= size
        chans = [max(16, width * 2 ** (n_up - i)) for i in range(n_up + 1)]
        layers = [nn.ConvTranspose2d(z_dim, chans[0], 4, 1, 0), _bn(chans[0]), nn.ReLU()]
        for a, b in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), _bn(b), nn.ReLU()]
        layers.append(nn.Conv2d(chans[-1], 6 if mode == "patch+linf" else 3, 3, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self) -> Tensor:
        h = self.net(self.z)
        if h.shape[-1] != self.size:
            h = F.interpolate(h, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        t = torch.tanh(h[0])
        if self.mode == "patch+linf":
            return torch.cat([self.eps * t[:3], (t[3:] + 1) / 2])
        return (t + 1) / 2 if self.mode == "patch" else self.eps * t


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=False)


class Discriminator(nn.Module):
    """AdvCLIP's discriminator: stride-2 convs (LeakyReLU 0.2, BatchNorm after the first) down to
    at most 4x4, then a conv over what is left: [B, 3, S, S] -> [B] logits. AdvCLIP ends with a
    sigmoid and a BCE on its output; here the losses take the logits
    (binary_cross_entropy_with_logits: the same loss, stable in bf16/fp16, and the form CUDA
    autocast accepts: it refuses F.binary_cross_entropy). sigmoid(D(x)) is the probability."""

    def __init__(self, image_size: int, width: int = 32):
        super().__init__()
        layers, c, s = [], 3, image_size
        while s > 4:
            out = min(width * 2 ** (len(layers) // 3), 512)
            layers += [nn.Conv2d(c, out, 4, 2, 1)]
            layers += [nn.BatchNorm2d(out)] if c != 3 else []
            layers += [nn.LeakyReLU(0.2)]
            c, s = out, s // 2
        layers += [nn.Conv2d(c, 1, s, 1, 0)]
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images).reshape(-1)

    @torch.no_grad()
    def clip_weights(self, c: float = 0.01):
        """WGAN-style clipping of every parameter to [-c, c], after each discriminator step."""
        for p in self.parameters():
            p.clamp_(-c, c)


def uap_shape(mode: str, image_size: int, area: float = 0.03) -> tuple[int, int, int]:
    """The shape of a `mode` UAP for image_size px images (what UAPGenerator returns)."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    if mode == "patch":
        side = patch_geometry(image_size, area)[0]
        return (3, side, side)
    return (6 if mode == "patch+linf" else 3, image_size, image_size)


def patch_places(n: int, image_size: int, area: float = 0.03, *, place: str = "corner",
                 ids=None, seed: int = 0, generator: torch.Generator | None = None):
    """Top-left corners (ys, xs), int64 [n] each, of the patch on n images: "corner" ->
    patch_geometry's; "random" -> uniform over the image, a pure function of (seed, image id)
    when `ids` are given (an evaluation: the same places for every model and run), else drawn
    from `generator` (training: new places each step; the scan's draw,
    scan.model.place_patches)."""
    side, corner = patch_geometry(image_size, area)
    if place == "corner":
        return torch.full((n,), corner), torch.full((n,), corner)
    if place != "random":
        raise ValueError(f"--patch-place must be one of {PLACES}, got {place!r}")
    if ids is not None:
        from abd_fast.attacks.triggers import uniform
        u = torch.from_numpy(uniform(seed, STREAM_UAP_PLACE, torch.as_tensor(ids).cpu(), 2))
        yx = (u * (image_size - side + 1)).floor().to(torch.int64)
        return yx[:, 0], yx[:, 1]
    from abd_fast.scan.model import Geometry, place_patches
    return place_patches(Geometry("patch", size=side / image_size, place="random"), image_size,
                         n, generator if generator is not None else torch.default_generator)


def apply_uap(images: Tensor, uap: Tensor, *, mode: str, image_size: int, area: float = 0.03,
              eps: float = 0.03, place: str = "corner", places=None, ids=None, seed: int = 0,
              generator: torch.Generator | None = None, rows=None, mean=None, std=None,
              out_dtype=torch.float32) -> Tensor:
    """uint8 (or [0,1]) images -> images with the UAP -> clamp -> normalize, in fused passes;
    differentiable with respect to `uap` (from UAPGenerator). Patch modes: the patch's
    top-left corners are `places` (ys, xs) when given, else `patch_places(place, ids, seed,
    generator)`."""
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
    if mode == "linf":
        return apply_perturbation(images, uap, mode="linf", eps=eps, rows=rows, mean=mean,
                                  std=std, out_dtype=out_dtype)
    B, side = images.shape[0], patch_geometry(image_size, area)[0]
    if places is None:
        places = patch_places(B, image_size, area, place=place, ids=ids, seed=seed,
                              generator=generator)
    box = tuple(t.to(images.device) for t in places)
    if mode == "patch":
        return apply_perturbation(images, uap, mode="patch", box=box, rows=rows, mean=mean,
                                  std=std, out_dtype=out_dtype)
    # patch+linf: x + delta (unnormalized, differentiable w.r.t. delta), then the patch pasted
    # over it as x * (1 - mask) + canvas, where canvas is the patch on a zero image and mask
    # its footprint (the fused ops take no gradient through their input images).
    linf, patch = uap[:3], uap[3:, :side, :side]
    x = apply_perturbation(images, linf, mode="linf", eps=eps, rows=rows)
    blank = torch.zeros(images.shape, dtype=torch.uint8, device=images.device)
    canvas = apply_perturbation(blank, patch, mode="patch", box=box, rows=rows)
    mask = apply_perturbation(blank, torch.ones_like(patch.detach()), mode="patch", box=box,
                              rows=rows)
    x = x * (1 - mask) + canvas
    if mean is not None:
        x = (x - torch.as_tensor(mean, device=x.device).view(1, -1, 1, 1)) \
            / torch.as_tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.to(out_dtype)


# ---- losses ---------------------------------------------------------------------------------

def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def nce(q: Tensor, k: Tensor, tau: float = 0.1) -> Tensor:
    """InfoNCE with in-batch negatives on L2-normalized features, temperature tau: row i of q
    has positive row i of k (AdvCLIP's and ABD's InfoNCE)."""
    return info_nce(_unit(q), _unit(k), 1.0 / tau)


def topology_loss(a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """AdvCLIP's topology (UMAP-style) deviation U(a, b) between two batches of features [N, D]:
    each batch's cosine-similarity graph, with each row's nearest neighbour set at distance 0,
    scaled to [0, 1] and row-normalized into neighbour distributions P (from b) and Q (from a);
    U = sum over entries of KL(P || Q) + KL(1 - P || 1 - Q). Large when the neighbourhoods of
    a and b differ; the generator maximizes it (its loss carries -U)."""
    def graph(x: Tensor) -> Tensor:
        n = x.shape[0]
        dist = 1.0 - x @ x.T
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        dist = dist.masked_fill(eye, 3.0)
        dist = dist - dist.min(dim=1, keepdim=True).values
        dist = dist.masked_fill(eye, 0.0)
        sim = (2.0 - dist) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    def kl(p_, q_):
        return (p_ * ((p_ + eps).log() - (q_ + eps).log())).sum()

    # fp32 even under autocast: bf16's 8-bit mantissa would round cosine similarities near 1
    # (the nearest neighbours this graph is about) to steps of 1/256, and eps = 1e-7 in the
    # logs is below bf16's resolution near 1.
    with full_precision(a.device):
        q, p = graph(_unit(a)), graph(_unit(b))
        return kl(p, q) + kl(1 - p, 1 - q)


def backdoor_loss(reference_features: Tensor, adversarial_features: Tensor, *, tau: float = 0.1,
                  sign: float = 1.0, pairing: str = "reference-query") -> Tensor:
    """ABD Eq. 2: InfoNCE over the batch between x_i, the reference (clean) encoder's features of
    the clean (augmented) image i, and x_bd,i, the poisoned encoder's features of the adversarial
    image i; in-batch negatives, temperature tau.

    The paper says the loss *increases* the similarity of each pair (x_i, x_bd,i), so the
    generator minimizes it (sign = +1). sign = -1 flips it (pushes the pairs apart);
    pairing "reference-query" puts x in the rows (the paper's sum over x_i), "adversarial-query"
    puts x_bd there. See docs/METHOD.md."""
    if pairing == "reference-query":
        loss = nce(reference_features, adversarial_features, tau)
    elif pairing == "adversarial-query":
        loss = nce(adversarial_features, reference_features, tau)
    else:
        raise ValueError(f"pairing must be 'reference-query' or 'adversarial-query', "
                         f"got {pairing!r}")
    return sign * loss


def generator_loss(d_fake: Tensor, adv_images: Tensor, clean_images: Tensor,
                   clean_features: Tensor, adv_features: Tensor, text_features: Tensor, *,
                   alpha: float = 10.0, beta: float = 5.0, gamma: float = 5.0, delta: float = 1.0,
                   tau: float = 0.1, backdoor: Tensor | None = None, lambda_bd: float = 1.0
                   ) -> tuple[Tensor, dict]:
    """AdvCLIP's generator loss, plus ABD's backdoor loss when `backdoor` is given:

        L_G = BCE(D(x'), 1) + alpha * L_adv + MSE(x', x) + delta * L_topo + lambda_bd * L_bd
        L_adv  = -InfoNCE(E_p(x), E_p(x')) - beta * InfoNCE(E_p(x'), E_T(t))
        L_topo = -U(E_p(x), E_p(x')) - gamma * U(E_p(x'), E_T(t))

    d_fake: the discriminator's logits D(x') [B]; adv_images / clean_images: the normalized
    images x', x [B,3,S,S]; *_features: E_p(x), E_p(x'), E_T(t) [B, D]. Returns (L_G, its
    terms, detached). Safe under autocast: the BCE, MSE and topology terms run in fp32."""
    gan = _bce(d_fake, 1.0)
    adv = -nce(clean_features, adv_features, tau) - beta * nce(adv_features, text_features, tau)
    mse = F.mse_loss(adv_images.float(), clean_images.float())
    topo = (-topology_loss(clean_features, adv_features)
            - gamma * topology_loss(adv_features, text_features))
    total = gan + alpha * adv + mse + delta * topo
    terms = {"gan": gan, "adv": adv, "mse": mse, "topo": topo}
    if backdoor is not None:
        total = total + lambda_bd * backdoor
        terms["backdoor"] = backdoor
    return total, {k: v.detach() for k, v in terms.items()}


def discriminator_loss(d_real: Tensor, d_fake: Tensor) -> Tensor:
    """BCE(D(x), 1) + BCE(D(x'), 0), from the discriminator's logits."""
    return _bce(d_real, 1.0) + _bce(d_fake, 0.0)


def _bce(logits: Tensor, target: float) -> Tensor:
    """BCE(sigmoid(logits), target) in fp32, in the logits form (module Discriminator)."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


# ---- the trained UAP as a file and as an evaluation "trigger" ------------------------------

class UAP:
    """A trained universal perturbation with its geometry. `apply(images, ids, ...)` has the
    signature of an attack Trigger, so abd_fast.evaluate measures it like one: its "ASR" on
    the poisoned model is how often it sends non-target images to the backdoor target.
    A random-place patch goes where patch_places puts it: by image id when ids are given
    (evaluations), else at places drawn from torch's global generator (ABD's training view:
    new places each step)."""
    name = "uap"

    def __init__(self, perturbation: Tensor, *, mode: str, image_size: int, area: float = 0.03,
                 eps: float = 0.03, place: str = "corner"):
        want = uap_shape(mode, image_size, area)
        if tuple(perturbation.shape) != want:
            raise ValueError(f"a {mode} UAP for {image_size} px images is {list(want)}, "
                             f"got {list(perturbation.shape)}")
        if place not in PLACES:
            raise ValueError(f"--patch-place must be one of {PLACES}, got {place!r}")
        self.perturbation = perturbation.detach().float()
        self.mode, self.image_size, self.area, self.eps = mode, int(image_size), area, eps
        self.place = place

    def apply(self, images: Tensor, ids=None, *, rows=None, mean=None, std=None,
              out_dtype=torch.float32) -> Tensor:
        return apply_uap(images, self.perturbation.to(images.device), mode=self.mode,
                         image_size=self.image_size, area=self.area, eps=self.eps,
                         place=self.place, ids=ids, rows=rows, mean=mean, std=std,
                         out_dtype=out_dtype)

    def clean_and_adversarial(self, images: Tensor, *, mean=None, std=None,
                              out_dtype=torch.float32) -> Tensor:
        """ABD's image views [clean; clean + UAP] of images [B, C, H, W] as one [2B, C, H, W]
        batch: one fused call on the images stacked twice, the UAP on the second copy's rows
        (cheaper than two views and a torch.cat of them)."""
        B = images.shape[0]
        rows = torch.arange(2 * B, device=images.device) >= B
        return self.apply(torch.cat([images, images]), rows=rows, mean=mean, std=std,
                          out_dtype=out_dtype)

    def state_dict(self) -> dict:
        return {"format": "abd_fast.uap", "perturbation": self.perturbation, "mode": self.mode,
                "image_size": self.image_size, "area": self.area, "eps": self.eps,
                "place": self.place}

    def save(self, path):
        from abd_fast.engine import atomic_save
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path, flag: str = "--uap") -> "UAP":
        """Reads a UAP file with torch.load(weights_only=True) (no code in it can run)."""
        from pathlib import Path
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file (the `uap` stage writes "
                                    "uap.pt in its --output)")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{flag} {path}: not a readable UAP file ({e})") from e
        if not isinstance(d, dict) or d.get("format") != "abd_fast.uap":
            raise ValueError(f"{flag} {path}: not a UAP file written by the `uap` stage")
        return cls(d["perturbation"], mode=d["mode"], image_size=d["image_size"],
                   area=d["area"], eps=d["eps"], place=d.get("place", "corner"))
