"""Augmented views the defenses train on (uint8 batches in, uint8 batches out, per-sample
random parameters from torch's global generator, which the training engine seeds and
checkpoints, so a resumed run draws the same views):

    autoaugment(images)      CleanCLIP's image view: torchvision AutoAugment (ImageNet policy)
    cross_augment(images)    RoCLIP's image view: random resized crop, flip, colour jitter
                             (p 0.8), grayscale (p 0.2), Gaussian blur
    brighten(images)         ABD's reference view for the backdoor loss (Fig. 1: brightness up)
    eda_view(eda, ...)       EDA of the captions, redrawn every epoch, keyed by (epoch, id)
"""
from __future__ import annotations

import torch
from torch import Tensor


def _per_sample(transform, images: Tensor) -> Tensor:
    # torchvision's v2 transforms draw one set of parameters per call: a call per image
    # gives each sample its own augmentation.
    return torch.stack([transform(img) for img in images])


def autoaugment(images: Tensor) -> Tensor:
    """AutoAugment (ImageNet policy) per image, uint8 [B,3,H,W] -> uint8 [B,3,H,W]."""
    from torchvision.transforms import v2
    return _per_sample(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), images)


def cross_augment(images: Tensor, crop_scale=(0.5, 1.0)) -> Tensor:
    """RoCLIP's image augmentation per image, uint8 [B,3,S,S] -> uint8 [B,3,S,S]."""
    from torchvision.transforms import v2
    S = images.shape[-1]
    blur = max(3, (S // 10) | 1)  # odd kernel, ~10% of the image as in SimCLR
    t = v2.Compose([v2.RandomResizedCrop(S, scale=crop_scale, antialias=True),
                    v2.RandomHorizontalFlip(),
                    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                    v2.RandomGrayscale(p=0.2),
                    v2.GaussianBlur(blur, sigma=(0.1, 2.0))])
    return _per_sample(t, images)


def brighten(images: Tensor, factor: float = 1.2) -> Tensor:
    """Brightness increase: clamp(x * factor, 0, 1), float32 [B,3,H,W] in [0,1]."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return (x * factor).clamp_(0, 1)


def eda_view(eda, captions: list[str], ids: Tensor, epoch: int) -> list[str]:
    """EDA of each caption keyed by (epoch, sample id): the same in every worker and rank and
    on resume, a fresh draw every epoch (CleanCLIP augments once per dataset)."""
    return eda.batch(captions, keys=[(int(epoch), int(i)) for i in ids.tolist()])
