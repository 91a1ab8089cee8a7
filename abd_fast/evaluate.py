"""Zero-shot evaluation of a CLIP: clean accuracy (CA), attack success rate (ASR) and the
clean/triggered embedding distance, in one pass over the evaluation data.

Protocol (DESIGN §2):
  classifier  class embedding = normalize(mean_t normalize(E_T(template_t(class)))) over the
              80 OpenAI ImageNet templates; scores = cosine(image, class).
  CA          top-1 / top-5 accuracy on the clean images (all classes).
  ASR         among images whose true class is not the target, the fraction whose triggered
              version is classified (top-1) as the target. Target-class images are excluded
              from numerator and denominator.
  distance    d = mean over all images of 2 - 2 cos(E_I(x), E_I(trigger(x))) (CleanCLIP's
              measure; 0 = identical, 2 = orthogonal).
  capture     target-free: for each class c, the share of images not of class c whose
              triggered version is classified as c; capture_class = the class with the
              largest share, capture_rate = that share (for c = the target it is the ASR).
              Of a UAP, it says where the perturbation sends images without knowing the
              target (the UAP-alone floor in the report).
Rates are percentages (0-100).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from abd_fast.models import image_features, imagenet_templates, text_features
from abd_fast.ops import normalize_images


def default_tokenizer(model):
    """open_clip's BPE tokenizer at the model's context length (what open_clip.get_tokenizer
    returns for the CLIP configs without a Hugging Face text tower)."""
    return _simple_tokenizer(getattr(model, "context_length", 77))


@functools.cache
def _simple_tokenizer(context_length: int):
    """Built once per process and context length (~0.4 s each; its only state is a BPE memo,
    as for models._open_clip_tokenizer)."""
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


class _EvalMode:
    """model.eval() and torch.no_grad() inside, the model's previous mode restored after."""
    def __init__(self, model):
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self):
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def zero_shot_classifier(model, tokenizer, classnames, templates=None, device="cpu",
                         max_texts: int = 1024) -> Tensor:
    """[C, D] float32: row c = normalize(mean_t normalize(encode_text(template_t(class_c)))).

    templates: callables name -> prompt (default open_clip's 80 OPENAI_IMAGENET_TEMPLATES).
    Texts are encoded in chunks of at most max_texts prompts (whole classes)."""
    templates = imagenet_templates() if templates is None else templates
    if not classnames:
        raise ValueError("zero-shot classification needs class names (--classnames)")
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    per_chunk = max(1, max_texts // len(templates))
    rows = []
    with _EvalMode(model):
        for k in range(0, len(classnames), per_chunk):
            names = classnames[k:k + per_chunk]
            tokens = tokenizer([t(c) for c in names for t in templates]).to(device)
            emb = text_features(model, tokens)
            emb = emb.reshape(len(names), len(templates), -1).mean(1)
            rows.append(F.normalize(emb, dim=-1))
    return torch.cat(rows)


def _all_reduce(t: Tensor) -> Tensor:
    """Sum over ranks when torch.distributed runs (each rank evaluated its share)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def evaluate(model, loader, *, classnames, trigger=None, target_index: int | None = None,
             mean, std, device="cpu", tokenizer=None, classifier: Tensor | None = None,
             out_dtype=torch.float32) -> dict:
    """Zero-shot CA, ASR and embedding distance of `model` on `loader` (Batches with labels).

    trigger: an abd_fast.attacks Trigger (applied to every eval image, seeded by its id), or
    None for CA only. target_index: index of the target class in classnames (needed with a
    trigger). mean/std: the model's normalization. classifier: precomputed
    zero_shot_classifier output; else it is built with `tokenizer` (default: open_clip's at
    the model's context length). Under torch.distributed, counts are summed over ranks.

    Returns {"ca_top1", "ca_top5", "asr", "n_eval", "n_asr", "n_classes",
    "embedding_distance", "capture_class", "capture_rate"}: rates in percent, asr,
    embedding_distance and capture_* None without a trigger; n_eval = images evaluated,
    n_asr = non-target-class images (the ASR denominator), n_classes = len(classnames)
    (chance top-1 = 100 / n_classes)."""
    if trigger is not None and target_index is None:
        raise ValueError("ASR needs the target class: give --target-label with --attack")
    if target_index is not None and not 0 <= target_index < len(classnames):
        raise ValueError(f"target index {target_index} outside the {len(classnames)} classes")
    if classifier is None:
        classifier = zero_shot_classifier(model, tokenizer, classnames, device=device)
    classifier = classifier.to(device=device, dtype=torch.float32)
    k5 = min(5, classifier.shape[0])
    # [top1 correct, top5 correct, images, ASR hits, non-target images, sum of distances]
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    # per class c: [images sent to c (not of class c), images of class c]
    capture = torch.zeros(2, classifier.shape[0], dtype=torch.float64, device=device)
    with _EvalMode(model):
        for batch in loader:
            if batch.labels is None:
                raise ValueError("the evaluation data has no labels: give --eval-data as an "
                                 "ImageFolder or a labels CSV")
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels.to(device)
            x = normalize_images(images, mean, std, out_dtype=out_dtype)
            if trigger is not None:  # one forward pass over clean and triggered images
                x = torch.cat([x, trigger.apply(images, batch.ids, mean=mean, std=std,
                                                out_dtype=out_dtype)])
            feats = image_features(model, x)
            clean = feats[:len(labels)]
            top = (clean @ classifier.T).topk(k5, dim=1).indices
            totals[0] += (top[:, 0] == labels).sum()
            totals[1] += (top == labels[:, None]).any(1).sum()
            totals[2] += len(labels)
            if trigger is not None:
                triggered = feats[len(labels):]
                pred = (triggered @ classifier.T).argmax(1)
                counted = labels != target_index
                totals[3] += (counted & (pred == target_index)).sum()
                totals[4] += counted.sum()
                totals[5] += (2 - 2 * (clean * triggered).sum(1)).double().sum()
                n_cls = capture.shape[1]
                capture[0] += torch.bincount(pred[pred != labels], minlength=n_cls).double()
                capture[1] += torch.bincount(labels, minlength=n_cls).double()
    t = _all_reduce(totals).tolist()
    n = int(t[2])
    if n == 0:
        raise ValueError("the evaluation data yielded no images")
    out = {"ca_top1": 100 * t[0] / n, "ca_top5": 100 * t[1] / n, "asr": None, "n_eval": n,
           "n_asr": int(t[4]), "n_classes": len(classnames), "embedding_distance": None,
           "capture_class": None, "capture_rate": None}
    if trigger is not None:
        out["asr"] = 100 * t[3] / t[4] if t[4] else None
        out["embedding_distance"] = t[5] / n
        sent, own = _all_reduce(capture)
        rates = torch.where(own < n, 100 * sent / (n - own).clamp(min=1), torch.zeros_like(sent))
        c = int(rates.argmax())
        out["capture_class"], out["capture_rate"] = classnames[c], float(rates[c])
    return out


def summary_line(result: dict) -> str:
    """One line a person can read, e.g. 'CA top-1 61.20% top-5 90.10% | ASR 97.33% (900
    non-target images) | d 1.412 | 1000 images'."""
    s = f"CA top-1 {result['ca_top1']:.2f}% top-5 {result['ca_top5']:.2f}%"
    if result.get("asr") is not None:
        s += f" | ASR {result['asr']:.2f}% ({result['n_asr']} non-target images)"
    if result.get("embedding_distance") is not None:
        s += f" | d {result['embedding_distance']:.3f}"
    return s + f" | {result['n_eval']} images"


def similarity_analysis(model, loader, *, target: str, trigger=None, uap=None, mean, std,
                        device="cpu", tokenizer=None, max_batches: int | None = None,
                        templates=None) -> dict:
    """ABD Fig. 2: five mean image-caption cosine similarities (x100) on caption data.

      clean_own_caption              clean image, its own caption
      triggered_backdoor_caption     triggered image, the backdoor captions
      adversarial_own_caption        image with the UAP, its own caption
      adversarial_backdoor_caption   image with the UAP, the backdoor captions
      adversarial_unrelated_caption  image with the UAP, another sample's caption (the batch
                                     rolled by one: unrelated content)
    The backdoor captions are the 80 OpenAI templates filled with the target class name (the
    captions the attack pairs with triggered images); a "backdoor" similarity is the mean
    over them. trigger: an attack Trigger; uap: a defenses.uap.UAP; either may be None (its
    entries are then None). Returns the five values, n_images and target (report.json's
    "similarity" schema, docs/REPORT.md)."""
    templates = imagenet_templates() if templates is None else templates
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    sums = torch.zeros(5, dtype=torch.float64)
    n = 0
    with _EvalMode(model):
        backdoor = text_features(model, tokenizer([t(target) for t in templates]).to(device))
        for k, batch in enumerate(loader):
            if max_batches is not None and k >= max_batches:
                break
            if not batch.captions:
                raise ValueError("the similarity analysis needs caption data (--train-data)")
            images = batch.images.to(device)
            own = text_features(model, tokenizer(batch.captions).to(device))
            clean = image_features(model, normalize_images(images, mean, std))
            sums[0] += (clean * own).sum(1).sum().double()
            if trigger is not None:
                trig = image_features(model, trigger.apply(images, batch.ids, mean=mean, std=std))
                sums[1] += (trig @ backdoor.T).mean(1).sum().double()
            if uap is not None:
                adv = image_features(model, uap.apply(images, batch.ids, mean=mean, std=std))
                sums[2] += (adv * own).sum(1).sum().double()
                sums[3] += (adv @ backdoor.T).mean(1).sum().double()
                sums[4] += (adv * own.roll(1, dims=0)).sum(1).sum().double()
            n += len(images)
    if n == 0:
        raise ValueError("the similarity analysis saw no images")
    v = (100 * sums / n).tolist()
    return {"clean_own_caption": v[0],
            "triggered_backdoor_caption": v[1] if trigger is not None else None,
            "adversarial_own_caption": v[2] if uap is not None else None,
            "adversarial_backdoor_caption": v[3] if uap is not None else None,
            "adversarial_unrelated_caption": v[4] if uap is not None else None,
            "n_images": n, "target": target}


def clean_and_triggered_features(model, loader, trigger, *, mean, std) -> tuple[Tensor, Tensor]:
    """Normalized fp32 image features of every image of `loader` and of its triggered version,
    [N, D] each in loader order; a batch's clean and triggered images share one forward pass
    (as in evaluate)."""
    clean, triggered = [], []
    with torch.no_grad():
        for batch in loader:
            x = torch.cat([normalize_images(batch.images, mean, std),
                           trigger.apply(batch.images, batch.ids, mean=mean, std=std)])
            clean_f, trig_f = image_features(model, x).chunk(2)
            clean.append(clean_f)
            triggered.append(trig_f)
    return torch.cat(clean), torch.cat(triggered)


EVAL_FILE = "eval.json"  # what every command that evaluates writes into its output directory


def read_eval(directory) -> dict:
    """The evaluation result a command wrote to DIRECTORY/eval.json."""
    return json.loads((Path(directory) / EVAL_FILE).read_text())
