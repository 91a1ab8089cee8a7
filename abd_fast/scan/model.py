"""Is this CLIP backdoored, and toward which class? A per-class search for universal
perturbations that knows neither the trigger nor the target.

For every class c and every perturbation geometry g (a patch of some size at some place, or
an L-inf perturbation of some budget), `class_search` trains one universal perturbation that
sends clean images to c (Adam on the perturbation; the loss is the zero-shot cross-entropy
toward c) and measures, on held-out images, the *capture rate* r[g, c]: the share of images
the model does not already put in c that it puts in c once perturbed. A backdoor is a
shortcut to its target: some geometry that can meet the trigger captures the target far
more easily than any other class. Natural adversarial attractors exist too (on the demo's
clean model an L-inf UAP sends most images to 'ring'), so raw rates mislead: `verdict`
scores each class by how far its capture stands out from the other classes' (a robust
z-score of the capture on the arcsine scale over classes, per geometry; with a reference
model, of the *gain* over the reference, which cancels the attractors both models share),
and compares the largest with a threshold calibrated on clean models (docs/SCAN.md). Nothing
here reads a target label.

    from abd_fast.scan import class_search, verdict
    search = class_search(model, images, classifier, mean=mean, std=std)
    result = verdict(search, classnames)            # {"backdoored", "score", ...}
    uap = search.uap(g, c)                          # the perturbation toward class c

The search is also the target inference of ABD's steered UAP (issue 17): `search.uap(...)`
is a trained perturbation toward the suspected target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from abd_fast.models import frozen, image_features
from abd_fast.ops import apply_perturbation, apply_trigger

PLACES = ("random", "center", "corner")
# Calibrated on clean models only (docs/SCAN.md "Calibration", bench/scan_table.py): the
# largest score of the clean models plus 1. self: clean models of seeds 0, 1, 2 (largest 6.13,
# the natural attractor "ring"); reference: clean fine-tunes of the reference (1.69, 1.68).
THRESHOLDS = {"self": 7.1, "reference": 2.7}
CALIBRATION_MARGIN = 1.0  # robust z units above the largest clean score (one robust std)
FLOOR = 0.1   # arcsine scale (asin sqrt p, 0..pi/2): the smallest spread over classes a z-score
              # divides by (~ the spread of rates 5%..15%)


def calibrated_threshold(clean_scores) -> float:
    """A mode's threshold from the scores of clean models scanned in that mode (THRESHOLDS'
    rule; `pipeline --scan-threshold calibrate` applies it to the user's own clean models)."""
    return max(clean_scores) + CALIBRATION_MARGIN


@dataclass(frozen=True)
class Geometry:
    """One family of universal perturbations.

    patch: a square patch of side round(size * S) px (content in [0, 1]) pasted at `place`:
           "random" (a new place per image and step: the patch must work anywhere, as a
           BadNets trigger at a random place does), "center" or "corner" (bottom-right).
    linf:  x + delta with |delta| <= eps (pixels in [0, 1]), everywhere in the image."""
    mode: str
    size: float = 0.0
    place: str = "random"
    eps: float = 0.0

    def __post_init__(self):
        if self.mode == "patch":
            if not 0 < self.size <= 1:
                raise ValueError(f"patch size must be a fraction of the image side in (0, 1], "
                                 f"got {self.size}")
            if self.place not in PLACES:
                raise ValueError(f"patch place must be one of {PLACES}, got {self.place!r}")
        elif self.mode == "linf":
            if not 0 < self.eps <= 1:
                raise ValueError(f"L-inf eps must be in (0, 1], got {self.eps}")
        else:
            raise ValueError(f"geometry mode must be 'patch' or 'linf', got {self.mode!r}")

    @property
    def name(self) -> str:
        if self.mode == "linf":
            k = round(self.eps * 255)
            return f"linf-{k}/255" if abs(k / 255 - self.eps) < 1e-12 else f"linf-{self.eps!r}"
        return f"patch-{self.place}-{self.size:g}"

    def side(self, image_size: int) -> int:
        return max(1, min(image_size, round(self.size * image_size)))

    @classmethod
    def parse(cls, text: str) -> "Geometry":
        """'patch-random-0.25', 'patch-center-0.125', 'linf-8/255' or 'linf-0.03'."""
        parts = text.strip().split("-")
        try:
            if parts[0] == "linf" and len(parts) == 2:
                num, _, den = parts[1].partition("/")
                return cls("linf", eps=float(num) / (float(den) if den else 1.0))
            if parts[0] == "patch" and len(parts) == 3:
                return cls("patch", size=float(parts[2]), place=parts[1])
        except ValueError as e:
            raise ValueError(f"geometry {text!r}: {e}") from e
        raise ValueError(f"geometry {text!r}: expected patch-<{'|'.join(PLACES)}>-<side "
                         "fraction> (e.g. patch-random-0.25) or linf-<eps> (e.g. linf-8/255)")


