"""Target-free choice among candidate UAPs (issue 17 item 3), on a validation split.

A defender knows neither the trigger nor the target, and a raw collapse rate misleads: an
L-inf UAP sends most images of the demo's *clean* model to 'ring' (a natural attractor the
poisoned model inherits). What a backdoor adds is a class the UAP captures far more on the
poisoned model than on the clean reference. For each candidate UAP and each class c:

    capture_m[c] = share of the val images that model m does not put in c on their own
                   which m puts in c once the UAP is applied      (m = poisoned, reference)
    gain[c]      = capture_poisoned[c] - capture_reference[c]     (percentage points)

The candidate's score is its largest gain, its top class that class; the chosen candidate
has the largest score. Only images and class names are read: no labels, no target. Given a
`focus` class (uap-select --criterion scan: the class the scan suspects, itself found without
the target), the score is the gain on that class instead.

    scores = score_uaps(uaps, model, reference, images, classnames, tokenizer=..., mean=...,
                        std=...)     # [{"score", "top_class", "capture", ...}] per candidate
"""
from __future__ import annotations

import torch
from torch import Tensor

from abd_fast.models import frozen
from abd_fast.scan.model import predictions


def capture(clean_pred: Tensor, adv_pred: Tensor, n_classes: int) -> Tensor:
    """[C] percent: per class c, among the images not predicted c without the UAP, the share
    predicted c with it (0 where every image is already c)."""
    out = torch.zeros(n_classes, dtype=torch.float64)
    for c in range(n_classes):
        counted = clean_pred != c
        n = int(counted.sum())
        out[c] = 100.0 * float((counted & (adv_pred == c)).sum()) / n if n else 0.0
    return out


def score_uaps(uaps: dict, model, reference, images: Tensor, classnames, *, tokenizer, mean,
               std, focus: str | None = None) -> list[dict]:
    """Per candidate (uaps: {name: defenses.uap.UAP}, in order): score (largest gain, or the
    gain on `focus`, points), top_class, the per-class capture on both models and the class
    each captures most."""
    from abd_fast.evaluate import zero_shot_classifier
    device = next(model.parameters()).device
    C = len(classnames)
    out = []
    with frozen(model, reference):
        heads = [(m, zero_shot_classifier(m, tokenizer, classnames, device=device))
                 for m in (model, reference)]
        clean = [predictions(m, images, w, mean=mean, std=std, batch_size=250).cpu()
                 for m, w in heads]
        for name, uap in uaps.items():
            cap = [capture(clean[i], predictions(m, images, w, mean=mean, std=std, trigger=uap,
                                                 batch_size=250).cpu(), C)
                   for i, (m, w) in enumerate(heads)]
            gain = cap[0] - cap[1]
            top = int(gain.argmax()) if focus is None else classnames.index(focus)
            table = lambda t: {classnames[c]: round(float(t[c]), 2) for c in range(C)}  # noqa
            out.append({"name": name, "score": round(float(gain[top]), 2),
                        "top_class": classnames[top],
                        "most_captured": {"poisoned": classnames[int(cap[0].argmax())],
                                          "reference": classnames[int(cap[1].argmax())]},
                        "capture": table(cap[0]), "reference_capture": table(cap[1]),
                        "gain": table(gain)})
    return out


def choose(scores: list[dict]) -> dict:
    """The candidate with the largest score (the first of equals)."""
    if not scores:
        raise ValueError("no candidate UAPs to choose from")
    return max(scores, key=lambda s: s["score"])
