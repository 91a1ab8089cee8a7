"""Named, resumable stages, each a command run in-process (the pipeline's and the ablation
command's runner).

A stage runs `python -m abd_fast.train COMMAND ... --output ROOT/<name>` through the
dispatcher's main (given to Stages: the command line calls itself, the library never does)
or a function of the stage's directory. ROOT/<name>/stage.json records the stage's argv and
whether it completed; a stage done before with the same argv and outputs is skipped, and an
interrupted training stage resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

# Training stages checkpoint this often unless their flags say otherwise (≈ 22 s of the demo's
# stages on 2 CPU cores; 0.3 s per checkpoint of the tiny model with its optimizer state,
# 145 MB; 48 MB once the stage has finished and its checkpoint is stripped). Not part of a
# stage's identity: a resumed run is bit-identical.
STAGE_CHECKPOINT_STEPS = 100
TRAINING_COMMANDS = ("pretrain", "poison", "uap", "defend")


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its directory."""


def clock(s: float) -> str:
    """Seconds as m:ss."""
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


class Stages:
    """Runs named stages into root/<name>/ and skips those already done with the same flags.

    run_command(argv) -> exit status: runs one command in-process (the dispatcher's main).
    plan: {stage name: estimated cost} (any unit) for the progress line's ETA, which scales
    the measured seconds per cost unit of the stages run so far."""

    def __init__(self, root: Path, plan: dict, run_command, log=print):
        self.root, self.plan, self.run_command, self.log = Path(root), dict(plan), run_command, log
        self.k, self.t0 = 0, time.perf_counter()
        self.work_s = self.work_cost = 0.0
        self.timing, self.skipped = {}, []

    def _line(self, name, status, current: bool = False):
        """`[stage k/N] name: status | elapsed m:ss | ETA m:ss` (current: the stage is
        still to run, so its cost counts in the ETA)."""
        elapsed = time.perf_counter() - self.t0
        left = sum(c for n, c in list(self.plan.items())[self.k - current:])
        eta = ("ETA 0:00" if not left else f"ETA {clock(left * self.work_s / self.work_cost)}"
               if self.work_cost else "ETA ?")
        self.log(f"[stage {self.k}/{len(self.plan)}] {name}: {status} | elapsed "
                 f"{clock(elapsed)} | {eta}", flush=True)

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
            force: bool = False) -> Path:
        """Runs `python -m abd_fast.train *argv --output root/name` in-process (or fn(dir)
        when given), unless done before with the same argv (and not force). Returns the
        stage's directory."""
        argv = [str(a) for a in argv]
        d = self.root / name
        self.k += 1
        if not force and self.done(name, argv, outputs):
            return self._skip(name)
        self._line(name, "running", current=True)
        resume = self._prepare(name, argv)
        t0 = time.perf_counter()
        if fn is not None:
            fn(d)
        else:
            self._run_command(name, argv, resume)
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

    def _run_command(self, name, argv, resume):
        d = self.root / name
        every = (["--checkpoint-every", str(STAGE_CHECKPOINT_STEPS)]
                 if argv[0] in TRAINING_COMMANDS and "--checkpoint-every" not in argv else [])
        cmd = [*argv, *every, "--output", str(d), *resume]
        self.log(f"  python -m abd_fast.train {' '.join(cmd)}", flush=True)
        code = self.run_command(cmd)
        if code != 0:
            raise StageError(f"stage {name} failed (exit status {code}); its output is in "
                             f"{d}; fix the cause and re-run: completed stages are kept")

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
        self.timing[name] = seconds
        self.work_s += seconds
        self.work_cost += self.plan.get(name, 0)
        self._line(name, f"finished in {seconds:.0f} s")
