"""Where one fine-tuning step of the demo model spends its time, by kind of operator: the
model forward + backward of a CLIP loss and the fused AdamW step, as a demo stage runs them
(abd-tiny-rn, 32 px, batch 64 = the paper-shaped defense batch, --precision auto's bf16 on a
CPU with native bf16 (else fp32), channels-last, math attention, one torch thread as in the
demo's two slots). Random images and 16-token captions; no loader, views or EDA.

    flock /tmp/abd_cpu.lock .venv/bin/python bench/step_profile.py     # -> bench/results/step_profile.json

Reported: median step ms over --repeats timings of --steps steps, torch.profiler's self CPU
time over --steps profiled steps grouped into KINDS (share of the total), and the model's
parameters by part (the token embedding, the image tower's attention pool, the rest):
AdamW and the embedding's dense gradient scale with them, not with the batch. Also the
arithmetic: the step's FLOPs by kind (torch.utils.flop_counter: convolutions and matrix
products, forward and backward), each kind's GFLOP/s (its FLOPs over its share of the median
step), and, as this CPU's rate on large shapes, a 1024 x 1024 x 1024 matrix product in the
step's precision on the same threads, timed in the same process. The step is a
demo stage's: on a CPU without an explicit fp32, the embedding's gradient is sparse and
SparseRowAdamW updates its rows (abd_fast.precision.sparse_rows).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine, write_json  # noqa: E402

# operator name -> kind; the rest is "other"
KINDS = {"convolution": ("aten::mkldnn_convolution", "aten::convolution_backward"),
         "matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
         "AdamW (fused)": ("aten::_fused_adamw_",),
         "zero fills": ("aten::fill_", "aten::zero_"),
         "batch norm": ("aten::native_batch_norm", "aten::native_batch_norm_backward"),
         "casts and copies": ("aten::copy_", "aten::_to_copy")}


def make_step(batch: int, precision: str, sparse_rows: bool = False,
              fresh_tokens: bool = False):
    """The demo model (seed 0) and one training step on a fixed random batch. sparse_rows: as
    a demo stage on a CPU (abd_fast.precision.sparse_rows): the token embedding's gradient
    sparse, engine.SparseRowAdamW. fresh_tokens: new random tokens over the whole
    vocabulary at every step (its rows with a gradient grow to all of them) instead of the
    same ~800."""
    from abd_fast import models
    from abd_fast import precision as prec
    from abd_fast.engine import SparseRowAdamW, make_optimizer
    torch.manual_seed(0)
    model = models.to_channels_last(models.create_model("abd-tiny-rn"))
    opt = make_optimizer(model, 1e-4, sparse_rows=sparse_rows)
    model.token_embedding.sparse = isinstance(opt, SparseRowAdamW)  # as Trainer.fit
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    tokens = torch.randint(1, 49000, (batch, 16))
    tokens[:, 12], tokens[:, 13:] = 49407, 0
    labels = torch.arange(batch)

    def step(opt=opt):  # another optimizer of the same model: bench/sparse_rows.py
        if fresh_tokens:
            tokens[:, :12] = torch.randint(1, 49000, (batch, 12))
        with prec.autocast("cpu", precision):
            i = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            t = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
            logits = model.logit_scale.exp() * i @ t.T
            loss = (torch.nn.functional.cross_entropy(logits, labels)
                    + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step.optimizer = opt
    return model, step


FLOP_KINDS = {"convolution": ("aten.convolution", "aten.convolution_backward"),
              "matrix products": ("aten.mm", "aten.addmm", "aten.bmm")}


def step_flops(step) -> dict:
    """FLOPs of one call of `step` per FLOP_KINDS kind (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    out = {kind: sum(counts.get(op, 0) for op in ops) for kind, ops in FLOP_KINDS.items()}
    out["other"] = sum(counts.values()) - sum(out.values())
    return out


def matmul_gflops(precision: str, n: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of an n x n x n matrix product in `precision` (median of `repeats`)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench/results/step_profile.json"))
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from abd_fast.precision import resolve_precision, sparse_rows
    torch.set_num_threads(args.threads)
    precision = resolve_precision("auto", "cpu")
    model, step = make_step(args.batch, precision, sparse_rows=sparse_rows("auto", "cpu"))
    for _ in range(5):
        step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        times.append((time.perf_counter() - t0) / args.steps * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    by_op = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(by_op.values())
    kinds = {kind: sum(by_op.get(op, 0.0) for op in ops) for kind, ops in KINDS.items()}
    kinds["other"] = total - sum(kinds.values())
    params = {"token embedding": model.token_embedding.weight.numel(),
              "image attention pool": sum(p.numel() for p in model.visual.attnpool.parameters())}
    params["rest"] = sum(p.numel() for p in model.parameters()) - sum(params.values())
    print(f"step {statistics.median(times):.1f} ms (median of {args.repeats} x {args.steps}; "
          f"{precision}, batch {args.batch}, {args.threads} thread(s))")
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * us / total:5.1f}%  {kind}")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items()))
    step_ms = statistics.median(times)
    flops = step_flops(step)
    rates = {kind: flops[kind] / (step_ms * kinds[kind] / total) / 1e6 for kind in FLOP_KINDS}
    rates["whole step"] = sum(flops.values()) / step_ms / 1e6
    peak = matmul_gflops(precision)
    print(f"arithmetic: {sum(flops.values()) / 1e9:.2f} GFLOP per step; GFLOP/s: " + ", ".join(
        f"{k} {v:.0f}" for k, v in rates.items()) + f"; a 1024^3 {precision} matrix product "
        f"{peak:.0f}")
    write_json(Path(args.out), {
        "machine": machine(), "precision": precision, "batch": args.batch,
        "threads": args.threads, "step_ms": times,
        "share": {k: us / total for k, us in kinds.items()}, "parameters": params,
        "flops": flops, "gflops_per_s": rates, "matmul_1024_gflops_per_s": peak})


if __name__ == "__main__":
    main()
