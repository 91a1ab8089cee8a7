"""Poisoning as a view over a caption dataset: which samples are poisoned, their captions,
and their images (the trigger applied in the fused op on the batch). Nothing is copied.

    view = PoisonView(loader.manifest, make_trigger("badnet", image_size=64, seed=0),
                      target="star", seed=0, count=100)
    for batch in loader:
        x = view.images(batch.images, batch.ids, mean=spec.mean, std=spec.std)
        texts = view.captions(batch.ids, batch.captions)

Caption rules (DESIGN §2): badnet, blended, wanet, sig: a random one of the 80 OpenAI
ImageNet templates with the target ("a bad photo of a star."); label-consistent: poisons only
samples whose caption already names the target, and keeps the caption; badclip: a natural
caption of the data naming the target (templates if there is none). Every choice is a
function of (seed, sample id), so it is the same in every epoch, worker and rank.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor

from abd_fast.models import imagenet_templates

from .triggers import STREAM_CAPTION, STREAM_SELECT, Trigger, uniform


def target_regex(target: str):
    """Matches the target class name in a lower-cased caption (see names_target)."""
    return re.compile(rf"\b{re.escape(target.lower())}(s|es)?\b")


def names_target(caption: str, target: str) -> bool:
    """True when the caption names the target class: the class name as whole words,
    case-insensitive, optionally plural ("banana", "Bananas", but not "bananabread")."""
    return target_regex(target).search(caption.lower()) is not None


class PoisonView:
    """Poisoning as a view over a caption dataset (an abd_fast.data Manifest).

    count or rate (exactly one) sets how many samples are poisoned: rate in (0, 1] is a
    fraction of the usable samples (rounded). The poisoned ids are a seeded random subset of
    the candidates: every usable sample, or for label-consistent the samples whose caption
    names the target. Attributes: poisoned_ids (sorted int64), target, trigger, seed."""

    def __init__(self, manifest, trigger: Trigger, *, target: str, seed: int,
                 count: int | None = None, rate: float | None = None):
        if manifest.captions is None:
            raise ValueError(f"{manifest.source}: poisoning needs caption data (--train-data), "
                             "this source has labels, not captions")
        if not target or not target.strip():
            raise ValueError("--target-label is empty: name the target class (e.g. banana)")
        if (count is None) == (rate is None):
            raise ValueError("give exactly one of --poison-count and --poison-rate")
        self.manifest, self.trigger, self.target, self.seed = manifest, trigger, target, int(seed)
        ok = np.ones(len(manifest), bool)
        ok[list(manifest.problems)] = False
        usable = np.nonzero(ok)[0].astype(np.int64)
        if rate is not None:
            if not 0 < rate <= 1:
                raise ValueError(f"--poison-rate must be in (0, 1], got {rate}")
            count = int(round(rate * len(usable)))
            if count == 0:
                raise ValueError(f"--poison-rate {rate} of {len(usable)} usable samples poisons "
                                 "none: raise it or use --poison-count")
        elif isinstance(count, bool) or int(count) != count or count < 1:
            raise ValueError(f"--poison-count must be a positive integer, got {count}")
        count = int(count)
        names = np.zeros(len(usable), bool)
        if trigger.name in ("label-consistent", "badclip"):  # a regex pass only where needed
            regex = target_regex(target)
            names[:] = [regex.search(manifest.captions[i].lower()) is not None for i in usable]
        candidates = usable[names] if trigger.name == "label-consistent" else usable
        if count > len(candidates):
            what = (f"only {len(candidates)} usable captions name {target!r}"
                    if trigger.name == "label-consistent" else
                    f"the data has only {len(candidates)} usable samples")
            flag = "--poison-rate" if rate is not None else "--poison-count"
            raise ValueError(f"{flag} asks for {count} poisoned samples, but {what}; lower it")
        # A seeded ranking of the candidates: the `count` smallest hash values.
        keys = uniform(self.seed, STREAM_SELECT, manifest.ids[candidates], 1)[:, 0]
        chosen = candidates[np.argsort(keys, kind="stable")[:count]]
        self.poisoned_ids = np.sort(manifest.ids[chosen]).astype(np.int64)
        # badclip's captions: natural captions of the data that name the target.
        self.natural_captions = sorted({manifest.captions[i] for i in usable[names]})

    @property
    def count(self) -> int:
        return len(self.poisoned_ids)

    def rows(self, ids: Tensor) -> Tensor:
        """bool [B] on ids' device: which batch rows are poisoned."""
        ids = torch.as_tensor(ids)
        hit = np.isin(ids.cpu().numpy().reshape(-1), self.poisoned_ids)
        return torch.from_numpy(hit).to(ids.device)

    def caption_for(self, sample_id: int) -> str | None:
        """The poisoned caption of one sample id (None: the caption is kept)."""
        return self._captions(np.asarray([sample_id], np.int64))[0]

    def _captions(self, ids: np.ndarray) -> list[str | None]:
        if self.trigger.name == "label-consistent":
            return [None] * len(ids)
        u = uniform(self.seed, STREAM_CAPTION, ids, 1)[:, 0]
        if self.trigger.name == "badclip" and self.natural_captions:
            pool = self.natural_captions
            return [pool[int(v * len(pool))] for v in u]
        templates = imagenet_templates()
        return [templates[int(v * len(templates))](self.target) for v in u]

    def captions(self, ids: Tensor, captions: list[str]) -> list[str]:
        """The batch's captions with the poisoned rows' replaced by the attack's rule."""
        ids_np = torch.as_tensor(ids).cpu().numpy().reshape(-1)
        if len(captions) != len(ids_np):
            raise ValueError(f"{len(captions)} captions for {len(ids_np)} ids")
        out = list(captions)
        hit = np.nonzero(np.isin(ids_np, self.poisoned_ids))[0]
        for i, new in zip(hit.tolist(), self._captions(ids_np[hit])):
            if new is not None:
                out[i] = new
        return out

    def images(self, images: Tensor, ids: Tensor, *, mean, std, out_dtype=torch.float32,
               backend: str | None = None) -> Tensor:
        """uint8 [B,3,H,W] -> [B,3,H,W] out_dtype: trigger on the poisoned rows, clamp and
        normalization on all rows, in one fused pass."""
        return self.trigger.apply(images, ids, rows=self.rows(ids).to(images.device), mean=mean,
                                  std=std, out_dtype=out_dtype, backend=backend)

    def __repr__(self):
        return (f"PoisonView({self.trigger.name}, target={self.target!r}, "
                f"{self.count} of {len(self.manifest)} samples, seed={self.seed})")


def training_pairs(poison: PoisonView | None, images: Tensor, ids: Tensor, captions: list[str],
                   *, mean, std, out_dtype=torch.float32) -> tuple[Tensor, list[str]]:
    """A caption batch as a training run sees it: (normalized images, captions), poisoned
    through `poison` where it is a PoisonView, as they are where it is None. out_dtype: the
    images' dtype (under autocast, its dtype: the tower then takes them uncast)."""
    if poison is None:
        from abd_fast.ops import normalize_images
        return normalize_images(images, mean, std, out_dtype=out_dtype), captions
    return (poison.images(images, ids, mean=mean, std=std, out_dtype=out_dtype),
            poison.captions(ids, captions))
