"""Fine-tuning objectives of the defenses, on L2-normalized features (what open_clip's
CLIP.forward returns) and the model's logit scale (the multiplier, exp of the learned log):

    FT        mmcl(I, T)                                   multimodal contrastive loss (CLIP)
    CleanCLIP mmcl(I, T) + ½[nce(I, I_aug) + nce(T, T_aug)]  AutoAugment image view, EDA text view
    ABD align the CleanCLIP form with I_aug = the image with the UAP, T_aug = EDA(caption)
    ABD replace  mmcl(I_adv, T_eda)
    ABD union    λ1·mmcl(I, T) + λ2·mmcl(I_adv, T_eda)  the paper's "enhanced dataset" (§II-C)
    RoCLIP    mmcl(I, NN(I)) every break_epoch-th epoch, NN(I) = the nearest text embedding in a
              memory bank of past (detached) text embeddings; mmcl(I, T) in the other epochs

The in-modal terms are one-directional, as in CleanCLIP (each image against the augmented
images of the batch). Under DDP every term uses the features of all ranks (gathered with
their gradient) as negatives and this rank's rows as queries.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from abd_fast.ops import ClipLoss, info_nce
from abd_fast.precision import full_precision


class Contrastive:
    """The two contrastive losses the objectives are made of, local or across DDP ranks:
    `pair(a, b)` = ½[InfoNCE(a, b) + InfoNCE(b, a)] (CLIP's loss) and `one_way(q, k)` =
    InfoNCE(q, k), each with in-batch (all-rank) negatives."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self._clip = ClipLoss(local_loss=world_size > 1, gather_with_grad=True, rank=rank,
                              world_size=world_size)

    def pair(self, a: Tensor, b: Tensor, logit_scale) -> Tensor:
        return self._clip(a, b, logit_scale)

    def one_way(self, q: Tensor, k: Tensor, logit_scale) -> Tensor:
        if self.world_size == 1:
            return info_nce(q, k, logit_scale)
        import torch.distributed.nn as dist_nn
        everything = torch.cat(dist_nn.all_gather(k), dim=0)
        return info_nce(q, everything, logit_scale, offset=self.rank * q.shape[0])


LOCAL = Contrastive()


def mmcl(image_features: Tensor, text_features: Tensor, logit_scale,
         c: Contrastive = LOCAL) -> Tensor:
    """Multimodal contrastive loss: CLIP's symmetric InfoNCE over the batch (FT's objective)."""
    return c.pair(image_features, text_features, logit_scale)


def inmodal(features: Tensor, augmented: Tensor, logit_scale, c: Contrastive = LOCAL) -> Tensor:
    """In-modal self-supervised term: InfoNCE of each sample against its augmented view."""
    return c.one_way(features, augmented, logit_scale)


def cleanclip_objective(image: Tensor, text: Tensor, image_aug: Tensor, text_aug: Tensor,
                        logit_scale, *, lambda1: float = 1.0, lambda2: float = 1.0,
                        c: Contrastive = LOCAL) -> Tensor:
    """λ1·mmcl(I, T) + λ2·½[inmodal(I, I_aug) + inmodal(T, T_aug)] (CleanCLIP; ABD `align` with
    the adversarial image view and the EDA text view)."""
    return (lambda1 * mmcl(image, text, logit_scale, c)
            + lambda2 * 0.5 * (inmodal(image, image_aug, logit_scale, c)
                               + inmodal(text, text_aug, logit_scale, c)))


