"""Where does a CPU training step of a tiny CLIP go? Loader, tokenizer, image/text towers
forward+backward, the loss, and AdamW (for-loop / foreach / fused) on the 49408 x 128 token
embedding and the rest, at the demo's settings.

    flock /tmp/abd_cpu.lock .venv/bin/python bench/train_step.py [--model abd-tiny-vit]

Times are medians of --repeat runs in one process; writes bench/results/train_step.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT, machine, write_json  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="default: abd-tiny-vit and abd-tiny-rn")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_step.json"))
    args = ap.parse_args(argv)

    from abd_fast.data import build_loader
    from abd_fast.data.synthetic import ensure_dataset
    from abd_fast.engine import param_groups
    from abd_fast.models import create_model, get_tokenizer, image_spec
    from abd_fast.ops import clip_loss, normalize_images
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    B, S, R = args.batch_size, args.image_size, args.repeat
    ds = ensure_dataset()
    res = {"machine": machine(), "settings": vars(args), "loader": {}, "models": {}}
    for workers in (0, 1, 2):
        loader = build_loader(ds.shards, train=True, batch_size=B, image_size=S, loader="torch",
                              num_workers=workers)
        n, t0 = 0, time.perf_counter()
        for k, b in enumerate(loader):
            n += len(b)
            if k == 19:
                break
        res["loader"][f"workers={workers}"] = n / (time.perf_counter() - t0)
        print(f"loader (torch, {workers} workers): {res['loader'][f'workers={workers}']:.0f} "
              "images/s", flush=True)
    batch = b
    for name in args.model or ["abd-tiny-vit", "abd-tiny-rn"]:
        model = create_model(name, image_size=S)
        tok = get_tokenizer(name)
        spec = image_spec(model)
        mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
        x = normalize_images(batch.images, mean, std)
        text = tok(batch.captions)
        r = {"tokenize": median_ms(lambda: tok(batch.captions), R),
             "normalize": median_ms(lambda: normalize_images(batch.images, mean, std), R)}

        def image_fb():
            model.encode_image(x, normalize=True).sum().backward()

        def text_fb():
            model.encode_text(text, normalize=True).sum().backward()

        def step_fb():
            i, t, s = model(x, text)
            clip_loss(i, t, s).backward()
        r["image_fwd_bwd"] = median_ms(image_fb, R)
        r["text_fwd_bwd"] = median_ms(text_fb, R)
        r["model_fwd_bwd_loss"] = median_ms(step_fb, R)
        for kind, kw in (("for_loop", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):
            opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, **kw)
            r[f"adamw_{kind}"] = median_ms(opt.step, R)
        emb = model.token_embedding.weight
        opt = torch.optim.AdamW([emb], lr=1e-4, fused=True)
        r["adamw_fused_token_embedding_only"] = median_ms(opt.step, R)
        r["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
        r["token_embedding_params_M"] = emb.numel() / 1e6
        res["models"][name] = r
        print(f"{name} ({r['params_M']:.2f}M params, token embedding "
              f"{r['token_embedding_params_M']:.2f}M), batch {B} at {S} px, ms:", flush=True)
        for k, v in r.items():
            if not k.endswith("_M"):
                print(f"  {k:34s} {v:8.1f}")
    write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
