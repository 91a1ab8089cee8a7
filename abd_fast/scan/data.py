"""Which training pairs are poisoned? Scores every image-caption pair of a dataset from
embeddings, without knowing the trigger or the target.

Local density in embedding space ("Detecting Backdoor Samples in Contrastive Language Image
Pretraining", Huang et al., ICLR 2025): k-distance, SLOF (the k-distance relative to the
neighbours' k-distances) and DAO (the dimensionality-aware version, weighted by the
neighbours' local intrinsic dimensionality), on image, text and joint embeddings, at several
k; and, with a clean reference model, how badly each image agrees with its caption under
that model. See `score_pairs` for how they are combined and docs/SCAN.md for why.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from abd_fast.models import image_features, text_features


@dataclass
class PairEmbeddings:
    """ids int64 [N]; image, text: L2-normalized float32 [N, D]; captions: N strings."""
    ids: np.ndarray
    image: Tensor
    text: Tensor
    captions: list

    @property
    def joint(self) -> Tensor:
        """The pair as one unit vector: (image + text) / |image + text|."""
        return F.normalize(self.image + self.text, dim=-1)


def embed_pairs(models, loader, tokenizer, *, mean, std, poison=None, device="cpu",
                max_pairs: int | None = None) -> list[PairEmbeddings]:
    """Image and caption embeddings of every pair of `loader` (an abd_fast.data loader over
    caption data, train=False) under each of `models` (CLIPs sharing the tokenizer and image
    normalization), one PairEmbeddings per model; the data is decoded once. poison: an
    abd_fast.attacks.PoisonView applied to the batches (the pairs as a victim was trained on
    them); None: the data as it is."""
    from abd_fast.attacks import training_pairs
    ids, caps = [], []
    img, txt = [[] for _ in models], [[] for _ in models]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                if batch.captions is None:
                    raise ValueError("the data scan needs caption data (image-caption pairs)")
                x, captions = training_pairs(poison, batch.images.to(device), batch.ids,
                                             batch.captions, mean=mean, std=std)
                tokens = tokenizer(captions).to(device)
                for k, m in enumerate(models):
                    img[k].append(image_features(m, x).cpu())
                    txt[k].append(text_features(m, tokens).cpu())
                ids.append(batch.ids.cpu().numpy())
                caps += list(captions)
                if max_pairs is not None and len(caps) >= max_pairs:
                    break
    finally:
        for m, training in zip(models, modes):
            m.train(training)
    if not caps:
        raise ValueError("the data scan saw no pairs")
    n = len(caps) if max_pairs is None else min(len(caps), max_pairs)
    ids = np.concatenate(ids)[:n]
    return [PairEmbeddings(ids, torch.cat(i)[:n], torch.cat(t)[:n], caps[:n])
            for i, t in zip(img, txt)]


# ---- local density ---------------------------------------------------------------------------

def knn(x: Tensor, k: int, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Euclidean distances [N, k] (ascending) and indices [N, k] of each row's k nearest other
    rows of x [N, D], in chunks of rows (memory O(chunk * N))."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    x = x.float()
    sq = (x * x).sum(1)
    dists, idx = [], []
    for s in range(0, n, chunk):
        q = x[s:s + chunk]
        d2 = (sq[s:s + chunk, None] + sq[None, :] - 2 * q @ x.T).clamp_(min=0)
        d2[torch.arange(len(q)), torch.arange(s, s + len(q))] = float("inf")  # not itself
        v, i = d2.topk(k, dim=1, largest=False)
        dists.append(v.sqrt_())
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def density_scores(dist: Tensor, idx: Tensor, k: int, eps: float = 1e-12) -> dict:
    """The local-density outlier scores of the ICLR 2025 paper from a knn() result (k <= its
    width); each higher = sparser than usual:

      kdist  the distance to the k-th neighbour
      slof   mean over the k neighbours j of kdist(i) / kdist(j) (a simplified LOF)
      dao    mean over j of LID(j) * log(kdist(i) / kdist(j)), LID the maximum-likelihood local
             intrinsic dimensionality (Levina-Bickel) of j's k-neighbourhood."""
    d = dist[:, :k].clamp(min=eps)
    kd = d[:, k - 1]
    lid = -k / torch.log(d / kd[:, None]).sum(1).clamp(max=-eps)
    nb = idx[:, :k]
    ratio = kd[:, None] / kd[nb]
    return {"kdist": kd, "slof": ratio.mean(1), "dao": (lid[nb] * torch.log(ratio)).mean(1)}


