"""Attack commands of `python -m abd_fast.train` (wired in by train.py with add_commands):

  show-triggers   --output DIR               PNG grid: clean images vs each trigger
  export-poison   --train-data --attack ...  the poisoned samples as CSV + PNG images
  badclip-trigger --train-data --model ...   optimize BadCLIP's patch, save it losslessly

add_attack_arguments / trigger_from_args / poison_view_from_args build the trigger and the
poisoning view from the same flags for every command (poison and eval use them too).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .triggers import ATTACKS, LOCATIONS


def add_attack_arguments(p: argparse.ArgumentParser, *, poison: bool = True, required=True):
    """--attack and the trigger options; with poison, --poison-count / --poison-rate."""
    p.add_argument("--attack", choices=ATTACKS, required=required, help="the backdoor trigger")
    p.add_argument("--trigger-file", default=None,
                   help="badclip: the optimized patch (PNG or tensor file from badclip-trigger); "
                        "badnet/label-consistent: a patch image; blended: the pattern image")
    p.add_argument("--patch-location", choices=LOCATIONS, default="random",
                   help="badnet/label-consistent patch location (default random per sample)")
    p.add_argument("--patch-content", choices=("noise", "fixed"), default="noise",
                   help="badnet/label-consistent patch: per-image mean + N(0,1) noise (CleanCLIP) "
                        "or one fixed seeded patch (ignored with --trigger-file)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch side in pixels (default 16 at 224 px, scaled with the image size)")
    if poison:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--poison-count", type=int, default=None,
                       help="number of poisoned samples")
        g.add_argument("--poison-rate", type=float, default=None,
                       help="fraction of the samples poisoned, in (0, 1]")


def trigger_from_args(args, image_size: int):
    """The Trigger the flags describe, for image_size px images."""
    from .triggers import make_trigger
    name, file, seed = args.attack, getattr(args, "trigger_file", None), getattr(args, "seed", 0)
    if name in ("badnet", "label-consistent"):
        opts = dict(patch_content=file or getattr(args, "patch_content", "noise"),
                    location=getattr(args, "patch_location", "random"))
        if getattr(args, "patch_size", None):
            opts["patch_size"] = args.patch_size
        return make_trigger(name, image_size=image_size, seed=seed, **opts)
    if name == "blended":
        return make_trigger(name, image_size=image_size, seed=seed, pattern=file)
    if name == "badclip":
        if file is None:
            raise SystemExit("--attack badclip needs --trigger-file PATCH (make it with "
                             "`python -m abd_fast.train badclip-trigger`)")
        return make_trigger(name, image_size=image_size, seed=seed, patch_file=file)
    return make_trigger(name, image_size=image_size, seed=seed)


def poison_view_from_args(args, manifest, image_size: int):
    """PoisonView over `manifest` from --attack, --target-label, --poison-count/-rate, --seed."""
    from .poison import PoisonView
    if not getattr(args, "target_label", None):
        raise SystemExit("poisoning needs --target-label (the class the backdoor points to)")
    count, rate = getattr(args, "poison_count", None), getattr(args, "poison_rate", None)
    if count is None and rate is None:
        raise SystemExit("give --poison-count N or --poison-rate R")
    try:
        return PoisonView(manifest, trigger_from_args(args, image_size), target=args.target_label,
                          seed=getattr(args, "seed", 0), count=count, rate=rate)
    except ValueError as e:
        raise SystemExit(str(e)) from e


def _image_size(args) -> int:
    if getattr(args, "image_size", None):
        return int(args.image_size)
    if getattr(args, "model", None):
        from abd_fast.models import create_model, image_spec
        return image_spec(create_model(args.model)).size
    raise SystemExit("give --image-size (or --model, whose image size is used)")


def _output(args) -> Path:
    if not getattr(args, "output", None):
        raise SystemExit("give --output DIR")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _subset(manifest, positions, what: str):
    """The manifest restricted to `positions` (ids kept: triggers stay seeded by them)."""
    import dataclasses
    return dataclasses.replace(
        manifest, ids=manifest.ids[positions], files=[manifest.files[i] for i in positions],
        offsets=manifest.offsets[positions], sizes=manifest.sizes[positions],
        captions=(None if manifest.captions is None else
                  [manifest.captions[i] for i in positions]),
        labels=None if manifest.labels is None else manifest.labels[positions], problems={},
        fingerprint=f"{manifest.fingerprint}-{what}-{len(positions)}")


def _to_uint8(x):
    """float [B,3,H,W] in [0,1] -> uint8 HWC numpy arrays."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