# Patches of a quarter of the image side (the BadNets/BadCLIP triggers are 7% of the side at
# 224 px, scaled to the minimum 8 px = 25% at the demo's 32 px), at a random place per image
# and at the center; L-inf at 8/255 (the blended/SIG/WaNet triggers change every pixel a
# little; 4/255 never captured more than a few % on the demo's models, docs/SCAN.md). The
# search's cost is linear in the number of geometries.
DEFAULT_GEOMETRIES = (
    Geometry("patch", size=0.25, place="random"),
    Geometry("patch", size=0.25, place="center"),
    Geometry("linf", eps=8 / 255),
)


def place_patches(geometry: Geometry, image_size: int, n: int, gen: torch.Generator):
    """Top-left corners (ys, xs) [n] of the patch for n images."""
    S, p = image_size, geometry.side(image_size)
    if geometry.place == "random":
        return (torch.randint(0, S - p + 1, (n,), generator=gen),
                torch.randint(0, S - p + 1, (n,), generator=gen))
    at = (S - p) // 2 if geometry.place == "center" else S - p
    return torch.full((n,), at), torch.full((n,), at)


def perturb(images: Tensor, geometry: Geometry, delta: Tensor, *, mean, std,
            gen: torch.Generator | None = None, places=None) -> Tensor:
    """images (uint8 [B,3,S,S]) with perturbation delta -> normalized [B,3,S,S], through the
    fused op (differentiable with respect to delta). delta: [3,h,w] shared or [B,3,h,w] per
    row, in geometry's parametrization (`Geometry`: patch in [0,1], L-inf in [-eps, eps]).
    places: the patch corners (ys, xs); drawn from gen when None."""
    if geometry.mode == "linf":
        return apply_perturbation(images, delta, mode="linf", eps=geometry.eps, mean=mean,
                                  std=std)
    ys, xs = places if places is not None else place_patches(geometry, images.shape[-1],
                                                        images.shape[0], gen)
    return apply_trigger(images, "patch", patch=delta, ys=ys.to(images.device),
                         xs=xs.to(images.device), mean=mean, std=std)


def _delta(geometry: Geometry, w: Tensor) -> Tensor:
    """The perturbation from its free parameters: a sigmoid patch in [0,1], eps * tanh."""
    return torch.sigmoid(w) if geometry.mode == "patch" else geometry.eps * torch.tanh(w)


@dataclass
class Search:
    """The result of `class_search`.

    rates [G, C]: capture rate of class c's perturbation under geometry g (fraction in [0,1]);
    hits, counts [G, C]: its numerator and denominator (held-out images the model does not
    already put in c); reference_hits [G, C] or None: how many of those same images the same
    perturbation sends to c on the reference model; deltas[g]: [C, 3, h, w] the trained
    perturbations (patch in [0,1], L-inf in [-eps, eps]); classes: the class indices searched
    (the columns)."""
    geometries: tuple
    classes: list
    hits: Tensor
    counts: Tensor
    deltas: list
    image_size: int
    reference_hits: Tensor | None = None
    settings: dict = field(default_factory=dict)

    @property
    def rates(self) -> Tensor:
        return self.hits / self.counts.clamp(min=1)

    def uap(self, geometry: int, column: int) -> tuple[Geometry, Tensor]:
        """(geometry, perturbation [3, h, w]) toward class self.classes[column]; apply it with
        `perturb`."""
        return self.geometries[geometry], self.deltas[geometry][column]

    def table(self, classnames, hits=None) -> dict:
        """{geometry name: {class name: capture rate %}} (JSON-ready)."""
        rates = (self.hits if hits is None else hits) / self.counts.clamp(min=1)
        return {g.name: {classnames[c]: round(100 * float(rates[i, j]), 2)
                         for j, c in enumerate(self.classes)}
                for i, g in enumerate(self.geometries)}


def predictions(model, images: Tensor, classifier: Tensor, *, mean, std, trigger=None,
                batch_size: int = 500) -> Tensor:
    """Zero-shot top-1 predictions [N] of the images, clean or with `trigger` (anything with
    an attack Trigger's apply(images, ids, mean=, std=), e.g. a defenses.uap.UAP; image k has
    id k, so a random-place patch lands at the same place for every model)."""
    from abd_fast.ops import normalize_images
    out = []
    with torch.no_grad():
        for k in range(0, len(images), batch_size):
            x0 = images[k:k + batch_size].to(classifier.device)
            x = (normalize_images(x0, mean, std) if trigger is None else
                 trigger.apply(x0, torch.arange(k, k + len(x0)), mean=mean, std=std))
            out.append((image_features(model, x) @ classifier.T).argmax(1))
    return torch.cat(out)


