"""Images/s of a whole ABD fine-tuning step (the `defend` stage's step, method abd, objective
align) run several ways on the same model, batch, optimizer and data, in one process:

  fp32-eager  today's step before --precision/--compile: fused image views and losses, fp32,
              NCHW, eager -- the baseline every ratio is against
  default     what `defend` runs now by default: --precision auto (abd_fast.precision: bf16
              on a CPU with AMX/AVX512-BF16 or a GPU, fp32 elsewhere), its channels-last,
              trimmed-text and embedding-by-rows choices (abd_fast.precision), and
              torch.compile where the defend loop compiles by default
              (abd_fast.engine.default_compile)
  bf16-cl     bf16 autocast + channels-last (+ the default compile), whatever the CPU: the
              ratio an AMX machine would get; on a CPU without native bf16 it is emulated
              (slow), which is why auto does not pick it there
  fp32-cl, fp32-trim, fp32-compile, fp32-cl-trim, fp32-cl-compile  (--paths ...) one or
              two of the default's parts alone, fp32
  bf16-cl-compile  (--paths ...) bf16 + channels-last, compiled (full text context: a
              compiled loop does not trim): whether compile pays where bf16 is native
  default-flash  (--paths ...) the default with torch's own attention kernel on a CPU (flash)
              instead of math (abd_fast.precision.autocast): what that choice is worth
  reference   (--paths reference) the unfused eager step of earlier tables: the torch
              loader engine (PIL in 2 DataLoader workers); the image views composed eagerly
              (float, /255, paste the patch or add the clamped delta, clamp, normalize);
              open_clip's ClipLoss for the multimodal term and, as CleanCLIP's code does,
              cross entropy over materialized logits for the one-directional in-modal terms

The fused paths: the DALI loader engine (2 threads, our resize operator on CPU); the image
views [clean, image + UAP] by one call of the fused image op on the uint8 images stacked
twice (UAP.apply -> apply_perturbation on the second copy's rows, written in the autocast
dtype); the loss by abd_objective through objectives.Contrastive (fused CLIP loss and
InfoNCE) -- what abd_fast.defenses.stages.defense_loss runs.

Shared by all: the text views [caption, EDA(caption)] (keyed by (epoch, id)) and the
tokenizer, one model forward over all views, AdamW (abd_fast.engine.make_optimizer, the
fused kernel), the logit-scale clamp, flush-denormal mode (as the Trainer sets on CPU).
All models start from one state dict. Each step is timed whole, data loading included (the
loaders run their workers as in training, 2 each), and in parts:

  loader      waiting for the next batch (next(iterator))
  views       the image views, concatenated
  text        EDA + tokenizer (+ trim_tokens where the path trims: fp32 explicit does not)
  forward     model(x, tokens)
  loss        the objective's forward + backward (on detached feature leaves, so its cost is
              separated from the model's backward; the gradients are then passed on)
  backward    the model's backward
  optimizer   zero_grad, AdamW step, logit-scale clamp

A compiled path's first step compiles (forward and backward graphs); it runs once before
the repeats and its extra seconds are reported as "compile s" (with a warm inductor cache
in $ABD_FAST_CACHE/inductor, a load; see docs/PERFORMANCE.md for cold and warm). Each repeat
builds a fresh epoch iterator (set_epoch(repeat): every path sees the same samples, crops
and flips), runs --warmup untimed steps, then --steps timed ones. The order of the paths
rotates from repeat to repeat so a slow phase of the shared machine hits all alike.
Reported: median images/s over repeats per path, its ratio to fp32-eager, per-repeat paired
ratios, and the median per-part ms.

    flock /tmp/abd_cpu.lock .venv/bin/python bench/step.py                 # demo and 224-vit
    flock /tmp/abd_cpu.lock .venv/bin/python bench/step.py --setting vit-b32
    .venv/bin/python bench/step.py --demo-report runs/demo/report.json --setting none

Settings (--setting, repeatable; default demo and 224-vit):
  demo     the `defend` stage's defaults on the synthetic dataset (abd-tiny-rn, 32 px,
           batch 128, patch UAP of 3% area; 64-px JPEG sources)
  224-vit  batch 64 of 224 px from the 256x256 JPEG shards of bench/loaders.py, model
           bench-vit-b32-tiny: ViT-B/32's geometry (32-px patches, 49 tokens) at the tiny
           models' width 128 and depth 4 (keeps the pixel and loader work of a 224-px run)
  224-rn   abd-tiny-rn forced to 224 px, batch 64, same shards: a convolutional tower whose
           cost grows with the pixels (7-10 s per step; fewer steps and repeats)
  vit-b32  a real-size tower: open_clip's ViT-B-32 (random weights) at 224 px, 16 images +
           16 captions, forward + backward of the CLIP loss only (views, text, forward, loss,
           backward; no loader, no optimizer): the issue's "ViT-B/32 forward + backward"
--demo-report adds the per-stage wall times of a `python -m abd_fast.train` demo run
(report.json's "timing": {stage: seconds}). Repeated, it lines the runs up stage by stage,
the first as the baseline, with each other run's speed-up over it (baseline seconds / its
seconds) and the sums over the stages every run has, e.g. the demo in fp32 against the default:

    .venv/bin/python bench/step.py --setting none --demo-report runs/fp32/report.json \
        --demo-report runs/demo/report.json

Writes bench/results/step.json.
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
# data None: one in-memory batch of random images and fixed captions, model step only.
SETTINGS = {
    "demo": dict(model="abd-tiny-rn", image_size=32, batch_size=128, data="synthetic",
                 schedule=(3, 10, 6)),
    "224-vit": dict(model="bench-vit-b32-tiny", image_size=224, batch_size=64,
                    data="shards-256", schedule=(3, 10, 6)),
    "224-rn": dict(model="abd-tiny-rn", image_size=224, batch_size=64, data="shards-256",
                   schedule=(2, 3, 4)),
    "vit-b32": dict(model="ViT-B-32", image_size=224, batch_size=16, data=None,
                    schedule=(1, 3, 4)),
}
# The ways of running the step (module doc). compile / channels_last / trim_text None: the
# defend loop's default and the precision's.
def _path(precision, compile, channels_last, trim_text, fused=True, math_attention=None):
    return dict(fused=fused, precision=precision, compile=compile, channels_last=channels_last,
                trim_text=trim_text, math_attention=math_attention)


PATHS = {  # precision, compile, channels_last, trim_text
    "fp32-eager": _path("fp32", False, False, False),
    "default": _path("auto", None, None, None),
    "bf16-cl": _path("bf16", None, True, None),
    "reference": _path("fp32", False, False, False, fused=False),
    # the parts of a default, one or two at a time (the choices of abd_fast.precision/engine)
    "fp32-cl": _path("fp32", False, True, False),
    "fp32-trim": _path("fp32", False, False, True),
    "fp32-compile": _path("fp32", True, False, False),
    "fp32-cl-trim": _path("fp32", False, True, True),
    "fp32-cl-compile": _path("fp32", True, True, False),
    "bf16-cl-compile": _path("bf16", True, True, False),
    # the default as it was before its CPU attention choice (abd_fast.precision.autocast)
    "default-flash": _path("auto", None, None, None, math_attention=False),
}
DEFAULT_PATHS = ("fp32-eager", "default", "bf16-cl")
BASELINE = "fp32-eager"
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
    """[clean; adversarial] normalized views in one batch, as defense_loss builds them (in the
    autocast dtype under autocast)."""
    from abd_fast.precision import image_dtype
    return uap.clean_and_adversarial(images, mean=mean, std=std,
                                     out_dtype=image_dtype(images.device))


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

class MemoryLoader:
    """The `vit-b32` setting's data: one fixed batch of random images and captions, yielded
    `steps` times per epoch (the model step alone is timed, not decoding)."""

    def __init__(self, batch_size: int, image_size: int, steps: int = 1000):
        from abd_fast.data.loader import Batch
        g = torch.Generator().manual_seed(0)
        self.batch = Batch(images=torch.randint(0, 256, (batch_size, 3, image_size, image_size),
                                                dtype=torch.uint8, generator=g),
                           ids=torch.arange(batch_size),
                           captions=[f"a photo of a thing, number {i}" for i in range(batch_size)],
                           labels=None)
        self.steps = steps

    def set_epoch(self, epoch: int):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


def path_options(spec: dict) -> dict:
    """A PATHS entry with its defaults resolved: precision, channels_last, trim_text,
    compile, and sparse_rows as the Trainer chooses it (the token embedding's rows)."""
    from abd_fast.engine import default_compile
    from abd_fast.precision import channels_last, resolve_precision, sparse_rows, trim_text
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(spec["precision"], device)

    def choice(key, default):
        return default(spec["precision"]) if spec[key] is None else spec[key]
    compile = choice("compile", lambda _: default_compile("defend"))
    # as the training commands: no trimmed text in a compiled loop (abd_fast.cli.common.Run)
    return {"precision": precision, "channels_last": choice("channels_last", channels_last),
            "trim_text": choice("trim_text", lambda p: trim_text(p) and not compile),
            "compile": compile,   # math attention: None = autocast's own default
            "math_attention": spec["math_attention"],
            "sparse_rows": sparse_rows(spec["precision"], device) and not compile}


class TrainPath:
    def __init__(self, name, loader, model, views, loss, tokenizer, eda, mean, std, uap, lr,
                 precision="fp32", channels_last=False, trim_text=False, compile=False,
                 math_attention=None, optimizer=True, sparse_rows=False):
        from abd_fast.engine import SparseRowAdamW, compile_module, make_optimizer
        from abd_fast.models import to_channels_last
        self.name, self.loader, self.model = name, loader, model
        self.views, self.loss, self.tok, self.eda = views, loss, tokenizer, eda
        self.mean, self.std, self.uap = mean, std, uap
        self.precision, self.trim_text = precision, trim_text
        self.math_attention = math_attention
        if channels_last:
            to_channels_last(model)
        self.forward = compile_module(model) if compile else model
        self.opt = make_optimizer(model, lr, sparse_rows=sparse_rows) if optimizer else None
        # as Trainer.fit: sparse where make_optimizer took SparseRowAdamW (it may not)
        model.token_embedding.sparse = isinstance(self.opt, SparseRowAdamW)

    def first_step(self) -> float:
        """Seconds of the very first step (a compiled path compiles its graphs in it)."""
        self.loader.set_epoch(0)
        t0 = time.perf_counter()
        self.run(0, 0, 1)
        return time.perf_counter() - t0

    def run(self, epoch: int, warmup: int, steps: int) -> dict:
        """warmup untimed + `steps` timed training steps from a fresh epoch iterator."""
        from abd_fast.defenses.views import eda_view
        from abd_fast.engine import clamp_logit_scale
        from abd_fast.models import trim_tokens
        from abd_fast.precision import autocast
        self.model.train()
        self.loader.set_epoch(epoch)
        it = iter(self.loader)
        parts = {p: 0.0 for p in PARTS}
        n_images = 0
        t_start = time.perf_counter()
        for k in range(warmup + steps):
            if k == warmup:
                parts = {p: 0.0 for p in PARTS}
                n_images, t_start = 0, time.perf_counter()
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            with autocast("cpu", self.precision, self.math_attention):
                x = self.views(batch.images, batch.ids, self.uap, self.mean, self.std)
                t2 = time.perf_counter()
                tokens = self.tok(batch.captions + eda_view(self.eda, batch.captions, batch.ids,
                                                            epoch))
                if self.trim_text:
                    tokens = trim_tokens(tokens)
                t3 = time.perf_counter()
                img, txt, scale = self.forward(x, tokens)
                t4 = time.perf_counter()
                leaves = [t.detach().requires_grad_() for t in (img, txt, scale)]
                B = len(batch)
                (i, i_adv), (t, t_eda) = leaves[0].split(B), leaves[1].split(B)
                loss = self.loss(i, t, i_adv, t_eda, leaves[2])
            loss.backward()
            value = loss.item()  # the engine's finiteness check
            t5 = time.perf_counter()
            if self.opt is not None:
                self.opt.zero_grad(set_to_none=True)
            t6 = time.perf_counter()
            torch.autograd.backward((img, txt, scale), [v.grad for v in leaves])
            t7 = time.perf_counter()
            if self.opt is not None:
                self.opt.step()
                clamp_logit_scale(self.model)
            else:
                self.model.zero_grad(set_to_none=True)
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
    source = _data(cfg["data"]) if cfg["data"] else None
    base = create_model(cfg["model"], image_size=cfg["image_size"])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    del base
    spec = image_spec(create_model(cfg["model"], image_size=cfg["image_size"]))
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    tok, uap = get_tokenizer(cfg["model"]), make_uap(spec.size, args.mode)
    B = cfg["batch_size"]
    names = args.paths or list(DEFAULT_PATHS)
    if BASELINE not in names:
        names = [BASELINE, *names]
    paths, options = {}, {}
    for pname in names:
        spec_p = PATHS[pname]
        options[pname] = opts = path_options(spec_p)
        model = create_model(cfg["model"], image_size=cfg["image_size"])
        model.load_state_dict(state)
        if source is None:
            loader = MemoryLoader(B, spec.size)
        else:
            loader = build_loader(source, train=True, batch_size=B, image_size=spec.size,
                                  loader="dali" if spec_p["fused"] else "torch", seed=0,
                                  num_workers=args.workers)
            if warmup + steps > len(loader):
                raise SystemExit(f"--warmup + --steps ({warmup + steps}) exceed the "
                                 f"{len(loader)} batches of an epoch of {source}")
        views, loss = ((fused_views, fused_loss()) if spec_p["fused"]
                       else (eager_views, reference_loss()))
        paths[pname] = TrainPath(pname, loader, model, views, loss, tok, EDA(seed=0), mean, std,
                                 uap, lr=1e-4, optimizer=source is not None, **opts)
    print(f"[{name}] {cfg['model']} {spec.size} px, batch {B} ({2 * B} images + {2 * B} "
          f"captions per forward), UAP {args.mode}, {repeats} repeats x {steps} "
          f"steps (+{warmup} warm-up); paths: "
          + "; ".join(f"{p} = {o['precision']}{', channels-last' if o['channels_last'] else ''}"
                      f"{', trimmed text' if o['trim_text'] else ''}"
                      f"{', flash attention' if o['math_attention'] is False else ''}"
                      f"{', compiled' if o['compile'] else ', eager'}"
                      for p, o in options.items()), flush=True)
    first = {}
    for p, path in paths.items():  # compiles (or loads the compiled graphs) before timing
        first[p] = path.first_step()
        print(f"  first step {p:10s} {first[p]:7.1f} s", flush=True)
    runs = {p: [] for p in paths}
    order = list(paths)
    for r in range(repeats):
        for p in order[r % len(order):] + order[:r % len(order)]:
            res = paths[p].run(r, warmup, steps)
            runs[p].append(res)
            print(f"  repeat {r} {p:10s} {res['images_per_s']:7.1f} images/s "
                  f"({res['step_ms']:.0f} ms/step)", flush=True)
    out = {"machine": machine(),
           "settings": {**cfg, "warmup": warmup, "steps": steps, "repeats": repeats,
                        "source": source, "uap_mode": args.mode,
                        "workers": args.workers or os.cpu_count()},
           "options": options, "runs": runs, "paths": {}}
    base_runs = runs[BASELINE]
    for p, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        step_s = med["step_ms"] / 1e3
        out["paths"][p] = {**med, "first_step_s": first[p],
                           "compile_s": max(0.0, first[p] - step_s) if options[p]["compile"]
                           else None,
                           "ratio": med["images_per_s"] / statistics.median(
                               r["images_per_s"] for r in base_runs),
                           "paired_ratios": [a["images_per_s"] / b["images_per_s"]
                                             for a, b in zip(rs, base_runs)]}
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


def demo_timing_rows(timings: list[dict]) -> list[dict]:
    """Rows of stage -> seconds of each run (keys s0, s1, ...; read_demo_report's dicts) and
    x1, x2, ...: the first run's seconds over run k's (its speed-up over the first). With two
    or more runs after the first, also "med": the median of those runs' seconds of the stage
    (one run slowed by other jobs does not move it) and "xmed" = s0 / med. Then "sum of
    common stages" (the stages every run has: the comparable total; with med, the stages the
    first run and at least two others have, summed per run and as medians) and each run's
    own sum of stages."""
    names = list(dict.fromkeys(k for t in timings for k in t["stages"]))
    meds = {}
    for n in names:
        vals = [t["stages"][n] for t in timings[1:] if n in t["stages"]]
        if len(vals) > 1:
            meds[n] = statistics.median(vals)

    def row(stage, secs, med=None):
        r = {"stage": stage, **{f"s{k}": v for k, v in enumerate(secs) if v is not None}}
        for k, v in enumerate(secs[1:], 1):
            if v and secs[0]:
                r[f"x{k}"] = f"{secs[0] / v:.2f}x"
        if med is not None:
            r["med"] = med
            if secs[0]:
                r["xmed"] = f"{secs[0] / med:.2f}x"
        return r
    rows = [row(n, [t["stages"].get(n) for t in timings], meds.get(n)) for n in names]
    if len(timings) > 1:
        common = [n for n in names if all(n in t["stages"] for t in timings)]
        rows.append(row("sum of common stages",
                        [sum(t["stages"][n] for n in common) for t in timings]))
    if len(timings) > 2:
        both = [n for n in meds if n in timings[0]["stages"]]
        rows.append(row("sum of stages with a median",
                        [sum(timings[0]["stages"][n] for n in both)],
                        sum(meds[n] for n in both)))
    rows.append({"stage": "sum of stages",
                 **{f"s{k}": t["sum_of_stages"] for k, t in enumerate(timings)}})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", action="append", choices=[*SETTINGS, "none"],
                    help="demo, 224-vit, 224-rn, vit-b32 (default: demo and 224-vit); none: "
                         "only --demo-report. Repeat the flag for several.")
    ap.add_argument("--paths", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                    help=f"comma list of {', '.join(PATHS)} (default: "
                         f"{','.join(DEFAULT_PATHS)}; {BASELINE} is always run)")
    ap.add_argument("--steps", type=int, help="timed steps per repeat (default: per setting)")
    ap.add_argument("--warmup", type=int, help="untimed steps per repeat (default: per setting)")
    ap.add_argument("--repeats", type=int, help="repeats per path, interleaved (default: per "
                    "setting)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: cores)")
    ap.add_argument("--mode", choices=["patch", "linf"], default="patch", help="UAP form")
    ap.add_argument("--demo-report", metavar="PATH", action="append",
                    help="a demo run's report.json; repeat to compare runs (the first is the "
                         "baseline)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/step.json"))
    args = ap.parse_args(argv)
    if any(v is not None and v < 1 for v in (args.steps, args.warmup, args.repeats)):
        raise SystemExit("--steps, --warmup and --repeats must be at least 1")
    unknown = [p for p in args.paths or () if p not in PATHS]
    if unknown:
        raise SystemExit(f"--paths: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    from abd_fast.engine import use_compile_cache
    use_compile_cache()
    torch.set_flush_denormal(True)
    payload = {"machine": machine(), "args": vars(args), "settings": {}}
    rows = []
    for name in [s for s in (args.setting or ["demo", "224-vit"]) if s != "none"]:
        res = run_setting(name, SETTINGS[name], args)
        payload["settings"][name] = res
        for p, r in res["paths"].items():
            rows.append({"setting": name, "path": p, **r,
                         "ratio": f"{r['ratio']:.2f}x" if p != BASELINE else "",
                         "compile_s": "" if r["compile_s"] is None else r["compile_s"]})
    if rows:
        print(table(rows, [("setting", "setting"), ("path", "path"),
                           ("images_per_s", "images/s"), ("ratio", f"x {BASELINE}"),
                           ("step_ms", "step ms"), ("compile_s", "compile s")]
                    + [(f"{p}_ms", p) for p in PARTS]))
    if args.demo_report:
        timings = [read_demo_report(p) for p in args.demo_report]
        payload["demo_timing"] = [{"report": str(p), "seconds": t}
                                  for p, t in zip(args.demo_report, timings)]
        print("\ndemo wall time per stage, seconds:")
        for k, (p, t) in enumerate(zip(args.demo_report, timings)):
            total = "" if t["total"] is None else f" (its own wall time: {t['total']:.0f} s)"
            print(f"  s{k}: {p}{total}")
        cols = [("stage", "stage")] + [(f"s{k}", f"s{k}") for k in range(len(timings))]
        cols += [(f"x{k}", f"s0/s{k}") for k in range(1, len(timings))]
        if len(timings) > 2:
            cols += [("med", "median s1.."), ("xmed", "s0/median")]
        print(table(demo_timing_rows(timings), cols))
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
