"""Images/s of a whole ABD fine-tuning step (the `defend` stage's step, method abd, objective
align), fused vs an unfused reference, on the same model, batch, optimizer and data:

  fused      the DALI loader engine (2 threads, our resize operator on CPU); the image views
             [clean, image + UAP] by one call of the fused image op on the uint8 images stacked
             twice (UAP.apply -> apply_perturbation on the second copy's rows: uint8 ->
             paste/add -> clamp -> normalize in one pass, written as the model's batch); the
             loss by abd_objective through objectives.Contrastive (fused CLIP loss and
             InfoNCE, no materialized logits) -- what abd_fast.defenses.stages.defense_loss runs
  reference  the torch loader engine (PIL in 2 DataLoader workers); the image views composed
             eagerly in plain PyTorch (float, /255, paste the patch or add the clamped delta,
             clamp, normalize); open_clip's ClipLoss for the multimodal term and, as CleanCLIP's
             code does, cross entropy over materialized logits for the one-directional in-modal
             terms

Shared by both: the text views [caption, EDA(caption)] (keyed by (epoch, id)) and the
tokenizer, one model forward over all views, AdamW (abd_fast.engine.make_optimizer, the
fused kernel), the logit-scale clamp, flush-denormal mode (as the Trainer sets on CPU).
Both models start from one state dict. Each step is timed whole, data loading included (the
loaders run their workers as in training, 2 each), and in parts:

  loader      waiting for the next batch (next(iterator))
  views       the image views, concatenated
  text        EDA + tokenizer (identical in both paths)
  forward     model(x, tokens)
  loss        the objective's forward + backward (on detached feature leaves, so its cost is
              separated from the model's backward; the gradients are then passed on)
  backward    the model's backward
  optimizer   zero_grad, AdamW step, logit-scale clamp

Each repeat builds a fresh epoch iterator (set_epoch(repeat): both paths see the same
samples, crops and flips), runs --warmup untimed steps, then --steps timed ones. Repeats
alternate A B B A ... so a slow phase of the shared machine hits both paths alike. Reported:
median images/s over repeats per path, their ratio, and the median per-part ms.

    flock /tmp/abd_cpu.lock .venv/bin/python bench/step.py                 # both settings
    flock /tmp/abd_cpu.lock .venv/bin/python bench/step.py --setting demo
    .venv/bin/python bench/step.py --demo-report runs/demo/report.json --setting none

Settings (--setting, repeatable; default demo and 224-vit):
  demo     the `defend` stage's defaults on the synthetic dataset (abd-tiny-rn, 32 px,
           batch 128, patch UAP of 3% area; 64-px JPEG sources)
  224-vit  batch 64 of 224 px from the 256x256 JPEG shards of bench/loaders.py, model
           bench-vit-b32-tiny: ViT-B/32's geometry (32-px patches, 49 tokens) at the tiny
           models' width 128 and depth 4 (a real ViT-B/32 step, ~1.7 TFLOP for 128 images,
           would take well over 10 s on 2 cores, estimated; this keeps the pixel and loader
           work of a 224-px run)
  224-rn   abd-tiny-rn forced to 224 px, batch 64, same shards: a convolutional tower whose
           cost grows with the pixels (7-10 s per step here; fewer steps and repeats)
--demo-report adds the per-stage wall times of a `python -m abd_fast.train` demo run
(report.json's "timing": {stage: seconds}). Writes bench/results/step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import ROOT, machine, table, write_json  # noqa: E402

PARTS = ("loader", "views", "text", "forward", "loss", "backward", "optimizer")
# Per setting: model, image side, batch, data, and (warm-up, timed steps, repeats) defaults.
SETTINGS = {
    "demo": dict(model="abd-tiny-rn", image_size=32, batch_size=128, data="synthetic",
                 schedule=(3, 10, 6)),
    "224-vit": dict(model="bench-vit-b32-tiny", image_size=224, batch_size=64,
                    data="shards-256", schedule=(3, 10, 6)),
    "224-rn": dict(model="abd-tiny-rn", image_size=224, batch_size=64, data="shards-256",
                   schedule=(2, 3, 4)),
}
# ViT-B/32's geometry (224 px, 32 px patches: 49 tokens) at the tiny models' width and depth:
# the pixels and the loader's work are those of a real 224-px run, the transformer is small.
BENCH_VIT = {"embed_dim": 128,
             "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "head_width": 32,
                            "patch_size": 32},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4,
                          "layers": 2}}


def _register_bench_model():
    import tempfile

    import open_clip
    d = Path(tempfile.mkdtemp(prefix="abd-bench-"))
    (d / "bench-vit-b32-tiny.json").write_text(json.dumps(BENCH_VIT))
    open_clip.add_model_config(d)


# ---- the two ways of computing the ABD step's views and loss -----------------------------

def make_uap(image_size: int, mode: str = "patch", seed: int = 0):
    """A UAP of the stage's geometry from an untrained generator (the step's cost does not
    depend on the perturbation's values)."""
    from abd_fast.defenses.uap import UAP, UAPGenerator, patch_geometry
    size = patch_geometry(image_size)[0] if mode == "patch" else image_size
    with torch.no_grad():
        delta = UAPGenerator(size, mode=mode, seed=seed)()
    return UAP(delta, mode=mode, image_size=image_size)


