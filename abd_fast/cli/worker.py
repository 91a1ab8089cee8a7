"""A stage worker of `pipeline --jobs N` (abd_fast.cli.stages.WorkerPool): runs
`abd_fast.train` commands one after another in one long-lived process, so a stage does not
pay for a new interpreter and its imports (about 3 s per stage here, bench/stage_startup.py:
a sixth of a UAP candidate of the demo).

Protocol: one JSON list (a command's argv, which names --output) per line on stdin; for each,
one line on the original stdout with the command's exit status. While a command runs, the
process's stdout and stderr (file descriptors 1 and 2: Python's and the C++ libraries'
output) go to <--output>/log.txt, appended. Commands run as the pipeline's in-process stages
do (`--jobs 1` runs every stage in one process), so the numbers are those of one stage at a
time with the same threads (tests/test_pipeline_jobs.py)."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path


def run_logged(main, argv: list[str], log: Path) -> int:
    """main(argv) with file descriptors 1 and 2 sent to `log`; its exit status (a failure's
    traceback goes to the log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse and the commands' own exits
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # noqa: BLE001 - the stage failed; the pipeline says where
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    return int(code or 0)


def serve(commands, replies):
    from abd_fast.cli.stages import stage_log
    from abd_fast.train import main
    for line in commands:
        argv = json.loads(line)
        code = run_logged(main, argv, stage_log(argv))
        replies.write(f"{code}\n")
        replies.flush()


def exit_with_parent(parent: int, every: float = 1.0):
    """Ends this process (SIGTERM) once its parent is gone: a killed pipeline takes its
    workers and their stages with it. (PR_SET_PDEATHSIG would fire when the thread that
    started the worker ends, and stage threads end long before their workers.)"""
    while os.getppid() == parent:
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    serve(sys.stdin, os.fdopen(os.dup(1), "w"))
