"""Exact resume: a training stage killed with SIGKILL at a random step and rerun with --resume
ends with the same eval.json as an uninterrupted run (bit-identical on CPU), for poison,
uap and defend. The kill step is drawn from a seeded RNG, so a failure reproduces."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train_cli import small_data  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("ca_top1", "ca_top5", "asr", "n_eval", "n_asr", "embedding_distance")


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "abd_fast.train", *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _run(args):
    p = _cli(args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def _steps_logged(out_dir: Path) -> int:
    try:
        return sum('"loss"' in ln for ln in (out_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _kill_at(args, out_dir: Path, step: int):
    """Starts the stage and SIGKILLs it once `step` optimizer steps are logged and a checkpoint
    is on disk (a periodic one is written by a background thread: until that write ends, the
    run has no checkpoint newer than the one before)."""
    p = _cli(args)
    while _steps_logged(out_dir) < step or not (out_dir / "checkpoint.pt").exists():
        if p.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {p.stdout.read()}")
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def stages(small_data, tmp_path_factory):  # noqa: F811
    """A clean model, a badnet victim and a UAP: the inputs of the resumed stages."""
    base = tmp_path_factory.mktemp("resume")
    common = ["--model", "abd-tiny-vit", "--train-data", small_data.csv, "--eval-data",
              small_data.eval_dir, "--batch-size", "16", "--warmup", "3", "--workers", "0",
              "--loader", "torch", "--seed", "3"]
    _run(["pretrain", *common, "--epochs", "1", "--output", base / "clean"])
    poison = ["poison", *common, "--epochs", "3", "--checkpoint-every", "4", "--pretrained",
              base / "clean" / "checkpoint.pt", "--attack", "badnet", "--target-label", "star",
              "--poison-count", "16"]
    _run([*poison, "--output", base / "victim"])
    victim = base / "victim" / "checkpoint.pt"
    uap = ["uap", *common, "--epochs", "3", "--checkpoint-every", "4", "--checkpoint", victim,
           "--reference-model", base / "clean" / "checkpoint.pt"]
    _run([*uap, "--output", base / "uap"])
    defend = ["defend", *common, "--epochs", "3", "--checkpoint-every", "4", "--method", "abd",
              "--checkpoint", victim, "--uap", base / "uap" / "uap.pt"]
    # The same poisoning decoded by the DALI engine (the default where it builds).
    dali = [a if a != "torch" else "dali" for a in poison]
    yield {"poison": (poison, base / "victim"), "uap": (uap, base / "uap"),
           "defend": (defend, None), "poison-dali": (dali, None)}
    shutil.rmtree(base)  # three checkpoints: not kept to the session's end


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["poison", "uap", "defend", "poison-dali"])
def test_sigkill_then_resume_gives_the_same_result(stages, tmp_path, stage):
    args, reference = stages[stage]
    if reference is None:  # run the uninterrupted reference here
        reference = tmp_path / "straight"
        _run([*args, "--output", reference])
    total = 3 * (160 // 16)
    step = random.Random(f"{stage}-kill").randint(5, total - 2)  # after the first checkpoint
    out = tmp_path / "killed"
    _kill_at([*args, "--output", out], out, step)
    assert (out / "checkpoint.pt").exists() and not (out / "eval.json").exists()
    _run([*args, "--output", out, "--resume"])
    want = json.loads((reference / "eval.json").read_text())
    got = json.loads((out / "eval.json").read_text())
    assert {k: got[k] for k in EVAL_KEYS} == {k: want[k] for k in EVAL_KEYS}
    # The step log of the resumed run is the uninterrupted one's.
    losses = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in ln]
    ref = [json.loads(ln)["loss"] for ln in (reference / "metrics.jsonl").read_text()
           .splitlines() if '"loss"' in ln]
    assert losses == ref