def fused_views(images, ids, uap, mean, std):
    """[clean; adversarial] normalized fp32 views in one batch, as defense_loss builds them."""
    return uap.clean_and_adversarial(images, mean=mean, std=std)


def eager_views(images, ids, uap, mean, std):
    """The same batch in plain eager PyTorch, as one would write it without fused ops."""
    from abd_fast.defenses.uap import patch_geometry
    x = images.float() / 255
    if uap.mode == "patch":
        side, corner = patch_geometry(uap.image_size, uap.area)
        adv = x.clone()
        adv[:, :, corner:corner + side, corner:corner + side] = uap.perturbation
    else:
        adv = x + uap.perturbation.clamp(-uap.eps, uap.eps)
    m, s = mean[:, None, None], std[:, None, None]
    return torch.cat([(x.clamp(0, 1) - m) / s, (adv.clamp(0, 1) - m) / s])


def fused_loss(lambda1: float = 1.0, lambda2: float = 1.0):
    """(I, T, I_adv, T_eda, scale) -> ABD align loss through objectives (fused kernels)."""
    from abd_fast.defenses import objectives as obj
    c = obj.Contrastive()

    def loss(img, txt, img_adv, txt_eda, scale):
        return obj.abd_objective(img, txt, img_adv, txt_eda, scale, objective="align", c=c,
                                 lambda1=lambda1, lambda2=lambda2)
    return loss


def reference_loss(lambda1: float = 1.0, lambda2: float = 1.0):
    """The same loss with open_clip's ClipLoss and CleanCLIP-style in-modal cross entropy:
    λ1·ClipLoss(I, T) + λ2·½[CE(s·I I_advᵀ, diag) + CE(s·T T_edaᵀ, diag)]."""
    from open_clip.loss import ClipLoss
    clip = ClipLoss()

    def inmodal(q, k, scale):
        logits = scale * q @ k.T
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))

    def loss(img, txt, img_adv, txt_eda, scale):
        return (lambda1 * clip(img, txt, scale)
                + lambda2 * 0.5 * (inmodal(img, img_adv, scale) + inmodal(txt, txt_eda, scale)))
    return loss


# ---- one path: loader + model + optimizer, timed step by step -------------------------------

