"""`show-triggers --output DIR`: a PNG grid of clean images vs each trigger."""
from __future__ import annotations

from .common import common_parser, loader_options, to_uint8, tool_image_size, tool_output

NAME = "show-triggers"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, parents=[common_parser()],
                              help="write a PNG grid of clean images vs each trigger")
    p.add_argument("--n-images", type=int, default=4)
    p.add_argument("--trigger-file", default=None, help="badclip's optimized patch, if any")
    return p


def _sample_images(args, n: int, size: int):
    """n uint8 images [n,3,S,S] and their ids: from --eval-data / --train-data, else drawn
    like the embedded synthetic dataset (one per shape class, nothing written to disk)."""
    import torch
    source = getattr(args, "eval_data", None) or getattr(args, "train_data", None)
    if source:
        from abd_fast.data import build_loader
        caption_data = {} if getattr(args, "eval_data", None) else loader_options(vars(args))
        loader = build_loader(source, train=False, batch_size=n, image_size=size,
                              loader="torch", num_workers=0,
                              classnames=getattr(args, "classnames", None), **caption_data)
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
        jpg, _ = synthetic.draw_sample(rng, crng, synthetic.CLASSES[k % len(synthetic.CLASSES)],
                                       size)
        out.append(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)), torch.arange(n)


def run(args) -> int:
    from PIL import Image, ImageDraw

    from abd_fast.attacks import ATTACKS
    from abd_fast.attacks.badclip import initial_patch
    from abd_fast.attacks.triggers import make_trigger, patch_side
    size, seed = tool_image_size(args), getattr(args, "seed", 0)
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
        for r, arr in enumerate(to_uint8(x)):
            im = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
            grid.paste(im, (left, head + pad + r * (tile + pad)))
    out = tool_output(args)
    grid.save(out / "triggers.png")
    print(f"wrote {out / 'triggers.png'}: {len(images)} images at {size} px; columns: "
          + ", ".join(label for label, _ in columns))
    return 0