def class_search(model, images: Tensor, classifier: Tensor, *, mean, std,
                 geometries=DEFAULT_GEOMETRIES, classes=None, steps: int = 30,
                 batch_size: int = 16, lr: float = 0.1, fit_fraction: float = 0.5,
                 seed: int = 0, logit_scale: float = 100.0, reference=None,
                 reference_classifier: Tensor | None = None, restarts: int = 1,
                 chunk: int = 256) -> Search:
    """Trains, for each geometry and each class, a universal perturbation toward that class, and
    measures its capture rate on held-out images.

    model: a CLIP (frozen here; its mode is restored). images: uint8 [N,3,S,S] clean images (no
    labels needed: an image counts for class c when the model does not already predict c).
    classifier: [C, D] zero-shot class embeddings (abd_fast.evaluate.zero_shot_classifier).
    classes: the class indices to search (default all). A seeded `fit_fraction` of the images
    trains the perturbations (each step: batch_size images per class, all classes of a
    geometry in one forward pass), the rest measures them. steps, lr: Adam on the
    perturbation's free parameters (sigmoid for patches, eps * tanh for L-inf); the loss is the
    cross-entropy of logit_scale * cosine toward the class. restarts: random starts per class
    and geometry (the best by fit loss is kept; cost x restarts). chunk: images per forward
    pass while fitting (restarts x classes x batch_size per step; the gradient of their mean
    is accumulated over passes), so memory does not grow with the number of classes.
    reference, reference_classifier: a clean CLIP (and its classifier, same classes): each
    perturbation is also measured on it, with the same images and patch places
    (Search.reference_hits). Perturbations that exploit what both models share (natural
    attractors; a fine-tune inherits them) capture on both; a backdoor only on the model.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [N,3,S,S], got {images.dtype} "
                         f"{tuple(images.shape)}")
    if len(images) < 4:
        raise ValueError(f"the scan needs at least 4 clean images, got {len(images)}")
    if (reference is None) != (reference_classifier is None):
        raise ValueError("give the reference model together with its classifier")
    geometries = tuple(geometries)
    C = classifier.shape[0]
    classes = list(range(C)) if classes is None else [int(c) for c in classes]
    if not classes or not all(0 <= c < C for c in classes):
        raise ValueError(f"classes must be indices in [0, {C}), got {classes}")
    device, S = classifier.device, images.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=gen)
    n_fit = min(len(images) - 2, max(2, round(fit_fraction * len(images))))
    fit, held = images[order[:n_fit]], images[order[n_fit:]]
    K = len(classes)
    # restarts: R perturbations per class from different random starts, trained together
    # (row r * K + j is class j's r-th); the one with the lowest fit loss over the last steps
    # is measured. A patch search can stall in a poor start (seen on the BadCLIP victim).
    R = int(restarts)
    target = torch.tensor(classes, device=device).repeat(R).repeat_interleave(batch_size)
    hits, ref_hits, counts, deltas = [], [], [], []
    with frozen(model, reference):
        clean_pred = predictions(model, held, classifier, mean=mean, std=std)
        for g in geometries:
            shape = (R * K, 3, g.side(S), g.side(S)) if g.mode == "patch" else (R * K, 3, S, S)
            w = (torch.randn(shape, generator=gen) if g.mode == "patch"
                 else 0.1 * torch.randn(shape, generator=gen)).to(device).requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            recent = torch.zeros(R * K, device=device)
            rows = max(1, chunk // batch_size)  # perturbations per forward pass
            for step in range(steps):
                idx = torch.randint(0, len(fit), (R * K * batch_size,), generator=gen)
                places = place_patches(g, S, len(idx), gen) if g.mode == "patch" else None
                opt.zero_grad(set_to_none=True)
                per_row = []
                for a in range(0, R * K, rows):  # the classes' rows, `chunk` images at a time
                    i = slice(a * batch_size, min(a + rows, R * K) * batch_size)
                    delta = _delta(g, w[a:a + rows]).repeat_interleave(batch_size, 0)
                    at = None if places is None else (places[0][i], places[1][i])
                    x = perturb(fit[idx[i]].to(device), g, delta, mean=mean, std=std, places=at)
                    logits = logit_scale * image_features(model, x) @ classifier.T
                    part = F.cross_entropy(logits, target[i], reduction="none")
                    # (one pass: the mean, as before chunks; else each chunk's share of it)
                    (part.mean() if rows >= R * K else part.sum() / len(idx)).backward()
                    per_row.append(part.detach())
                opt.step()
                if step >= steps - max(1, steps // 4):
                    recent += torch.cat(per_row).view(R * K, batch_size).mean(1)
            best = recent.view(R, K).argmin(0) * K + torch.arange(K, device=device)
            w = w.detach()[best]
            d = _delta(g, w).detach()
            with torch.no_grad():
                h, n, rh = _capture(model, held, clean_pred, g, d, classes, classifier,
                                    mean=mean, std=std, seed=seed, reference=reference,
                                    reference_classifier=reference_classifier)
            hits.append(h)
            counts.append(n)
            ref_hits.append(rh)
            deltas.append(d.cpu())
    return Search(geometries, classes, torch.stack(hits), torch.stack(counts), deltas, S,
                  reference_hits=None if reference is None else torch.stack(ref_hits),
                  settings=dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                restarts=R,
                                n_fit=int(n_fit), n_held_out=len(held)))


def _capture(model, held, clean_pred, g, deltas, classes, classifier, *, mean, std, seed,
             reference=None, reference_classifier=None, batch_size: int = 500):
    """Per searched class on the held-out images the model does not put in it: (how many the
    perturbation sends to it, how many there are, how many it sends there on the reference
    or None). Patch places are seeded by `seed`, the same for every class and both models."""
    device = classifier.device
    gen = torch.Generator().manual_seed(seed + 1)
    places = place_patches(g, held.shape[-1], len(held), gen) if g.mode == "patch" else None
    hits, counts, ref_hits = (torch.zeros(len(classes)) for _ in range(3))
    for k in range(0, len(held), batch_size):
        x0 = held[k:k + batch_size].to(device)
        pl = None if places is None else (places[0][k:k + batch_size], places[1][k:k + batch_size])
        base = clean_pred[k:k + batch_size]
        for j, c in enumerate(classes):
            x = perturb(x0, g, deltas[j], mean=mean, std=std, places=pl)
            counted = base != c
            pred = (image_features(model, x) @ classifier.T).argmax(1)
            hits[j] += (counted & (pred == c)).sum().item()
            counts[j] += counted.sum().item()
            if reference is not None:
                pred = (image_features(reference, x) @ reference_classifier.T).argmax(1)
                ref_hits[j] += (counted & (pred == c)).sum().item()
    return hits, counts, (ref_hits if reference is not None else None)


# ---- the verdict ----------------------------------------------------------------------------

def arcsine(hits: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """(asin(sqrt(k / n)), its sampling variance 1 / (4 n)): the capture on the
    variance-stabilizing scale of a proportion (Anscombe), so the sampling noise is the same at
    0%, 50% and 100%. (Log-odds, tried first, stretch 0% and 100% so far apart that a class
    captured by 100% drowned in the noise its own boundary value carries.)"""
    n = counts.double().clamp(min=1)
    return torch.asin((hits.double() / n).clamp(0, 1).sqrt()), 1 / (4 * n)


def outlier_z(values: Tensor, variance: Tensor, floor: float) -> Tensor:
    """Per row (geometry), how far each class stands out from the others, over the last
    dimension: (v - median) / sqrt(max(1.4826 * MAD, floor)^2 + variance + median variance).
    MAD is the robust spread over classes; the sampling variances of the entry and of a typical
    entry keep a few images' difference from counting as an outlier; the floor keeps a row
    whose classes all sit at one value from dividing by ~0."""
    med = values.median(dim=-1, keepdim=True).values
    mad = 1.4826 * (values - med).abs().median(dim=-1, keepdim=True).values
    typical = variance.median(dim=-1, keepdim=True).values
    return (values - med) / (mad.clamp(min=floor) ** 2 + variance + typical).sqrt()


def class_scores(search: Search, floor: float = FLOOR) -> Tensor:
    """z [G, C]: per geometry, each class's outlier z-score (`outlier_z`) of the capture on the
    arcsine scale, or with a reference (Search.reference_hits) of the *gap* between the model
    and the reference under the same perturbations."""
    lo, var = arcsine(search.hits, search.counts)
    if search.reference_hits is not None:
        lo_ref, var_ref = arcsine(search.reference_hits, search.counts)
        lo, var = lo - lo_ref, var + var_ref
    return outlier_z(lo, var, floor).float()


def verdict(search: Search, classnames, *, threshold: float | None = None,
            floor: float = FLOOR) -> dict:
    """Backdoored or clean, from a class_search: scan.json's fields.

    A class's score is its largest z over geometries (`class_scores`), the model's score the
    largest over classes, and the suspected target that class when the score exceeds the
    threshold (default: the one calibrated on clean models for the search's mode, self or
    reference: THRESHOLDS, docs/SCAN.md). per_class: every class's capture rate (%) under the
    geometry that decided, so the rates compare."""
    mode = "reference" if search.reference_hits is not None else "self"
    z = class_scores(search, floor)
    per_class, best_geometry = z.max(0)
    col = int(per_class.argmax())
    score = float(per_class[col])
    threshold = THRESHOLDS[mode] if threshold is None else float(threshold)
    g = int(best_geometry[col])
    names = [classnames[c] for c in search.classes]
    backdoored = score > threshold
    out = {
        "backdoored": bool(backdoored), "score": round(score, 4), "threshold": threshold,
        "suspected_target": names[col] if backdoored else None,
        "most_anomalous_class": names[col], "mode": mode,
        "geometry": search.geometries[g].name,
        "per_class": {n: round(100 * float(search.rates[g, j]), 2) for j, n in enumerate(names)},
        "class_scores": {n: round(float(per_class[j]), 3) for j, n in enumerate(names)},
        "capture": search.table(classnames),
    }
    if search.reference_hits is not None:
        out["reference_capture"] = search.table(classnames, search.reference_hits)
    return out


def scan_model(model, images: Tensor, classnames, *, tokenizer, mean, std, reference=None,
               geometries=DEFAULT_GEOMETRIES, threshold: float | None = None,
               **search_kw) -> tuple[dict, Search]:
    """The whole model scan: zero-shot classifiers of `classnames` (the model's, and the
    reference's with the same tokenizer), class_search (search_kw: steps, lr, batch_size,
    seed, classes, ...) and the verdict. Returns (scan.json's fields, the Search).
    With a reference the verdict is the reference mode's; the self mode's score of the same
    search is kept under "self" for comparison."""
    from abd_fast.evaluate import zero_shot_classifier
    device = next(model.parameters()).device
    classifier = zero_shot_classifier(model, tokenizer, classnames, device=device)
    ref_classifier = None
    if reference is not None:
        ref_classifier = zero_shot_classifier(reference, tokenizer, classnames, device=device)
    search = class_search(model, images, classifier, mean=mean, std=std, geometries=geometries,
                          reference=reference, reference_classifier=ref_classifier, **search_kw)
    result = verdict(search, classnames, threshold=threshold)
    if reference is not None:
        own = Search(search.geometries, search.classes, search.hits, search.counts,
                     search.deltas, search.image_size, settings=search.settings)
        v = verdict(own, classnames)
        result["self"] = {k: v[k] for k in ("backdoored", "score", "threshold",
                                             "most_anomalous_class", "geometry")}
    result["settings"] = dict(search.settings, geometries=[g.name for g in search.geometries],
                              n_images=len(images))
    return result, search


def scan_images(source, n: int, *, image_size: int, classnames=None, loader=None,
                num_workers=None) -> tuple[Tensor, list]:
    """(uint8 [<= n, 3, S, S], class names): n images evenly spaced over an evaluation source's
    listing (an ImageFolder lists by class, so every class is represented; only these are
    decoded; their labels are not kept)."""
    import numpy as np

    from abd_fast.data import build_loader
    from abd_fast.data.sources import open_source
    manifest = open_source(source, classnames=classnames)
    if len(manifest) > n:
        manifest = manifest.subset(np.unique(np.linspace(0, len(manifest) - 1, n).round()
                                             .astype(np.int64)), "scan")
    data = build_loader(manifest, train=False, batch_size=250, image_size=image_size,
                        loader=loader, num_workers=num_workers)
    return torch.cat([b.images for b in data]), list(manifest.classnames or [])


def save_uap_png(images: Tensor, geometry: Geometry, delta: Tensor, path, n: int = 8,
                 seed: int = 0):
    """PNG: n clean images (top row) and the same images with the perturbation (bottom)."""
    import numpy as np
    from PIL import Image
    x = images[:n]
    places = (place_patches(geometry, x.shape[-1], len(x), torch.Generator().manual_seed(seed))
              if geometry.mode == "patch" else None)
    adv = perturb(x, geometry, delta.float(), mean=None, std=None, places=places)
    top = x.permute(0, 2, 3, 1).numpy()
    bottom = (adv.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.concatenate([np.concatenate(list(top), 1), np.concatenate(list(bottom), 1)], 0)
    scale = max(1, 96 // x.shape[-1])
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path)


