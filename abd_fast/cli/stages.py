"""Named, resumable stages, each a command run in-process (the pipeline's and the ablation
command's runner).

A stage runs `python -m abd_fast.train COMMAND ... --output ROOT/<name>` through the
dispatcher's main (given to Stages: the command line calls itself, the library never does)
or a function of the stage's directory. ROOT/<name>/stage.json records the stage's argv and
whether it completed; a stage done before with the same argv and outputs is skipped, and an
interrupted training stage resumes from its last checkpoint.

jobs > 1 (`pipeline --jobs N`): `parallel` runs independent pieces of work in threads, and
up to N stages run at once, each in one of N worker processes (WorkerPool; output in
ROOT/<name>/log.txt) with `threads` torch threads. A stage's thread count is fixed by the
flags, not by what else runs, so a run is reproducible with the same --jobs on the same
machine. Stages run with `alone=True` (the clean model, which every other stage waits for)
stay in-process with every thread. A free job slot goes to the waiting stage of the highest
`priority` (the pipeline's: the longest chain of work still waiting for it), not to the
first that asked.
"""
from __future__ import annotations

import heapq
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# Training stages checkpoint this often unless their flags say otherwise (the tiny model with its
# optimizer state: 145 MB, 48 MB once the stage has finished and its checkpoint is stripped;
# written by a thread while training goes on, Trainer.save_in_background). Not part of a
# stage's identity: a resumed run is bit-identical.
STAGE_CHECKPOINT_STEPS = 100
TRAINING_COMMANDS = ("pretrain", "poison", "uap", "defend")