class TrainPath:
    def __init__(self, name, loader, model, views, loss, tokenizer, eda, mean, std, uap, lr):
        from abd_fast.engine import make_optimizer
        self.name, self.loader, self.model = name, loader, model
        self.views, self.loss, self.tok, self.eda = views, loss, tokenizer, eda
        self.mean, self.std, self.uap = mean, std, uap
        self.opt = make_optimizer(model, lr)

    def run(self, epoch: int, warmup: int, steps: int) -> dict:
        """warmup untimed + `steps` timed training steps from a fresh epoch iterator."""
        from abd_fast.defenses.views import eda_view
        from abd_fast.engine import clamp_logit_scale
        self.model.train()
        self.loader.set_epoch(epoch)
        it = iter(self.loader)
        parts = {p: 0.0 for p in PARTS}
        n_images = 0
        t_start = None
        for k in range(warmup + steps):
            if k == warmup:
                parts = {p: 0.0 for p in PARTS}
                n_images, t_start = 0, time.perf_counter()
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            x = self.views(batch.images, batch.ids, self.uap, self.mean, self.std)
            t2 = time.perf_counter()
            tokens = self.tok(batch.captions + eda_view(self.eda, batch.captions, batch.ids,
                                                        epoch))
            t3 = time.perf_counter()
            img, txt, scale = self.model(x, tokens)
            t4 = time.perf_counter()
            leaves = [t.detach().requires_grad_() for t in (img, txt, scale)]
            B = len(batch)
            (i, i_adv), (t, t_eda) = leaves[0].split(B), leaves[1].split(B)
            loss = self.loss(i, t, i_adv, t_eda, leaves[2])
            loss.backward()
            value = loss.item()  # the engine's finiteness check
            t5 = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            t6 = time.perf_counter()
            torch.autograd.backward((img, txt, scale), [v.grad for v in leaves])
            t7 = time.perf_counter()
            self.opt.step()
            clamp_logit_scale(self.model)
            t8 = time.perf_counter()
            if value != value:
                raise RuntimeError(f"{self.name}: the loss is NaN")
            for p, dt in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t7 - t6,
                                     (t6 - t5) + (t8 - t7))):
                parts[p] += dt
            n_images += B
        seconds = time.perf_counter() - t_start
        del it
        return {"images_per_s": n_images / seconds, "step_ms": 1e3 * seconds / steps,
                **{f"{p}_ms": 1e3 * v / steps for p, v in parts.items()}}


def _data(kind: str):
    if kind == "synthetic":
        from abd_fast.data.synthetic import ensure_dataset
        return ensure_dataset(seed=0).shards
    if kind == "shards-256":
        from bench.loaders import make_shards
        return make_shards(256, 256)
    raise ValueError(kind)


def run_setting(name: str, cfg: dict, args) -> dict:
    from abd_fast.data import build_loader
    from abd_fast.models import create_model, get_tokenizer, image_spec
    from abd_fast.text import EDA
    torch.manual_seed(0)
    if cfg["model"] == "bench-vit-b32-tiny":
        _register_bench_model()
    warmup, steps, repeats = (a if a is not None else d for a, d in
                              zip((args.warmup, args.steps, args.repeats), cfg["schedule"]))
    source = _data(cfg["data"])
    base = create_model(cfg["model"], image_size=cfg["image_size"])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    spec = image_spec(base)
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    tok, uap = get_tokenizer(cfg["model"]), make_uap(spec.size, args.mode)
    B = cfg["batch_size"]
    paths = {}
    for pname, engine, views, loss in (("fused", "dali", fused_views, fused_loss()),
                                       ("reference", "torch", eager_views, reference_loss())):
        model = create_model(cfg["model"], image_size=cfg["image_size"])
        model.load_state_dict(state)
        loader = build_loader(source, train=True, batch_size=B, image_size=spec.size,
                              loader=engine, seed=0, num_workers=args.workers)
        if warmup + steps > len(loader):
            raise SystemExit(f"--warmup + --steps ({warmup + steps}) exceed the "
                             f"{len(loader)} batches of an epoch of {source}")
        paths[pname] = TrainPath(pname, loader, model, views, loss, tok, EDA(seed=0), mean, std,
                             uap, lr=1e-4)
    engine_note = {"dali_resize_operator": getattr(paths["fused"].loader, "fast_resize", None)}
    print(f"[{name}] {cfg['model']} {spec.size} px, batch {B} ({2 * B} images + {2 * B} "
          f"captions per forward), UAP {args.mode}, {repeats} repeats x {steps} "
          f"steps (+{warmup} warm-up)", flush=True)
    runs = {p: [] for p in paths}
    for r in range(repeats):
        order = ("fused", "reference") if r % 2 == 0 else ("reference", "fused")
        for p in order:
            res = paths[p].run(r, warmup, steps)
            runs[p].append(res)
            print(f"  repeat {r} {p:9s} {res['images_per_s']:7.1f} images/s "
                  f"({res['step_ms']:.0f} ms/step)", flush=True)
    out = {"machine": machine(), "settings": {**cfg, "warmup": warmup, "steps": steps, "repeats": repeats,
                        "source": source, "uap_mode": args.mode, "workers": args.workers
                        or os.cpu_count(), **engine_note},
           "runs": runs, "paths": {}}
    for p, rs in runs.items():
        out["paths"][p] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    f, ref = out["paths"]["fused"], out["paths"]["reference"]
    out["ratio"] = f["images_per_s"] / ref["images_per_s"]
    out["paired_ratios"] = [a["images_per_s"] / b["images_per_s"]
                            for a, b in zip(runs["fused"], runs["reference"])]
    return out