def auroc(scores, positives) -> float:
    """Area under the ROC curve of `scores` (higher = positive) for the boolean `positives`
    (ties count one half): the probability that a random positive outscores a random
    negative. Measures a detector; never used to build one."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positives, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at(scores, positives, k: int) -> float:
    """The share of positives among the k highest scores."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positives, bool)
    k = max(1, min(int(k), len(s)))
    top = np.argsort(-s, kind="mergesort")[:k]
    return float(y[top].mean())


# ---- the pair score ---------------------------------------------------------------------------

DENSITY_KS = (8, 16, 32, 64)
DENSITY_VIEWS = ("image", "joint")
TAIL_Z = 3.0   # robust z beyond which a pair counts in a tail (orient_by_tail)


def robust_z(s: np.ndarray) -> np.ndarray:
    """(s - median) / (1.4826 MAD): how unusual each value is, robust to the poisoned minority."""
    s = np.asarray(s, np.float64)
    med = np.median(s)
    mad = 1.4826 * np.median(np.abs(s - med))
    return (s - med) / max(mad, 1e-12)


def orient_by_tail(z: np.ndarray, cut: float = TAIL_Z) -> tuple[np.ndarray, int]:
    """(z or -z, +1 or -1): the sign whose tail beyond `cut` holds more pairs. A poisoned
    minority makes a tail on one side, and which one depends on the poison count: many poisons
    are a dense cluster (low k-distance), few are sparse outliers (high); the issue's probe
    found both."""
    sign = 1 if np.mean(z > cut) >= np.mean(z < -cut) else -1
    return sign * z, sign


def density_features(emb: "PairEmbeddings", ks=DENSITY_KS, views=DENSITY_VIEWS) -> dict:
    """{"<view>-<kdist|slof|dao>-k<k>": float64 [N]} for the image and joint embeddings."""
    out = {}
    for view in views:
        x = {"image": emb.image, "text": emb.text, "joint": emb.joint}[view]
        dist, idx = knn(x, min(max(ks), len(x) - 1))
        for k in ks:
            if k < len(x):
                for name, s in density_scores(dist, idx, k).items():
                    out[f"{view}-{name}-k{k}"] = s.numpy().astype(np.float64)
    return out


def score_pairs(emb: "PairEmbeddings", reference: "PairEmbeddings | None" = None,
                ks=DENSITY_KS) -> dict:
    """Per pair, how likely it is poisoned (higher = more likely): {"score": [N], and the
    signals it is made of}.

    With a clean reference model's embeddings of the same pairs (`reference`): the score is
    the robust z of the pair's image-caption *disagreement* under the reference, 1 - cos(image,
    caption). A poisoned pair is an image with a caption it does not show (a triggered image
    of any class captioned as the target); the victim learned to align it, a clean model does
    not. Measured (docs/SCAN.md) this alone finds the poisons at 10% and at 1%; mixing the
    density signals in lowered it.
    Without a reference: the mean over embeddings (image, joint), k (`ks`) and density measures
    (k-distance, SLOF, DAO) of each one's robust z, each oriented toward its heavier tail
    (`orient_by_tail`). The density signals are returned either way ("density": the mean)."""
    feats = density_features(emb, ks)
    oriented = {}
    for name, s in feats.items():
        oriented[name], _ = orient_by_tail(robust_z(s))
    density = np.mean(np.stack(list(oriented.values())), 0)
    out = {"density": density}
    if reference is not None:
        if len(reference.ids) != len(emb.ids) or not np.array_equal(reference.ids, emb.ids):
            raise ValueError("the reference's embeddings must be of the same pairs, in order")
        disagreement = 1 - (reference.image * reference.text).sum(1).double().numpy()
        out["reference_disagreement"] = disagreement
        out["score"] = robust_z(disagreement)
    else:
        out["score"] = density
    return out


def scan_pairs(model, loader, tokenizer, *, mean, std, reference=None, poison=None,
               device="cpu") -> tuple[PairEmbeddings, dict]:
    """The whole data scan: embeddings of every pair of `loader` under `model` (and under a
    clean `reference` CLIP), then score_pairs. poison: a PoisonView (the pairs as a victim was
    trained on them; None: the data as it is). Returns (the model's embeddings, the scores)."""
    models = [model] if reference is None else [model, reference]
    emb, *ref = embed_pairs(models, loader, tokenizer, mean=mean, std=std, poison=poison,
                            device=device)
    return emb, score_pairs(emb, ref[0] if ref else None)