class TextBank:
    """RoCLIP's memory bank: a FIFO ring of the most recent `size` text embeddings (detached).
    `nearest(I)` returns, for each image embedding, the bank entry of highest cosine similarity."""

    def __init__(self, size: int, dim: int, device="cpu"):
        if size < 1:
            raise ValueError(f"--bank-size must be positive, got {size}")
        self.features = torch.zeros(size, dim, device=device)
        self.count, self.next = 0, 0

    def update(self, text_features: Tensor):
        if text_features.shape[-1] != self.features.shape[1]:
            raise ValueError(f"text features of dimension {text_features.shape[-1]} for a bank "
                             f"of dimension {self.features.shape[1]}")
        t = F.normalize(text_features.detach().float(), dim=-1)
        if t.shape[0] >= len(self.features):
            t = t[-len(self.features):]
        idx = (self.next + torch.arange(t.shape[0], device=t.device)) % len(self.features)
        self.features[idx] = t.to(self.features.device)
        self.next = int((self.next + t.shape[0]) % len(self.features))
        self.count = min(len(self.features), self.count + t.shape[0])

    def nearest(self, image_features: Tensor) -> Tensor:
        if self.count == 0:
            raise RuntimeError("RoCLIP's text bank is empty: fill it before the first "
                               "nearest-neighbour epoch")
        bank = self.features[:self.count].to(image_features.device)
        with full_precision(bank.device):  # a bf16 product would blur close neighbours
            sim = F.normalize(image_features.detach().float(), dim=-1) @ bank.T
        return bank[sim.argmax(dim=1)].to(image_features.dtype)

    def state_dict(self) -> dict:
        return {"features": self.features, "count": self.count, "next": self.next}

    def load_state_dict(self, state: dict):
        self.features.copy_(state["features"])
        self.count, self.next = int(state["count"]), int(state["next"])


def roclip_uses_nearest(epoch: int, break_epoch: int = 2) -> bool:
    """RoCLIP matches images to their nearest bank text in every break_epoch-th epoch
    (0-based epochs break_epoch-1, 2*break_epoch-1, ...), so the bank is full by then."""
    if break_epoch < 1:
        raise ValueError(f"--break-epoch must be at least 1, got {break_epoch}")
    return (epoch + 1) % break_epoch == 0


def roclip_objective(image: Tensor, text: Tensor, logit_scale, bank: TextBank, epoch: int, *,
                     break_epoch: int = 2, c: Contrastive = LOCAL, update: bool = True) -> Tensor:
    """mmcl(I, NN(I)) in nearest-neighbour epochs (the bank's texts carry no gradient), else
    mmcl(I, T); then the bank takes this batch's texts (update=False: the caller updates it,
    e.g. with the texts of every rank)."""
    if roclip_uses_nearest(epoch, break_epoch):
        loss = mmcl(image, bank.nearest(image), logit_scale, c)
    else:
        loss = mmcl(image, text, logit_scale, c)
    if update:
        bank.update(text)
    return loss


def abd_objective(image: Tensor, text: Tensor, image_adv: Optional[Tensor],
                  text_eda: Optional[Tensor], logit_scale, *, objective: str = "align",
                  lambda1: float = 1.0, lambda2: float = 1.0,
                  c: Contrastive = LOCAL) -> Tensor:
    """ABD fine-tuning.
    align:   λ1·mmcl(I, T) + λ2·½[inmodal(I, I_adv) + inmodal(T, T_eda)]
    replace: mmcl(I_adv, T_eda)
    union:   λ1·mmcl(I, T) + λ2·mmcl(I_adv, T_eda): the clean pairs and their enhanced
             versions both trained as pairs, each batch contrasted within itself (the sum of
             two InfoNCEs, not one batch of 2N pairs: there (I_adv_i, T_i) and (I_i, T_eda_i)
             would be negatives although they describe the same sample; docs/METHOD.md)
    For the ablation (ABD Table II) a view may be None: under align its in-modal term is left
    out (the other keeps its weight), under replace and union the clean view stands in. With
    neither view align and replace are plain FT, mmcl(I, T) (union: λ1 + λ2 times it)."""
    if objective in ("replace", "union"):
        enhanced = mmcl(image if image_adv is None else image_adv,
                        text if text_eda is None else text_eda, logit_scale, c)
        if objective == "replace":
            return enhanced
        return lambda1 * mmcl(image, text, logit_scale, c) + lambda2 * enhanced
    if objective != "align":
        raise ValueError(f"--abd-objective must be 'align', 'replace' or 'union', got "
                         f"{objective!r}")
    loss = lambda1 * mmcl(image, text, logit_scale, c)
    if image_adv is not None:
        loss = loss + lambda2 * 0.5 * inmodal(image, image_adv, logit_scale, c)
    if text_eda is not None:
        loss = loss + lambda2 * 0.5 * inmodal(text, text_eda, logit_scale, c)
    return loss
