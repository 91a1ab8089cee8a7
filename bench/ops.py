"""Benchmark of the fused ops against their baselines, run in the same process.

    python bench/ops.py                      # full run, writes bench/results/ops.json
    python bench/ops.py --sizes 1024 --image-batch 32 --out /tmp/ops.json   # quick look

Contrastive: clip_loss / info_nce forward+backward vs open_clip's ClipLoss and the plain
PyTorch InfoNCE, D=512 fp32: time and peak extra memory (on CPU, high-water RSS in a fresh
process per case; on a GPU, torch.cuda.max_memory_allocated).
Image ops: uint8 [B,3,224,224] -> normalized fp32, forward and forward+backward, vs the eager
reference and torch.compile of the reference, timed in alternation (medians and quantiles of
--reps rounds, minor page faults per call); achieved bandwidth of one ideal pass as a
fraction of the measured fp32 copy bandwidth into an existing buffer ("of copy": the
machine's memory bandwidth, the bar of the targets), into a fresh tensor ("of fresh copy":
4 KB page faults, as the references pay) and into a fresh tensor with the huge-page hint
("of fresh THP copy"). On CPU ours is also timed with its output pool off ("pool off":
every call gets a fresh huge-page-hinted block, as before the pool).
    python bench/ops.py --skip-contrastive --merge   # image ops only, keeps the rest
On a GPU, times come from triton.testing.do_bench.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, machine, measure_peak_in_subprocess, peak_extra_rss,  # noqa: E402
                    table, timeit_interleaved, write_json)

sys.path.insert(0, str(ROOT))  # this checkout's abd_fast, not whichever one the venv installed

from abd_fast.ops import (apply_perturbation, apply_trigger, clip_loss, info_nce,  # noqa: E402
                          set_cpu_pool_limit)
from abd_fast.ops import reference  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---- contrastive ------------------------------------------------------------------------

def _features(B: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(DEVICE)
    x.div_(x.norm(dim=1, keepdim=True))  # in place: no temporary as large as x
    return x.requires_grad_(True)


def contrastive_step(provider: str, B: int, D: int):
    """A closure running one forward+backward of `provider` on fresh [B,D] features."""
    img, txt = _features(B, D, 0), _features(B, D, 1)
    scale = torch.tensor(100.0, device=DEVICE, requires_grad=True)
    if provider == "open_clip ClipLoss":
        from open_clip.loss import ClipLoss
        loss_fn = ClipLoss()
        fn = lambda: loss_fn(img, txt, scale)
    elif provider == "clip_loss (ours)":
        fn = lambda: clip_loss(img, txt, scale)
    elif provider == "info_nce (ours)":
        fn = lambda: info_nce(img, txt, scale)
    elif provider == "info_nce reference":
        fn = lambda: reference.info_nce(img, txt, scale)
    else:
        raise ValueError(provider)

    def step():
        img.grad = txt.grad = scale.grad = None
        fn().backward()
    return step


CONTRASTIVE = [("clip_loss (ours)", "open_clip ClipLoss"), ("info_nce (ours)", "info_nce reference")]


def peak_extra_bytes(provider: str, B: int, D: int) -> int:
    if DEVICE == "cuda":
        step = contrastive_step(provider, B, D)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return measure_peak_in_subprocess(Path(__file__), [provider, str(B), str(D)])


def bench_contrastive(sizes, D: int) -> list[dict]:
    rows = []
    for B in sizes:
        reps = 5 if B <= 4096 else 3
        for ours, base in CONTRASTIVE:
            t = timeit_interleaved({"ours": contrastive_step(ours, B, D),
                                    "baseline": contrastive_step(base, B, D)},
                                   DEVICE, reps=reps, warmup=1)
            t_ours, t_base = t["ours"], t["baseline"]
            m_ours, m_base = peak_extra_bytes(ours, B, D), peak_extra_bytes(base, B, D)
            rows.append({"op": ours, "baseline": base, "B": B, "D": D,
                         "ms": t_ours["ms"], "baseline_ms": t_base["ms"],
                         "time_ratio": t_ours["ms"] / t_base["ms"],
                         "peak_MB": m_ours / 2**20, "baseline_peak_MB": m_base / 2**20,
                         "memory_ratio": m_ours / m_base,
                         "timing": {"ours": t_ours, "baseline": t_base}})
            print(f"  B={B} {ours}: {t_ours['ms']:.1f} ms vs {t_base['ms']:.1f} ms, "
                  f"peak {m_ours / 2**20:.1f} MB vs {m_base / 2**20:.1f} MB", flush=True)
    return rows


# ---- image ops ---------------------------------------------------------------------------

def wanet_grid(H: int, k: int = 4, s: float = 0.5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=H, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    a = torch.linspace(-1, 1, H)
    xx, yy = torch.meshgrid(a, a, indexing="ij")
    identity = torch.stack((yy, xx), 2)[None]
    return torch.clamp(identity + s * noise / H, -1, 1)[0].contiguous()


def image_cases(B: int, H: int):
    """name -> (src tensor or None, ours(images, src), reference(images, src), grad?)."""
    g = torch.Generator().manual_seed(0)
    C = 3
    mean, std = torch.tensor(CLIP_MEAN, device=DEVICE), torch.tensor(CLIP_STD, device=DEVICE)
    side = 16 * H // 224
    ys = torch.randint(0, H - side + 1, (B,), generator=g).to(DEVICE)
    xs = torch.randint(0, H - side + 1, (B,), generator=g).to(DEVICE)
    loc = torch.stack([ys, xs], 1)
    box = int(math.sqrt(0.03) * H)
    at = H - box - (H * 14) // 224
    box_loc = torch.tensor([[at, at]] * B, device=DEVICE)
    sig = (40 / 255) * torch.sin(2 * math.pi * torch.arange(H) * 6 / H)
    norm = dict(mean=CLIP_MEAN, std=CLIP_STD)
    rnorm = dict(mean=mean, std=std)
    R = reference.image_op
    return {
        "badnet patch": (torch.rand(C, side, side, generator=g),
                         lambda x, s: apply_trigger(x, "patch", patch=s, ys=ys, xs=xs, **norm),
                         lambda x, s: R(x, "patch", s, loc, **rnorm), True),
        "blended": (torch.rand(C, H, H, generator=g),
                    lambda x, s: apply_trigger(x, "blend", pattern=s, alpha=0.2, **norm),
                    lambda x, s: R(x, "blend", s, alpha=0.2, **rnorm), True),
        "sig (add)": (sig.expand(C, H, H).contiguous(),
                      lambda x, s: apply_trigger(x, "add", pattern=s, **norm),
                      lambda x, s: R(x, "add", s, **rnorm), True),
        "wanet (warp)": (wanet_grid(H),
                         lambda x, s: apply_trigger(x, "warp", grid=s, **norm),
                         lambda x, s: R(x, "warp", s, **rnorm), False),
        "uap linf": ((torch.rand(C, H, H, generator=g) - 0.5) * 0.06,
                     lambda x, s: apply_perturbation(x, s, mode="linf", eps=0.03, **norm),
                     lambda x, s: R(x, "add", s, eps=0.03, **rnorm), True),
        "uap patch": (torch.rand(C, box, box, generator=g),
                      lambda x, s: apply_perturbation(x, s, mode="patch", box=(at, at), **norm),
                      lambda x, s: R(x, "patch", s, box_loc, **rnorm), True),
    }


def ideal_bytes(name: str, images, src, backward: bool) -> int:
    """Bytes of one ideal pass: read the images and src, write the fp32 output; backward:
    read the output gradient where src acts (and the images where the mask needs them),
    write the src gradient."""
    n = images.numel()
    fwd = n * images.element_size() + n * 4 + src.numel() * 4
    if not backward:
        return fwd
    if "patch" in name:
        touched = images.shape[0] * src.numel()  # gradient read only inside the boxes
        return fwd + touched * 4 + src.numel() * 4
    return fwd + n * 4 + n * images.element_size() + src.numel() * 4


def _advise_huge_pages(t: torch.Tensor):
    """madvise(MADV_HUGEPAGE) on the 2 MB pages inside t, as the CPU kernels do for the blocks
    of their output pool (csrc/cpu/output_pool.cpp); no-op elsewhere."""
    import ctypes
    huge = 2 << 20
    a = -(-t.data_ptr() // huge) * huge
    b = (t.data_ptr() + t.nbytes) // huge * huge
    if sys.platform.startswith("linux") and t.device.type == "cpu" and b >= a + 2 * huge:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 14)


def copy_bandwidth(numel: int) -> dict:
    """fp32 copy of `numel` elements (bytes read + bytes written per second), three ways:
    into an existing buffer (the memory bandwidth: the bar of the targets), into a fresh
    tensor (pays one page fault per 4 KB page, as the eager and compiled references do), and
    into a fresh tensor with the huge-page hint (our CPU kernels' allocation, pool off)."""
    x = torch.rand(numel, device=DEVICE)
    dst = torch.empty_like(x)

    def fresh_huge():
        y = torch.empty_like(x)
        _advise_huge_pages(y)
        return y.copy_(x)
    t = timeit_interleaved({"existing": lambda: dst.copy_(x), "fresh": lambda: x.clone(),
                            "fresh_hugepage": fresh_huge}, DEVICE, reps=21, warmup=2)
    nbytes = 2 * numel * 4
    return {"bytes": nbytes, "timing": t,
            **{f"{k}_output_GBps": nbytes / v["ms"] / 1e6 for k, v in t.items()}}


COPY_KINDS = ("existing", "fresh", "fresh_hugepage")


def pool_off(step):
    """`step` with the CPU output pool off (limit 0), as the ops ran before the pool."""
    def run():
        old = set_cpu_pool_limit(0)
        try:
            step()
        finally:
            set_cpu_pool_limit(old)
    return run


def bench_image(B: int, H: int, reps: int) -> tuple[list[dict], dict]:
    images = torch.randint(0, 256, (B, 3, H, H), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1)).to(DEVICE)
    copy = copy_bandwidth(images.numel())
    print("  copy bandwidth (GB/s): " + ", ".join(
        f"{copy[k + '_output_GBps']:.1f} into a {k.replace('_', ' ')} output" for k in COPY_KINDS),
        flush=True)
    gout = torch.randn(images.shape, device=DEVICE)
    rows = []
    for name, (src, ours, ref, has_grad) in image_cases(B, H).items():
        src = src.to(DEVICE)
        compiled = torch.compile(ref, dynamic=False)
        for backward in ([False, True] if has_grad else [False]):
            s = src.clone().requires_grad_(backward)

            def run(fn):
                def step():
                    out = fn(images, s)
                    if backward:
                        s.grad = None
                        out.backward(gout)
                return step
            # same inputs, same output dtype, same upstream gradient for all; the compiled
            # reference compiles (forward and backward graphs) during the warm-up
            fns = {"ours": run(ours), "compiled": run(compiled), "eager": run(ref)}
            if DEVICE == "cpu":
                fns["ours, pool off"] = pool_off(run(ours))
            t = timeit_interleaved(fns, DEVICE, reps={"ours": reps, "ours, pool off": reps,
                                                      "compiled": reps, "eager": max(5, reps // 3)},
                                   warmup=2)
            nbytes = ideal_bytes(name, images, src, backward)
            gbps = nbytes / t["ours"]["ms"] / 1e6
            off = {}
            if "ours, pool off" in t:
                off_gbps = nbytes / t["ours, pool off"]["ms"] / 1e6
                off = {"pool_off_ms": t["ours, pool off"]["ms"], "pool_off_GBps": off_gbps,
                       **{f"pool_off_{k}_copy_fraction": off_gbps / copy[f"{k}_output_GBps"]
                          for k in COPY_KINDS}}
            rows.append({"op": name, "pass": "fwd+bwd" if backward else "fwd", "B": B, "H": H,
                         "ms": t["ours"]["ms"], "eager_ms": t["eager"]["ms"],
                         "compiled_ms": t["compiled"]["ms"],
                         "vs_eager": t["eager"]["ms"] / t["ours"]["ms"],
                         "vs_compiled": t["compiled"]["ms"] / t["ours"]["ms"],
                         "ideal_MB": nbytes / 2**20, "GBps": gbps,
                         **{f"{k}_copy_fraction": gbps / copy[f"{k}_output_GBps"]
                            for k in COPY_KINDS},
                         **off, "timing": t})
            print(f"  {name} {rows[-1]['pass']}: {t['ours']['ms']:.1f} ms, eager "
                  f"{t['eager']['ms']:.1f}, compiled {t['compiled']['ms']:.1f}", flush=True)
    return rows, copy


# ---- main --------------------------------------------------------------------------------

def peak_memory_main(provider: str, B: str, D: str):
    print(peak_extra_rss(contrastive_step(provider, int(B), int(D))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--image-batch", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=21,
                    help="timed rounds of ours and the compiled reference (eager: a third)")
    ap.add_argument("--skip-contrastive", action="store_true")
    ap.add_argument("--skip-image", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep the sections of --out that this run skips")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ops.json")
    args = ap.parse_args()
    import abd_fast
    result = {"machine": machine(), "device": DEVICE, "abd_fast": str(Path(abd_fast.__file__).parent),
              "command": "python " + " ".join(sys.argv)}
    print(f"machine: {result['machine']}")
    if not args.skip_contrastive:
        print("contrastive (forward+backward, fp32):")
        result["contrastive"] = bench_contrastive(args.sizes, args.dim)
        print(table(result["contrastive"], [
            ("op", "op"), ("B", "B"), ("ms", "ms"), ("baseline", "baseline"),
            ("baseline_ms", "base ms"), ("time_ratio", "time x"), ("peak_MB", "peak MB"),
            ("baseline_peak_MB", "base MB"), ("memory_ratio", "mem x")]))
    if not args.skip_image:
        print(f"image ops (uint8 [{args.image_batch},3,{args.image_size},{args.image_size}] "
              "-> normalized fp32):")
        result["image"], result["copy_bandwidth"] = bench_image(args.image_batch, args.image_size,
                                                                 args.reps)
        print(table(result["image"], [
            ("op", "op"), ("pass", "pass"), ("ms", "ours ms"), ("eager_ms", "eager ms"),
            ("compiled_ms", "compiled ms"), ("vs_eager", "x eager"),
            ("vs_compiled", "x compiled"), ("GBps", "GB/s"),
            ("existing_copy_fraction", "of copy"), ("pool_off_ms", "pool off ms"),
            ("pool_off_existing_copy_fraction", "pool off: of copy"),
            ("pool_off_fresh_hugepage_copy_fraction", "pool off: of fresh THP copy")]))
    if args.merge and args.out.exists():
        import json
        old = json.loads(args.out.read_text())
        for key in ("contrastive", "image", "copy_bandwidth"):
            if key in old and key not in result:
                result[key] = old[key]
                made_by = old.get("kept_from_earlier_run", {}).get(key, old.get("command"))
                result.setdefault("kept_from_earlier_run", {})[key] = made_by
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-memory":
        peak_memory_main(*sys.argv[2:])
    else:
        main()
