"""`badclip-trigger --train-data --model ...`: optimize BadCLIP's patch against a model
(abd_fast.attacks.badclip) and save it losslessly."""
from __future__ import annotations

import json

from abd_fast.engine import default_compile

from .common import common_parser, loader_options, open_caption_data, tool_output

NAME = "badclip-trigger"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, parents=[common_parser()],
                              help="optimize BadCLIP's trigger patch against a model")
    p.set_defaults(compile=default_compile(NAME), precision="auto")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--patch-lr", type=float, default=0.01, help="Adam learning rate of the patch")
    p.add_argument("--patch-size", type=int, default=None,
                   help="patch side (default 16 at 224 px, scaled with the image size)")
    p.add_argument("--target-images", type=int, default=256,
                   help="how many target-class images define the target embedding")
    p.add_argument("--patch-name", default="badclip_patch.png",
                   help="file name in --output (.png, or .pt for a float tensor)")
    return p


def _target_captions(train, target: str):
    """Positions of the training samples whose captions name the target, and the captions
    the patch is pulled towards: those captions, else the templates with the target."""
    import numpy as np

    from abd_fast.attacks.poison import target_regex
    from abd_fast.models import imagenet_templates
    regex = target_regex(target)
    naming = np.asarray([i for i, c in enumerate(train.captions) if regex.search(c.lower())],
                        np.int64)
    captions = sorted({train.captions[i] for i in naming}) or [t(target) for t in
                                                               imagenet_templates()]
    return naming, captions


def _target_images(args, train, naming, size: int):
    """uint8 images of the target class: --eval-data's images of it, else the training
    images whose captions name it (at most --target-images)."""
    import numpy as np
    import torch

    from abd_fast.data import build_loader, open_source
    target, n_target = args.target_label, args.target_images
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
    return torch.cat([b.images for b in build_loader(
        ev.subset(keep, "target"), train=False, batch_size=256, image_size=size,
        loader="torch", num_workers=0,
        non_rgb="convert" if ev is not train else loader_options(vars(args))["non_rgb"])])


def run(args) -> int:
    """Optimizes BadCLIP's patch against --model/--pretrained; target images from --eval-data
    (the target class) or else the training images whose captions name the target."""
    from abd_fast.attacks.badclip import BadCLIPConfig, optimize_patch
    from abd_fast.attacks.triggers import save_patch
    from abd_fast.data import build_loader
    from abd_fast.models import create_model, get_tokenizer, image_spec
    for flag in ("train_data", "target_label", "model"):
        if not getattr(args, flag, None):
            raise SystemExit(f"badclip-trigger needs --{flag.replace('_', '-')}")
    model = create_model(args.model, pretrained=getattr(args, "pretrained", None),
                         image_size=getattr(args, "image_size", None))
    spec = image_spec(model)
    seed = getattr(args, "seed", 0)
    train = open_caption_data(vars(args))
    naming, captions = _target_captions(train, args.target_label)
    target_images = _target_images(args, train, naming, spec.size)
    batches = build_loader(train, train=True, batch_size=getattr(args, "batch_size", None) or 64,
                           image_size=spec.size, seed=seed,
                           loader=getattr(args, "loader", None), **loader_options(vars(args)))
    cfg = BadCLIPConfig(steps=args.steps, lr=args.patch_lr, patch_size=args.patch_size, seed=seed)
    out = tool_output(args)
    with open(out / "badclip_losses.jsonl", "w") as log_file:
        def log(step, losses):
            log_file.write(json.dumps({"step": step, **losses}) + "\n")
            if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
                print(f"step {step + 1}/{cfg.steps} " + " ".join(
                    f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
        patch, _ = optimize_patch(model, batches, target_captions=captions,
                                  target_images=target_images, mean=spec.mean, std=spec.std,
                                  config=cfg, tokenizer=get_tokenizer(args.model), log=log,
                                  precision=args.precision, compile=args.compile)
    path = out / args.patch_name
    save_patch(patch, path)
    print(f"wrote {path}; use it with --attack badclip --trigger-file {path}")
    return 0
