"""Which attention kernel a CLIP tower's training step should use on a CPU: model forward +
backward (CLIP-style loss, no optimizer) with torch's own choice of scaled_dot_product_attention
kernel ("own": flash on a CPU) against the math kernel ("math"), per tower and precision, timed
in alternation in one process (bench.common.timeit_interleaved); and, for abd-tiny-rn in
bf16, torch.profiler's share of the step spent in the flash kernel's backward. The training
loops' choice (abd_fast.precision.autocast: math on a CPU under bf16/fp16, torch's own in
fp32) rests on this; docs/PERFORMANCE.md, "Attention on a CPU".

    flock /tmp/abd_cpu.lock .venv/bin/python bench/attention.py
        # -> bench/results/attention_probe.json
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, table, timeit_interleaved, write_json  # noqa: E402

# (model, batch, caption tokens, image side): the demo's towers at a defend step's batch of
# two views, and ViT-B/32 at 224 px (CLIP's 77-token context).
CASES = [("abd-tiny-rn", 128, 16, 32), ("abd-tiny-rn", 128, 32, 32),
         ("abd-tiny-vit", 128, 16, 32), ("ViT-B-32", 16, 77, 224)]


def make_step(name, batch, tokens, side, precision):
    from abd_fast.models import create_model, to_channels_last
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(batch, 3, side, side)
    if precision == "bf16":  # the training loops' layout under bf16
        model = to_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)
    text = torch.randint(1, 49000, (batch, tokens))
    text[:, tokens - 2] = 49407  # end-of-text: the pooled position

    def step(kernel):
        backend = sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext()
        with backend, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            img, txt = model.encode_image(x).float(), model.encode_text(text).float()
            loss = (img @ txt.T).logsumexp(1).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
    return model, step


def flash_backward_share(step) -> float:
    """Share of the step's CPU time in the flash kernel's backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    step("own")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step("own")
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    flash = sum(e.self_cpu_time_total for e in events
                if "flash_attention" in e.key and "backward" in e.key)
    return flash / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=6, help="timed rounds per kernel")
    ap.add_argument("--out", default=str(ROOT / "bench/results/attention_probe.json"))
    args = ap.parse_args(argv)
    rows = []
    for precision in ("bf16", "fp32"):
        for name, batch, tokens, side in CASES:
            _, step = make_step(name, batch, tokens, side, precision)
            reps = max(2, args.reps // 3) if name == "ViT-B-32" else args.reps
            res = timeit_interleaved({k: (lambda k=k: step(k)) for k in ("own", "math")},
                                     reps=reps, warmup=1)
            row = {"model": name, "batch": batch, "tokens": tokens, "side": side,
                   "precision": precision, "own_ms": res["own"]["ms"],
                   "math_ms": res["math"]["ms"],
                   "own_over_math": res["own"]["ms"] / res["math"]["ms"]}
            if (name, tokens, precision) == ("abd-tiny-rn", 16, "bf16"):
                row["flash_backward_share"] = flash_backward_share(step)
            rows.append(row)
            print(f"{name} B{batch} L{tokens} {side}px {precision}: own {row['own_ms']:.1f} ms, "
                  f"math {row['math_ms']:.1f} ms, {row['own_over_math']:.2f}x", flush=True)
    print(table(rows, [("model", "model"), ("precision", "precision"), ("tokens", "tokens"),
                       ("own_ms", "own ms"), ("math_ms", "math ms"),
                       ("own_over_math", "own / math")]))
    write_json(Path(args.out), {"machine": machine(), "rows": rows})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