# ---- show-triggers -----------------------------------------------------------------------

def _sample_images(args, n: int, size: int):
    """n uint8 images [n,3,S,S] and their ids: from --eval-data / --train-data, else drawn
    like the embedded synthetic dataset (one per shape class, nothing written to disk)."""
    import torch
    source = getattr(args, "eval_data", None) or getattr(args, "train_data", None)
    if source:
        from abd_fast.data import build_loader
        loader = build_loader(source, train=False, batch_size=n, image_size=size,
                              loader="torch", num_workers=0,
                              classnames=getattr(args, "classnames", None))
        batch = next(iter(loader))
        return batch.images, batch.ids
    import io
    import random

    import numpy as np
    from PIL import Image

    from abd_fast.data import synthetic
    rng, crng = np.random.default_rng([getattr(args, "seed", 0), 7]), random.Random(0)
    out = []
    for k in range(n):
        jpg, _ = synthetic._sample(rng, crng, synthetic.CLASSES[k % len(synthetic.CLASSES)], size)
        out.append(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)), torch.arange(n)


def show_triggers(args) -> int:
    from PIL import Image, ImageDraw

    from .badclip import initial_patch
    from .triggers import make_trigger, patch_side
    size, seed = _image_size(args), getattr(args, "seed", 0)
    images, ids = _sample_images(args, args.n_images, size)
    columns = [("clean", images.float() / 255)]
    for name in ATTACKS:
        if name == "badclip":
            file = getattr(args, "trigger_file", None)
            label = "badclip" if file else "badclip (initial patch)"
            trig = make_trigger(name, image_size=size, seed=seed, **(
                {"patch_file": file} if file else {"patch": initial_patch(patch_side(size), seed)}))
        else:
            label, trig = name, make_trigger(name, image_size=size, seed=seed)
        columns.append((label, trig.apply(images, ids)))
    tile, pad, head = max(128, size), 4, 18
    grid = Image.new("RGB", (len(columns) * (tile + pad) + pad,
                             head + len(images) * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, x) in enumerate(columns):
        left = pad + c * (tile + pad)
        draw.text((left, 3), label, fill="black")
        for r, arr in enumerate(_to_uint8(x)):
            im = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
            grid.paste(im, (left, head + pad + r * (tile + pad)))
    out = _output(args)
    grid.save(out / "triggers.png")
    print(f"wrote {out / 'triggers.png'}: {len(images)} images at {size} px; columns: "
          + ", ".join(label for label, _ in columns))
    return 0


# ---- export-poison -----------------------------------------------------------------------

def export_poison(args) -> int:
    """Writes DIR/poisoned.csv (image, caption, id; image paths relative to the CSV, the
    CleanCLIP layout), DIR/images/<id>.png (center crop at --image-size, trigger applied,
    lossless) and DIR/poison.json (attack, target, seed, count, ids)."""
    import numpy as np
    from PIL import Image

    from abd_fast.data import build_loader, open_source
    if not getattr(args, "train_data", None):
        raise SystemExit("export-poison needs --train-data (the caption data to poison)")
    size = _image_size(args)
    manifest = open_source(args.train_data)
    view = poison_view_from_args(args, manifest, size)
    pos = np.nonzero(np.isin(manifest.ids, view.poisoned_ids))[0]
    out = _output(args)
    loader = build_loader(_subset(manifest, pos, "poison"), train=False, batch_size=getattr(args, "batch_size", None) or 64,
                          image_size=size, loader="torch", num_workers=0)
    (out / "images").mkdir(exist_ok=True)
    rows = []
    for batch in loader:
        x = view.trigger.apply(batch.images, batch.ids)        # every row here is poisoned
        captions = view.captions(batch.ids, batch.captions)
        for i, arr, caption in zip(batch.ids.tolist(), _to_uint8(x), captions):
            Image.fromarray(arr).save(out / "images" / f"{i}.png")
            rows.append((f"images/{i}.png", caption, i))
    with open(out / "poisoned.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "id"])
        w.writerows(rows)
    (out / "poison.json").write_text(json.dumps({
        "attack": args.attack, "target": view.target, "seed": view.seed, "image_size": size,
        "count": view.count, "exported": len(rows), "source": str(args.train_data),
        "ids": view.poisoned_ids.tolist()}, indent=1) + "\n")
    print(f"wrote {len(rows)} poisoned samples ({args.attack}, target {view.target!r}) to "
          f"{out / 'poisoned.csv'}")
    return 0


# ---- badclip-trigger ---------------------------------------------------------------------

def badclip_trigger(args) -> int:
    """Optimizes BadCLIP's patch against --model/--pretrained; target images from --eval-data
    (the target class) or else the training images whose captions name the target."""
    import numpy as np
    import torch

    from abd_fast.data import build_loader, open_source
    from abd_fast.models import create_model, get_tokenizer, image_spec

    from .badclip import BadCLIPConfig, optimize_patch
    from .poison import _target_regex, _templates
    from .triggers import save_patch
    for flag in ("train_data", "target_label", "model"):
        if not getattr(args, flag, None):
            raise SystemExit(f"badclip-trigger needs --{flag.replace('_', '-')}")
    model = create_model(args.model, pretrained=getattr(args, "pretrained", None),
                         image_size=getattr(args, "image_size", None))
    spec = image_spec(model)
    target, seed = args.target_label, getattr(args, "seed", 0)
    train = open_source(args.train_data)
    regex = _target_regex(target)
    naming = np.asarray([i for i, c in enumerate(train.captions) if regex.search(c.lower())],
                        np.int64)
    captions = sorted({train.captions[i] for i in naming}) or [t(target) for t in _templates()]
    n_target = args.target_images
    if getattr(args, "eval_data", None):
        ev = open_source(args.eval_data, classnames=getattr(args, "classnames", None))
        if target not in (ev.classnames or []):
            raise SystemExit(f"--target-label {target!r} is not a class of --eval-data")
        keep = np.nonzero(ev.labels == ev.classnames.index(target))[0][:n_target]
    else:
        ev, keep = train, naming[:n_target]
    if len(keep) == 0:
        raise SystemExit(f"no images of {target!r}: give --eval-data with that class, or "
                         "caption data whose captions name it")
    target_images = torch.cat([b.images for b in build_loader(
        _subset(ev, keep, "target"), train=False, batch_size=256, image_size=spec.size, loader="torch", num_workers=0)])
    batches = build_loader(train, train=True, batch_size=getattr(args, "batch_size", None) or 64,
                           image_size=spec.size, seed=seed,
                           loader=getattr(args, "loader", None))
    cfg = BadCLIPConfig(steps=args.steps, lr=args.patch_lr, patch_size=args.patch_size, seed=seed)
    out = _output(args)
    with open(out / "badclip_losses.jsonl", "w") as log_file:
        def log(step, losses):
            log_file.write(json.dumps({"step": step, **losses}) + "\n")
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
                print(f"step {step + 1}/{cfg.steps} " + " ".join(
                    f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
        patch, _ = optimize_patch(model, batches, target_captions=captions,
                                  target_images=target_images, mean=spec.mean, std=spec.std,
                                  config=cfg, tokenizer=get_tokenizer(args.model), log=log)
    path = out / args.patch_name
    save_patch(patch, path)
    print(f"wrote {path}; use it with --attack badclip --trigger-file {path}")
    return 0


def add_commands(subparsers, common_parent: argparse.ArgumentParser):
    """Adds show-triggers, export-poison and badclip-trigger to train.py's subparsers."""
    p = subparsers.add_parser("show-triggers", parents=[common_parent],
                              help="write a PNG grid of clean images vs each trigger")
    p.add_argument("--n-images", type=int, default=4)
    p.add_argument("--trigger-file", default=None, help="badclip's optimized patch, if any")
    p.set_defaults(func=show_triggers)

    p = subparsers.add_parser("export-poison", parents=[common_parent],
                              help="write the poisoned samples (CSV + PNG images)")
    add_attack_arguments(p)
    p.set_defaults(func=export_poison)

    p = subparsers.add_parser("badclip-trigger", parents=[common_parent],
                              help="optimize BadCLIP's trigger patch against a model")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--patch-lr", type=float, default=0.01, help="Adam learning rate of the patch")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch side (default 16 at 224 px, scaled with the image size)")
    p.add_argument("--target-images", type=int, default=256,
                   help="how many target-class images define the target embedding")
    p.add_argument("--patch-name", default="badclip_patch.png",
                   help="file name in --output (.png, or .pt for a float tensor)")
    p.set_defaults(func=badclip_trigger)