def read_demo_report(path) -> dict:
    """A demo report.json's "timing" ({stage: seconds}, maybe with "total"): returns
    {"stages": {stage: seconds}, "total": the report's total or None, "sum_of_stages"}.
    Both totals are kept: a demo that reused cached stages reports their original seconds
    per stage but only its own wall time as the total."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--demo-report {p}: no such file (`python -m abd_fast.train` writes "
                         "runs/<name>/report.json)")
    try:
        timing = json.loads(p.read_text()).get("timing")
    except (ValueError, AttributeError) as e:
        raise SystemExit(f"--demo-report {p}: not a JSON report ({e})") from e
    if not isinstance(timing, dict) or not all(isinstance(v, (int, float))
                                              for v in timing.values()):
        raise SystemExit(f"--demo-report {p}: no 'timing' dict of stage -> seconds")
    stages = {str(k): float(v) for k, v in timing.items() if k != "total"}
    total = float(timing["total"]) if "total" in timing else None
    return {"stages": stages, "total": total, "sum_of_stages": sum(stages.values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", action="append", choices=[*SETTINGS, "none"],
                    help="demo, 224-vit, 224-rn (default: demo and 224-vit); none: only "
                         "--demo-report. Repeat the flag for several.")
    ap.add_argument("--steps", type=int, help="timed steps per repeat (default: per setting)")
    ap.add_argument("--warmup", type=int, help="untimed steps per repeat (default: per setting)")
    ap.add_argument("--repeats", type=int, help="repeats per path, interleaved (default: per "
                    "setting)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: cores)")
    ap.add_argument("--mode", choices=["patch", "linf"], default="patch", help="UAP form")
    ap.add_argument("--demo-report", metavar="PATH", help="a demo run's report.json")
    ap.add_argument("--out", default=str(ROOT / "bench/results/step.json"))
    args = ap.parse_args(argv)
    if any(v is not None and v < 1 for v in (args.steps, args.warmup, args.repeats)):
        raise SystemExit("--steps, --warmup and --repeats must be at least 1")
    torch.set_flush_denormal(True)
    payload = {"machine": machine(), "args": vars(args), "settings": {}}
    rows = []
    for name in [s for s in (args.setting or ["demo", "224-vit"]) if s != "none"]:
        res = run_setting(name, SETTINGS[name], args)
        payload["settings"][name] = res
        for p in ("fused", "reference"):
            rows.append({"setting": name, "path": p, **res["paths"][p],
                         "ratio": f"{res['ratio']:.2f}x" if p == "fused" else ""})
    if rows:
        print(table(rows, [("setting", "setting"), ("path", "path"),
                           ("images_per_s", "images/s"), ("ratio", "fused/ref"),
                           ("step_ms", "step ms")]
                    + [(f"{p}_ms", p) for p in PARTS]))
    if args.demo_report:
        timing = read_demo_report(args.demo_report)
        payload["demo_timing"] = {"report": str(args.demo_report), "seconds": timing}
        print(f"\ndemo wall time per stage ({args.demo_report}):")
        rows_t = [{"stage": k, "seconds": v} for k, v in timing["stages"].items()]
        rows_t.append({"stage": "sum of stages", "seconds": timing["sum_of_stages"]})
        if timing["total"] is not None:
            rows_t.append({"stage": "total (report)", "seconds": timing["total"]})
        print(table(rows_t, [("stage", "stage"), ("seconds", "seconds")]))
    out = Path(args.out)
    if out.exists():  # settings measured by earlier runs stay in the file
        old = json.loads(out.read_text())
        payload["settings"] = {**old.get("settings", {}), **payload["settings"]}
        if "demo_timing" not in payload and "demo_timing" in old:
            payload["demo_timing"] = old["demo_timing"]
    write_json(out, payload)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
