"""`export-poison --train-data --attack ...`: the poisoned samples as CSV + PNG images.

add_attack_arguments / trigger_from_args / poison_view_from_args build the trigger and the
poisoning view from this command's flags.
"""
from __future__ import annotations

import argparse
import csv
import json

from abd_fast.attacks.triggers import ATTACKS, LOCATIONS

from .common import (common_parser, loader_options, open_caption_data, to_uint8, tool_image_size,
                     tool_output)

NAME = "export-poison"


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


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, parents=[common_parser()],
                              help="write the poisoned samples (CSV + PNG images)")
    add_attack_arguments(p)
    return p


def trigger_from_args(args, image_size: int):
    """The Trigger the flags describe, for image_size px images."""
    from abd_fast.attacks import make_trigger
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
    from abd_fast.attacks import PoisonView
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


def run(args) -> int:
    """Writes DIR/poisoned.csv (image, caption, id; image paths relative to the CSV, the
    CleanCLIP layout), DIR/images/<id>.png (center crop at --image-size, trigger applied,
    lossless) and DIR/poison.json (attack, target, seed, count, ids)."""
    import numpy as np
    from PIL import Image

    from abd_fast.data import build_loader
    if not getattr(args, "train_data", None):
        raise SystemExit("export-poison needs --train-data (the caption data to poison)")
    size = tool_image_size(args)
    manifest = open_caption_data(vars(args))
    view = poison_view_from_args(args, manifest, size)
    pos = np.nonzero(np.isin(manifest.ids, view.poisoned_ids))[0]
    out = tool_output(args)
    loader = build_loader(manifest.subset(pos, "poison"), train=False,
                          batch_size=getattr(args, "batch_size", None) or 64, image_size=size,
                          loader="torch", num_workers=0,
                          non_rgb=loader_options(vars(args))["non_rgb"])
    (out / "images").mkdir(exist_ok=True)
    rows = []
    for batch in loader:
        x = view.trigger.apply(batch.images, batch.ids)        # every row here is poisoned
        captions = view.captions(batch.ids, batch.captions)
        for i, arr, caption in zip(batch.ids.tolist(), to_uint8(x), captions):
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