def stage_log(argv) -> Path:
    """Where the output of a stage command run by a worker goes: <--output>/log.txt."""
    argv = [str(a) for a in argv]
    return Path(argv[argv.index("--output") + 1]) / "log.txt"


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its directory."""


class StageCancelled(StageError):
    """A stage not started because another stage of a parallel run failed first."""


class Slots:
    """Up to n holders at once. A freed slot goes to the waiter of the highest priority (the
    earliest among equals), after `settle` seconds: the stages a finished stage makes ready
    reach the gate within milliseconds, and they compete for the slot it freed."""

    def __init__(self, n: int, settle: float = 0.25):
        self.free, self.settle = int(n), settle
        self._cond, self._waiting, self._asked = threading.Condition(), [], 0
        self._freed_at = -float("inf")

    @contextmanager
    def hold(self, priority: float = 0.0):
        with self._cond:
            self._asked += 1
            me = (-priority, self._asked)
            heapq.heappush(self._waiting, me)
            try:
                while True:
                    wait = self._freed_at + self.settle - time.monotonic()
                    if self.free and self._waiting[0] == me and wait <= 0:
                        break
                    self._cond.wait(timeout=wait if wait > 0 else None)
            finally:  # taken, or interrupted while waiting: out of the queue either way, and
                self._waiting.remove(me)  # the next waiter may take another free slot
                heapq.heapify(self._waiting)
                self._cond.notify_all()
            self.free -= 1
        try:
            yield
        finally:
            with self._cond:
                self.free += 1
                self._freed_at = time.monotonic()
                self._cond.notify_all()


class WorkerPool:
    """The runner of parallel stages: `size` long-lived worker processes
    (abd_fast.cli.worker), each with `threads` torch (OpenMP) threads, started when first
    needed; a command waits for an idle worker, runs there (its output appended to
    <--output>/log.txt) and returns its exit status. A worker that died is replaced, and a
    stage it was running reports a failure; a killed pipeline takes its workers with it
    (abd_fast.cli.worker.exit_with_parent)."""

    def __init__(self, threads: int, size: int):
        self.threads = int(threads)
        self._idle = queue.Queue()
        for _ in range(int(size)):
            self._idle.put(None)  # a slot without a process yet

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads),
                   MKL_NUM_THREADS=str(self.threads))
        return subprocess.Popen([sys.executable, "-m", "abd_fast.cli.worker"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, cmd) -> int:
        cmd = [str(c) for c in cmd]
        worker = self._idle.get()
        try:
            if worker is None or worker.poll() is not None:
                worker = self._start()
            try:
                worker.stdin.write(json.dumps(cmd) + "\n")
                worker.stdin.flush()
                reply = worker.stdout.readline()
            except BrokenPipeError:
                reply = ""
            if reply:
                return int(reply)
            code = worker.wait()  # it died (killed, out of memory)
            with open(stage_log(cmd), "a") as f:
                f.write(f"\nthe stage's worker process died (exit status {code})\n")
            return code or 1
        finally:
            self._idle.put(worker)

    def close(self):
        """Ends the idle workers (end of input: each exits after its command)."""
        while not self._idle.empty():
            worker = self._idle.get()
            if worker is not None:
                worker.stdin.close()
                worker.wait()


def clock(s: float) -> str:
    """Seconds as m:ss."""
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


class Stages:
    """Runs named stages into root/<name>/ and skips those already done with the same flags.

    run_command(argv) -> exit status: runs one command in-process (the dispatcher's main).
    plan: {stage name: estimated cost} (any unit) for the progress line's ETA, which scales
    the measured seconds per cost unit of the stages run so far.
    jobs, spawn: up to `jobs` stages at once, each through spawn(argv) -> exit status
    (a WorkerPool) instead of run_command; see the module's docstring.
    priority: {stage name: number}; a free slot goes to the waiting stage with the largest
    (0 when not given)."""

    def __init__(self, root: Path, plan: dict, run_command, log=print, jobs: int = 1,
                 spawn=None, priority: dict | None = None):
        self.root, self.plan, self.run_command, self.log = Path(root), dict(plan), run_command, log
        self.jobs, self.spawn, self.priority = int(jobs), spawn, dict(priority or {})
        if self.jobs > 1 and spawn is None:
            raise ValueError("jobs > 1 needs spawn, the command runner of parallel stages")
        self._slots = Slots(self.jobs, settle=0.25 if self.jobs > 1 else 0.0)
        self._lock = threading.RLock()
        self.failed = False
        self.k, self.t0 = 0, time.perf_counter()
        self.work_s = self.work_cost = 0.0
        self.timing, self.skipped, self.ended, self.index = {}, [], set(), {}

    def close(self):
        """Ends the worker processes of parallel stages, if any."""
        if isinstance(self.spawn, WorkerPool):
            self.spawn.close()

    def _line(self, name, status):
        """`[stage k/N] name: status | elapsed m:ss | ETA m:ss` (the ETA: the cost of the
        stages not yet ended at the seconds per cost unit so far, over the jobs)."""
        with self._lock:
            elapsed = time.perf_counter() - self.t0
            left = sum(c for n, c in self.plan.items() if n not in self.ended)
            eta = ("ETA 0:00" if not left else
                   f"ETA {clock(left * self.work_s / self.work_cost / self.jobs)}"
                   if self.work_cost else "ETA ?")
            self.log(f"[stage {self.index[name]}/{len(self.plan)}] {name}: {status} | elapsed "
                     f"{clock(elapsed)} | {eta}", flush=True)

    def parallel(self, fn, items) -> list:
        """[fn(item) for item in items]: in order with one job, else each in its own thread
        (their stages share the job slots). After a failure no new stage starts; the running
        ones finish (their work is kept) and the first real error is raised."""
        items = list(items)
        if self.jobs == 1:
            return [fn(item) for item in items]
        results, errors = [None] * len(items), []

        def work(k):
            try:
                results[k] = fn(items[k])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self.failed = True  # (a failure outside a stage, e.g. reading its output)
                errors.append(e)
        threads = [threading.Thread(target=work, args=(k,), daemon=True)
                   for k in range(len(items))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, StageCancelled)), errors[0])
        return results

    def _meta(self, name) -> dict | None:
        try:
            return json.loads((self.root / name / "stage.json").read_text())
        except (OSError, ValueError):
            return None

    def done(self, name, argv, outputs) -> bool:
        """True when root/name completed with these flags, its outputs exist and no input
        changed since (an earlier stage re-ran: its outputs are newer than this stage)."""
        argv = [str(a) for a in argv]
        meta = self._meta(name)
        return (meta is not None and meta.get("argv") == argv and meta.get("complete")
                and all((self.root / name / o).exists() for o in outputs)
                and not self._inputs_changed(name, argv))

    def _inputs_changed(self, name, argv) -> bool:
        """True when a file the argv names (a flag value, comma lists split; for a directory
        the files directly in it) was modified after root/name/stage.json was written."""
        finished = (self.root / name / "stage.json").stat().st_mtime_ns
        for part in (p for a in argv for p in a.split(",") if p):
            try:
                path = Path(part)
                files = [path] if path.is_file() else list(path.iterdir()) if path.is_dir() \
                    else []
                if any(f.is_file() and f.stat().st_mtime_ns > finished for f in files):
                    return True
            except OSError:  # not a path (a name too long, unreadable): not an input
                continue
        return False

    def run(self, name: str, argv: list[str], outputs=("eval.json",), fn=None,
            force: bool = False, alone: bool = False) -> Path:
        """Runs `python -m abd_fast.train *argv --output root/name` in-process (or fn(dir)
        when given; with jobs > 1 in a process of its own unless alone), unless done before
        with the same argv (and not force). Returns the stage's directory."""
        argv = [str(a) for a in argv]
        d = self.root / name
        with self._lock:
            self.k += 1
            self.index[name] = self.k
            if not force and self.done(name, argv, outputs):
                return self._skip(name)
        with self._slots.hold(self.priority.get(name, 0)):
            if self.failed:
                raise StageCancelled(f"stage {name} not started: another stage failed")
            self._line(name, "running")
            resume = self._prepare(name, argv)
            t0 = time.perf_counter()
            try:
                if fn is not None:
                    fn(d)
                else:
                    self._run_command(name, argv, resume, alone)
            except BaseException:
                self.failed = True  # before the slot is free: no stage starts after it
                raise
        missing = [o for o in outputs if not (d / o).exists()]
        if missing:
            raise StageError(f"stage {name} wrote no {', '.join(missing)} in {d}")
        self._finish(name, argv, time.perf_counter() - t0)
        return d

    def _skip(self, name) -> Path:
        seconds = self._meta(name)["seconds"]
        self.timing[name] = seconds
        self.skipped.append(name)
        self.plan[name] = 0
        self.ended.add(name)
        self._line(name, f"done before ({seconds:.0f} s then), skipped")
        return self.root / name

    def _prepare(self, name, argv) -> list[str]:
        """The stage's directory, marked incomplete; ["--resume"] when an interrupted run
        with the same flags left a checkpoint, else a clean directory."""
        from abd_fast.engine import atomic_write_text
        d = self.root / name
        resume = []
        meta = self._meta(name)
        if (meta is not None and meta.get("argv") == argv and not meta.get("complete")
                and (d / "checkpoint.pt").is_file()):
            resume = ["--resume"]
            self.log(f"  resuming {name} from {d / 'checkpoint.pt'}", flush=True)
        if not resume and d.exists():  # another configuration's leftovers
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"argv": argv, "complete": False}) + "\n", d / "stage.json")
        return resume

    def _run_command(self, name, argv, resume, alone: bool = False):
        d = self.root / name
        every = (["--checkpoint-every", str(STAGE_CHECKPOINT_STEPS)]
                 if argv[0] in TRAINING_COMMANDS and "--checkpoint-every" not in argv else [])
        cmd = [*argv, *every, "--output", str(d), *resume]
        own = self.jobs > 1 and not alone
        self.log(f"  python -m abd_fast.train {' '.join(cmd)}"
                 + (f"  (log: {d / 'log.txt'})" if own else ""), flush=True)
        code = (self.spawn if own else self.run_command)(cmd)
        if code != 0:
            where = f"its log is {d / 'log.txt'}" if own else f"its output is in {d}"
            raise StageError(f"stage {name} failed (exit status {code}); {where}; fix the "
                             "cause and re-run: completed stages are kept")

    def _finish(self, name, argv, seconds: float):
        """Marks the stage complete, then strips a training stage's checkpoint to its
        weights and config."""
        from abd_fast import engine
        d = self.root / name
        engine.atomic_write_text(json.dumps({"argv": argv, "complete": True, "seconds": seconds})
                                 + "\n", d / "stage.json")
        if argv[0] in TRAINING_COMMANDS and (d / "checkpoint.pt").is_file():
            try:  # after "complete": a kill never leaves an unresumable checkpoint
                engine.strip_checkpoint(d / "checkpoint.pt")
            except OSError as e:  # only disk space is lost: the full checkpoint is intact
                self.log(f"  kept {name}'s full checkpoint (stripping it failed: {e})",
                         flush=True)
        with self._lock:
            self.timing[name] = seconds
            self.work_s += seconds
            self.work_cost += self.plan.get(name, 0)
            self.ended.add(name)
        self._line(name, f"finished in {seconds:.0f} s")
