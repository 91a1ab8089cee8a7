"""The token embedding's update by rows (abd_fast.engine.SparseRowAdamW with a sparse
gradient) against the dense one (the fused AdamW over the whole 49408 x 128 table and its
dense gradient), on the demo's fine-tuning step (bench/step_profile.py's: abd-tiny-rn, 32 px,
batch 64, forward + backward of a CLIP loss and the optimizer step, --precision auto's
arithmetic): one model, its step with either optimizer (the embedding's gradient switched with
it) timed in alternation in one process (bench.common.timeit_interleaved):

- demo: the same batch of ~800 distinct tokens at every step (the demo's captions use about
  a hundred rows, EDA's synonyms a few more);
- every row: new random tokens over the whole vocabulary at every step, after enough steps
  that every row has had a gradient: the worst case, a corpus that uses the whole vocabulary.

    flock /tmp/abd_cpu.lock .venv/bin/python bench/sparse_rows.py    # -> bench/results/sparse_rows.json

One torch thread by default, as in a demo slot (--threads). Ratios are dense ms over sparse ms.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine, timeit_interleaved, write_json  # noqa: E402


def step_times(fresh_tokens: bool, reps: int, steps: int, warmup_steps: int) -> dict:
    """One model (two models in one process ran at different speeds whatever their
    optimizer), its step timed with either optimizer in alternation, the embedding's
    gradient switched with it."""
    from abd_fast.engine import make_optimizer
    from abd_fast.precision import resolve_precision
    from bench.step_profile import make_step
    precision = resolve_precision("auto", "cpu")
    model, step = make_step(64, precision, fresh_tokens=fresh_tokens)
    optimizers = {"dense": step.optimizer, "sparse": make_optimizer(model, 1e-4, sparse_rows=True)}

    def run(name):
        def go():
            model.token_embedding.sparse = name == "sparse"
            for _ in range(steps):
                step(optimizers[name])
        return go
    runs = {name: run(name) for name in optimizers}
    for _ in range(warmup_steps):
        runs["sparse"]()
    t = timeit_interleaved(runs, reps=reps)
    return {"precision": precision, "steps_per_call": steps,
            "dense_ms": t["dense"]["ms"] / steps, "sparse_ms": t["sparse"]["ms"] / steps,
            "ratio": t["dense"]["ms"] / t["sparse"]["ms"],
            "rows_updated": len(optimizers["sparse"].rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench/results/sparse_rows.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = {}
    for name, fresh, warmup in (("demo", False, 1), ("every row", True, 16)):
        r = out[name] = step_times(fresh, args.reps, 5, warmup)
        print(f"{name}: {r['dense_ms']:.1f} ms per step dense, {r['sparse_ms']:.1f} by rows "
              f"({r['ratio']:.2f}x; {r['precision']}; {r['rows_updated']} rows with a gradient)")
    write_json(Path(args.out), {"machine": machine(), "threads": args.threads, "steps": out})


if __name__ == "__main__":
    main()
