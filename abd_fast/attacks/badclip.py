"""BadCLIP's trigger optimization (Liang et al., CVPR 2024), as DESIGN §2 specifies it.

A p x p patch pasted in the middle of the image is optimized with Adam (the model frozen)
so that patched images look like the target class to the model, in both embedding spaces:

  a   = normalize(E_I(paste(x, patch)))      anchors (gradient reaches the patch through
                                             the fused image op's patch gradient)
  c   = normalize(E_I(x))                    the clean images (no gradient)
  t   = normalize(mean_k normalize(E_T(target caption k)))
  v   = normalize(mean_j normalize(E_I(target-class image j)))
  L_contrastive = mean_i -log softmax_j(a_i . [t, T_1..T_B]_j / tau)[0]
                  (T_b: the batch's own captions, the negatives)
  L_pull        = mean_i (1 - a_i . v)
  L_triplet     = mean_i max(0, margin + (1 - a_i . v) - (1 - a_i . c_i))
                  (anchor patched, positive target, negative its clean image)
  L = w_contrastive L_contrastive + w_pull L_pull + w_triplet L_triplet,
and after every step the patch is projected back to [0, 1].
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from abd_fast.engine import compile_module
from abd_fast.evaluate import default_tokenizer
from abd_fast.models import frozen, image_features, text_features, to_channels_last
from abd_fast.ops import apply_trigger, normalize_images
from abd_fast.precision import (autocast, channels_last, full_precision, image_dtype,
                                resolve_precision)

from .triggers import STREAM_BADCLIP_INIT, patch_side, uniform


@dataclass
class BadCLIPConfig:
    steps: int = 200
    lr: float = 0.01
    patch_size: int | None = None     # default patch_side(image size): 16 at 224 px
    temperature: float = 0.07
    margin: float = 0.2
    w_contrastive: float = 1.0
    w_pull: float = 1.0
    w_triplet: float = 1.0
    seed: int = 0


def initial_patch(patch_size: int, seed: int) -> Tensor:
    """float32 [3, p, p] uniform in [0,1) from the seed: the optimization's start."""
    p = patch_size
    return torch.from_numpy(uniform(seed, STREAM_BADCLIP_INIT, [0], 3 * p * p)
                            .reshape(3, p, p)).float()


def _encode_texts(model, tokenizer, texts, device, chunk=512) -> Tensor:
    out = [text_features(model, tokenizer(texts[k:k + chunk]).to(device))
           for k in range(0, len(texts), chunk)]
    return torch.cat(out)


def _encode_images(model, images, mean, std, chunk=256) -> Tensor:
    dtype = image_dtype(images.device)
    out = [image_features(model, normalize_images(images[k:k + chunk], mean, std,
                                                  out_dtype=dtype))
           for k in range(0, len(images), chunk)]
    return torch.cat(out)


def badclip_losses(a: Tensor, c: Tensor, t: Tensor, v: Tensor, batch_text: Tensor,
                   cfg: BadCLIPConfig) -> dict[str, Tensor]:
    """The three losses (module docstring) for anchors a [B,D], clean c [B,D], target text t
    [D], target image v [D] and the batch's caption embeddings [B,D]; all L2-normalized.
    Computed in fp32 even under autocast (bf16 logits at temperature 0.07 would be off by
    ~0.05, the triplet's margins by ~1/256)."""
    a, c, t, v, batch_text = (x.float() for x in (a, c, t, v, batch_text))
    with full_precision(a.device):
        texts = torch.cat([t[None], batch_text])                    # [1 + B, D]
        logits = a @ texts.T / cfg.temperature
        contrastive = F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long,
                                                          device=a.device))
        to_target = 1 - a @ v
        pull = to_target.mean()
        triplet = F.relu(cfg.margin + to_target - (1 - (a * c).sum(1))).mean()
    total = cfg.w_contrastive * contrastive + cfg.w_pull * pull + cfg.w_triplet * triplet
    return {"loss": total, "contrastive": contrastive, "pull": pull, "triplet": triplet}


def optimize_patch(model, batches, *, target_captions: list[str], target_images: Tensor,
                   mean, std, config: BadCLIPConfig | None = None, tokenizer=None,
                   device="cpu", log=None, precision: str | None = "auto",
                   compile: bool = False) -> tuple[Tensor, list[dict]]:
    """Optimizes the BadCLIP patch against `model` (frozen; its mode and requires_grad flags
    are restored after).

    batches: an iterable of abd_fast.data.Batch with uint8 images [B,3,S,S] and captions,
    cycled until config.steps steps ran. target_captions: captions naming the target
    (natural ones from the data, or templates). target_images: uint8 [N,3,S,S] images of the
    target class. Returns (patch float32 [3,p,p] in [0,1], per-step loss dicts).
    log(step, losses) is called every step when given. precision: of the model's forward
    passes (abd_fast.precision; the patch, Adam and the losses stay fp32); compile: the image
    encoder's passes through torch.compile (abd_fast.engine.compile_module)."""
    cfg = config or BadCLIPConfig()
    if not target_captions:
        raise ValueError("BadCLIP needs captions naming the target (--target-label)")
    if target_images is None or len(target_images) == 0:
        raise ValueError("BadCLIP needs images of the target class (from --eval-data or the "
                         "target's captions in --train-data)")
    S = int(target_images.shape[-1])
    p = cfg.patch_size or patch_side(S)
    tokenizer = default_tokenizer(model) if tokenizer is None else tokenizer
    layout = channels_last(precision)
    precision = resolve_precision(precision, device)
    encode = functools.partial(image_features, model)
    if compile:
        encode = compile_module(encode)
    with frozen(model):
        if layout:
            to_channels_last(model)
        try:
            with torch.no_grad(), autocast(device, precision):
                t = F.normalize(_encode_texts(model, tokenizer, list(target_captions), device)
                                .mean(0), dim=0)
                v = F.normalize(_encode_images(model, target_images.to(device), mean, std).mean(0),
                                dim=0)
            patch = initial_patch(p, cfg.seed).to(device).requires_grad_(True)
            opt = torch.optim.Adam([patch], lr=cfg.lr)
            m = (S - p) // 2
            history = []
            stream = itertools.cycle(batches)
            for step in range(cfg.steps):
                batch = next(stream)
                if batch.captions is None:
                    raise ValueError("BadCLIP's contrastive loss needs caption data (--train-data)")
                images = batch.images.to(device)
                with autocast(device, precision):
                    dtype = image_dtype(device)
                    with torch.no_grad():
                        c = encode(normalize_images(images, mean, std, out_dtype=dtype))
                        batch_text = _encode_texts(model, tokenizer, list(batch.captions), device)
                    x = apply_trigger(images, "patch", patch=patch, ys=m, xs=m, mean=mean, std=std,
                                      out_dtype=dtype)
                    a = encode(x)
                    losses = badclip_losses(a, c, t, v, batch_text, cfg)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
                with torch.no_grad():
                    patch.clamp_(0, 1)
                record = {k: float(val.detach()) for k, val in losses.items()}
                history.append(record)
                if log is not None:
                    log(step, record)
        finally:
            if layout:
                to_channels_last(model, False)
    return patch.detach().cpu(), history
