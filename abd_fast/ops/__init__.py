"""Fused ops for CLIP training: InfoNCE / CLIP loss and the image trigger/perturbation ops.

    from abd_fast.ops import info_nce, clip_loss, ClipLoss, apply_trigger, apply_perturbation

Each op has a plain-PyTorch reference in abd_fast.ops.reference (its specification) and
backends "cpu", "cuda", "triton" and "reference" (see abd_fast.ops._backend). The CPU kernels
take large outputs from a pool of reused blocks (cpu_pool_stats, set_cpu_pool_limit,
release_cpu_pool; abd_fast.ops.image).
"""
from .contrastive import clip_loss, info_nce
from .image import (apply_perturbation, apply_trigger, cpu_pool_stats, normalize_images,
                    release_cpu_pool, set_cpu_pool_limit)
from .loss import ClipLoss, patch_open_clip

__all__ = ["info_nce", "clip_loss", "ClipLoss", "apply_trigger", "apply_perturbation",
           "normalize_images", "patch_open_clip", "cpu_pool_stats", "set_cpu_pool_limit",
           "release_cpu_pool"]
