"""The training engine shared by every stage: optimizer, schedule, checkpoints.

Schedule (per optimizer step s = 0 .. total-1, warmup w):
    s <  w: lr = base * (s + 1) / (w + 1)                  linear warmup, never 0
    s >= w: lr = base * (1 + cos(pi * (s - w) / (total - 1 - w))) / 2
so the cosine starts at base on step w and is exactly 0 on the last step, whatever the
warmup (the research code this tool replaces offsets its cosine by the warmup steps and
misses 0); tests/test_engine.py checks every step against the formula.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def effective_warmup(warmup: int, total: int) -> int:
    """Warmup steps actually used: at most total - 2, so the cosine has a first and last step."""
    return max(0, min(warmup, total - 2))


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total` (see the module doc)."""
    if not 0 <= step < total:
        raise ValueError(f"step {step} outside [0, {total})")
    w = effective_warmup(warmup, total)
    if step < w:
        return base_lr * (step + 1) / (w + 1)
    span = total - 1 - w
    if span <= 0:  # a one-step run: its only step is the last one
        return 0.0
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - w) / span))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and embeddings, none on norms, biases,
    gains and logit_scale (open_clip's rule: 1-D tensors and names with bn/ln/bias/scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                   or "logit_scale" in name)
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model, lr: float, weight_decay: float = 0.1,
                   betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def clamp_logit_scale(model, max_log: float = math.log(100.0)):
    """CLIP's clamp of the learned log temperature to ln(100), after each step."""
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        with torch.no_grad():
            scale.clamp_(0, max_log)


def atomic_save(obj, path: str | os.PathLike):
    """torch.save to a temporary file beside `path`, fsync, rename: a crash or a full disk
    never leaves a partial file under `path`, and the previous file stays valid."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
