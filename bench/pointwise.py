"""1x1 convolutions as matrix products (abd_fast.models.PointwiseConv2d) against oneDNN's
convolutions, in one process, timed in alternation (bench.common.timeit_interleaved):

- each 1x1, stride-1 convolution of the demo's image tower (abd-tiny-rn, 32 px) at the
  defenses' batch of 64, and of RN50's at 224 px (batch 16), forward + backward of input
  and weight, bf16 autocast, channels-last;
- the demo's whole fine-tuning step (bench/step_profile.py's: forward + backward of a CLIP
  loss and AdamW, batch 64) with the tower's 1x1 convolutions either way.

    flock /tmp/abd_cpu.lock .venv/bin/python bench/pointwise.py    # -> bench/results/pointwise.json

One torch thread by default, as in a demo slot (--threads). Ratios are convolution ms over
matrix-product ms.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine, table, timeit_interleaved, write_json  # noqa: E402


def pointwise_shapes(name: str, size: int, batch: int) -> list[tuple[int, int, int, int]]:
    """(batch, in, out, side) of each 1x1, stride-1 convolution of `name`'s image tower."""
    from abd_fast.models import create_model
    model = create_model(name, image_size=size if name == "RN50" else None).eval()
    shapes = []

    def hook(m, args, _):
        shapes.append((batch, m.in_channels, m.out_channels, args[0].shape[-1]))
    for m in model.visual.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.encode_image(torch.zeros(1, 3, size, size))
    return shapes


def layer_times(shape, reps: int) -> dict:
    from abd_fast.models import PointwiseConv2d
    n, c, o, s = shape
    conv = torch.nn.Conv2d(c, o, 1, bias=False).to(memory_format=torch.channels_last)
    pointwise = PointwiseConv2d(c, o, 1, bias=False)
    pointwise.load_state_dict(conv.state_dict())
    x = torch.randn(n, c, s, s).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(n, o, s, s, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def step(layer):
        def run():
            with torch.autocast("cpu", torch.bfloat16):
                y = layer(x)
            torch.autograd.grad(y, (x, layer.weight), g)
        return run
    t = timeit_interleaved({"conv": step(conv), "matmul": step(pointwise)}, reps=reps)
    return {"shape": dict(zip(("batch", "in", "out", "side"), shape)),
            "conv_ms": t["conv"]["ms"], "matmul_ms": t["matmul"]["ms"],
            "ratio": t["conv"]["ms"] / t["matmul"]["ms"]}


def step_times(reps: int, steps: int) -> dict:
    """The demo step with the tower's 1x1 convolutions as PointwiseConv2d and as nn.Conv2d
    (the same model and weights, the classes switched between rounds)."""
    from abd_fast.models import PointwiseConv2d
    from abd_fast.precision import resolve_precision
    from bench.step_profile import make_step
    model, step = make_step(64, resolve_precision("auto", "cpu"))
    pointwise = [m for m in model.modules() if type(m) is PointwiseConv2d]

    def run(cls):
        def go():
            for m in pointwise:
                m.__class__ = cls
            for _ in range(steps):
                step()
        return go
    t = timeit_interleaved({"conv": run(torch.nn.Conv2d), "matmul": run(PointwiseConv2d)},
                           reps=reps)
    for m in pointwise:
        m.__class__ = PointwiseConv2d
    return {"steps_per_call": steps, "conv_ms": t["conv"]["ms"] / steps,
            "matmul_ms": t["matmul"]["ms"] / steps, "ratio": t["conv"]["ms"] / t["matmul"]["ms"],
            "pointwise_layers": len(pointwise)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--step-reps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench/results/pointwise.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = {}
    for tower, size, batch in (("abd-tiny-rn", 32, 64), ("RN50", 224, 16)):
        layers[tower] = [layer_times(s, args.reps) for s in pointwise_shapes(tower, size, batch)]
        rows = [{**r["shape"], "conv": f"{r['conv_ms']:.2f}", "matmul": f"{r['matmul_ms']:.2f}",
                 "ratio": f"{r['ratio']:.2f}"} for r in layers[tower]]
        print(f"{tower}: forward + backward per 1x1 convolution, ms")
        print(table(rows, [(k, k) for k in ("batch", "in", "out", "side", "conv", "matmul",
                                             "ratio")]))
        total_conv = sum(r["conv_ms"] for r in layers[tower])
        total_mm = sum(r["matmul_ms"] for r in layers[tower])
        print(f"  all: {total_conv:.1f} ms as convolutions, {total_mm:.1f} as matrix products "
              f"({total_conv / total_mm:.2f}x)")
    step = step_times(args.step_reps, 5)
    print(f"demo step (batch 64): {step['conv_ms']:.1f} ms with convolutions, "
          f"{step['matmul_ms']:.1f} with matrix products ({step['ratio']:.2f}x)")
    write_json(Path(args.out), {"machine": machine(), "threads": args.threads,
                                "layers": layers, "demo_step": step})


if __name__ == "__main__":
    main()
