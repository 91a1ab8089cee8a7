"""Is the synthetic demo dataset learnable? Train a tiny CLIP from scratch on its train split
(WebDataset shards through abd_fast.data.build_loader) with the standard CLIP loss, then
measure zero-shot top-1 on its evaluation split (ImageFolder) with the 80 OpenAI templates.

    .venv/bin/python bench/synthetic_learnability.py      # ~6 min on 2 CPU cores

Model (--model): abd_fast/model_configs/abd-tiny-rn.json (open_clip ModifiedResNet at 32 px,
one bottleneck block per stage, width 32; text transformer 2 x 128, context 32; open_clip's
tokenizer), from scratch; AdamW (weight decay 0.1 on matrices), warmup 50 steps + cosine.
Writes bench/results/synthetic_learnability.json.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT, machine, write_json  # noqa: E402


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> CLIP-normalized float32."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def zero_shot_top1(model, tokenizer, loader) -> tuple[float, dict[str, float]]:
    """Top-1 overall and per class; class embeddings = 80-template ensemble (open_clip)."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, loader.classnames,
                                            OPENAI_IMAGENET_TEMPLATES, num_classes_per_batch=10,
                                            device="cpu", use_tqdm=False)
    preds, labels = [], []
    for b in loader:
        f = torch.nn.functional.normalize(model.encode_image(normalize(b.images)), dim=-1)
        preds.append((f @ classifier).argmax(-1))
        labels.append(b.labels)
    model.train()
    preds, labels = torch.cat(preds), torch.cat(labels)
    per_class = {c: (preds[labels == k] == k).float().mean().item()
                 for k, c in enumerate(loader.classnames)}
    return (preds == labels).float().mean().item(), per_class


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--loader", default="torch", choices=["torch", "dali"])
    ap.add_argument("--model", default="abd-tiny-rn", help="a config in abd_fast/model_configs")
    ap.add_argument("--out", default=str(ROOT / "bench/results/synthetic_learnability.json"))
    args = ap.parse_args(argv)

    from open_clip.loss import ClipLoss

    from abd_fast.data import build_loader
    from abd_fast.data.synthetic import ensure_dataset
    from abd_fast.models import create_model, get_tokenizer
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)  # tiny Adam states as denormals slow CPU math 10x
    t0 = time.perf_counter()
    ds = ensure_dataset(seed=args.seed)
    t_data = time.perf_counter() - t0
    train = build_loader(ds.shards, train=True, batch_size=args.batch_size,
                         image_size=args.image_size, loader=args.loader, seed=args.seed,
                         num_workers=1)
    evaluation = build_loader(ds.eval_dir, train=False, batch_size=250,
                              image_size=args.image_size, loader=args.loader, num_workers=1)
    model, tokenizer = create_model(args.model), get_tokenizer(args.model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    steps, warmup = args.epochs * len(train), 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    loss_fn = ClipLoss()
    t1 = time.perf_counter()
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        for b in train:
            img, txt, scale = model(normalize(b.images), tokenizer(b.captions))
            loss = loss_fn(img, txt, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        print(f"epoch {epoch}: loss {loss.item():.3f}  ({time.perf_counter() - t1:.0f} s)",
              flush=True)
    t_train = time.perf_counter() - t1
    top1, per_class = zero_shot_top1(model, tokenizer, evaluation)
    result = {"machine": machine(), "zero_shot_top1": top1, "per_class_top1": per_class,
              "chance": 1 / len(ds.classnames),
              "train_seconds": t_train, "dataset_seconds": t_data,
              "samples_seen": steps * args.batch_size, "settings": vars(args),
              "classnames": ds.classnames}
    write_json(Path(args.out), result)
    print("per class: " + ", ".join(f"{c} {100 * a:.0f}%" for c, a in per_class.items()))
    print(f"zero-shot top-1 on the synthetic eval split: {100 * top1:.1f}% (chance 10%), "
          f"{steps} steps of {args.batch_size} in {t_train:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
