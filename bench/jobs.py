"""Stages side by side (`pipeline --jobs N`) against one at a time: the same `defend` stage
(ABD, the demo's paper budget cut to --steps optimizer steps, its evaluation included) run
N times through the pipeline's worker processes (abd_fast.cli.stages.WorkerPool, new each
round; bench/results/jobs.json was measured with a new process per stage, before the pool),

  sequential  one after the other, each with all of torch's threads (what --jobs 1 gives a
              stage: the pipeline's in-process default)
  parallel    N at once, each with 1/N of the threads (what --jobs N gives each stage)

in alternation (A B B A ...), so a slow phase of the shared machine hits both alike.
Reported: the wall seconds of each round, the median per path, and the throughput ratio
sequential / parallel (> 1: side by side gets more stages done per second). Needs a demo
run's badnet victim and UAP (`python -m abd_fast.train` first):

    flock /tmp/abd_cpu.lock .venv/bin/python bench/jobs.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from abd_fast.cli.stages import WorkerPool  # noqa: E402
from bench.common import ROOT, machine  # noqa: E402


def stage_argv(run: Path, steps: int) -> list[str]:
    """The demo's badnet ABD stage (its flags from run/badnet-abd/stage.json), cut to
    `steps` optimizer steps."""
    meta = run / "badnet-abd" / "stage.json"
    if not meta.is_file():
        raise SystemExit(f"error: {meta} not found: run the demo first (python -m "
                         f"abd_fast.train --output {run}) or give --run")
    argv = json.loads(meta.read_text())["argv"]
    return [*argv, "--budget-steps", str(steps)]


def run_round(argv, copies: int, threads: int, parallel: bool, tmp: Path) -> float:
    """Wall seconds of `copies` runs of argv, each through the pipeline's own stage runner
    (abd_fast.cli.stages.WorkerPool of `copies` workers with `threads` threads, new each
    round): at once or one after the other."""
    run = WorkerPool(threads, copies)
    outs = [Path(tempfile.mkdtemp(dir=tmp)) for _ in range(copies)]
    cmds = [[*argv, "--output", str(out)] for out in outs]
    t0 = time.perf_counter()
    try:
        if parallel:
            with ThreadPoolExecutor(copies) as pool:
                codes = list(pool.map(run, cmds))
        else:
            codes = [run(cmd) for cmd in cmds]
        seconds = time.perf_counter() - t0
    finally:
        run.close()
    for code, out in zip(codes, outs):
        if code != 0:
            tail = (out / "log.txt").read_text()[-2000:]
            raise SystemExit(f"error: the stage failed (exit status {code}):\n{tail}")
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo",
                    help="a demo run directory (its badnet-abd stage's flags)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per stage")
    ap.add_argument("--repeats", type=int, default=2, help="rounds per path (A B B A ...)")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "jobs.json")
    args = ap.parse_args()
    argv = stage_argv(args.run.resolve(), args.steps)
    os.chdir(ROOT)  # the stage's flags name paths relative to the checkout
    threads = torch.get_num_threads()
    split = max(1, threads // args.jobs)
    rounds = {"sequential": [], "parallel": []}
    order = []
    for r in range(args.repeats):
        order += ["sequential", "parallel"] if r % 2 == 0 else ["parallel", "sequential"]
    with tempfile.TemporaryDirectory() as tmp:
        for path in order:
            par = path == "parallel"
            s = run_round(argv, args.jobs, split if par else threads, par, Path(tmp))
            rounds[path].append(s)
            print(f"{path}: {args.jobs} stages in {s:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    ratio = med["sequential"] / med["parallel"]
    paired = [a / b for a, b in zip(rounds["sequential"], rounds["parallel"])]
    print(f"{args.jobs} x defend abd ({args.steps} steps + eval): one at a time with {threads} "
          f"threads {med['sequential']:.1f} s, {args.jobs} at once with {split} each "
          f"{med['parallel']:.1f} s: {ratio:.2f}x the stages per second "
          f"(paired {', '.join(f'{p:.2f}' for p in paired)})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": machine(), "argv": argv, "jobs": args.jobs, "steps": args.steps,
        "threads": {"sequential": threads, "parallel": split}, "order": order,
        "seconds": rounds, "median": med, "ratio": ratio, "paired": paired}, indent=1) + "\n")


if __name__ == "__main__":
    main()
