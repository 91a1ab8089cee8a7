"""What a parallel stage pays to start: the same short stage (a demo run's `floor-badnet`: an
`eval` of the clean model under the badnet trigger, about a second of work) run K times
one after another with 1 torch thread (what `pipeline --jobs 2` gives a stage on 2 cores),

  process  each in a new `python -m abd_fast.train` process (the pipeline's stage runner
           before the worker pool)
  worker   all in one worker of abd_fast.cli.stages.WorkerPool, new each round (the
           runner now: one start-up per worker, not per stage)

in alternation (A B B A ...). Reported: seconds per stage per path (median over rounds) and
the difference, the start-up a worker saves each stage. Needs a demo run
(`python -m abd_fast.train` first):

    flock /tmp/abd_cpu.lock .venv/bin/python bench/stage_startup.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abd_fast.cli.stages import WorkerPool, stage_log  # noqa: E402
from bench.common import ROOT, machine  # noqa: E402


def stage_argv(run: Path, stage: str = "floor-badnet") -> list[str]:
    """The demo's stage flags (run/<stage>/stage.json), without its --output."""
    meta = run / stage / "stage.json"
    if not meta.is_file():
        raise SystemExit(f"error: {meta} not found: run the demo first (python -m "
                         f"abd_fast.train --output {run}) or give --run")
    argv = json.loads(meta.read_text())["argv"]
    if "--output" in argv:
        k = argv.index("--output")
        argv = argv[:k] + argv[k + 2:]
    return argv


def in_processes(cmds) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for cmd in cmds:
        log = stage_log(cmd)
        with open(log, "ab") as f:
            if subprocess.run([sys.executable, "-m", "abd_fast.train", *cmd], env=env,
                              stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"error: the stage failed; see {log}")


def in_worker(cmds) -> None:
    pool = WorkerPool(threads=1, size=1)
    try:
        for cmd in cmds:
            if pool(cmd):
                raise SystemExit(f"error: the stage failed; see {cmd[-1]}/log.txt")
    finally:
        pool.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo",
                    help="a demo run directory (its floor-badnet stage's flags)")
    ap.add_argument("--stages", type=int, default=6, help="stages per round")
    ap.add_argument("--repeats", type=int, default=2, help="rounds per path (A B B A ...)")
    ap.add_argument("--output", type=Path,
                    default=ROOT / "bench" / "results" / "stage_startup.json")
    args = ap.parse_args()
    argv = stage_argv(args.run.resolve())
    os.chdir(ROOT)  # the stage's flags name paths relative to the checkout
    paths = {"process": in_processes, "worker": in_worker}
    order = []
    for r in range(args.repeats):
        order += ["process", "worker"] if r % 2 == 0 else ["worker", "process"]
    per_stage = {p: [] for p in paths}
    with tempfile.TemporaryDirectory() as tmp:
        for path in order:
            outs = [Path(tempfile.mkdtemp(dir=tmp)) for _ in range(args.stages)]
            t0 = time.perf_counter()
            paths[path]([*argv, "--output", str(out)] for out in outs)
            per_stage[path].append((time.perf_counter() - t0) / args.stages)
            print(f"{path}: {per_stage[path][-1]:.2f} s per stage", flush=True)
    med = {p: statistics.median(v) for p, v in per_stage.items()}
    saved = med["process"] - med["worker"]
    print(f"{args.stages} x {' '.join(argv[:1])} (floor-badnet), 1 thread: a new process "
          f"{med['process']:.2f} s per stage, a worker {med['worker']:.2f} s: {saved:.2f} s "
          "saved per stage")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "machine": machine(), "argv": argv, "stages": args.stages, "order": order,
        "seconds_per_stage": per_stage, "median": med, "saved_per_stage": saved},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
