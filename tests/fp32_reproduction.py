"""A small run of the training commands whose fp32 results must not change: pretrain, poison,
then defend with every method, on a tiny synthetic dataset (abd-tiny-rn, 32 px, batch 16).

`--precision fp32 --no-compile` must reproduce what the commands computed before those flags
existed, bit for bit. tests/data/fp32_reproduction.json holds that run's results computed by
the code before the change (commit 258c670), one entry per kind of machine (fp32 results
depend on the CPU's vector units, the thread count and torch's version). Make an entry on
a new kind of machine by running this file with a checkout of that commit first on the
path (its extension built):

    git archive 258c670 | tar -x -C /tmp/old && cp abd_fast/_C*.so /tmp/old/abd_fast/
    cd /tmp/old && python /path/to/tests/fp32_reproduction.py --record /path/to/tests/data/fp32_reproduction.json

tests/test_fp32_reproduction.py runs it with the current code and compares.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

COMMIT = "258c670"
DEFENSES = ("ft", "cleanclip", "roclip", "abd")


def machine_key() -> str:
    """What fp32 results depend on: torch's CPU tier, threads, torch version."""
    import torch
    return (f"{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}threads-"
            f"torch{torch.__version__.split('+')[0]}")


def _record(out: Path, stage: str) -> dict:
    lines = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((out / stage / "eval.json").read_text())
    return {"losses": [r["loss"] for r in lines if "loss" in r], "ca": ev["ca_top1"],
            "asr": ev.get("asr"), "embedding_distance": ev.get("embedding_distance")}


def run(out: Path, flags: list[str]) -> dict:
    """The stages into `out`; flags: added to every training command (the new code's
    `--precision fp32 --no-compile`; none for the old code). Returns {stage: results}."""
    import torch

    from abd_fast.data.synthetic import ensure_dataset
    from abd_fast.defenses.uap import UAP, UAPGenerator, patch_geometry
    from abd_fast.train import main
    data = ensure_dataset(out / "data", seed=3, n_train=64, n_eval_per_class=2, image_size=32,
                          per_shard=64)
    common = ["--model", "abd-tiny-rn", "--train-data", data.shards, "--eval-data",
              str(data.eval_dir), "--batch-size", "16", "--epochs", "2", "--warmup", "2",
              "--workers", "0", "--loader", "torch", "--seed", "1", *flags]
    assert main(["pretrain", *common, "--output", out / "pretrain"]) == 0
    assert main(["poison", *common, "--pretrained", out / "pretrain" / "checkpoint.pt",
                 "--attack", "badnet", "--target-label", "star", "--poison-count", "16",
                 "--lr", "1e-3",  # poison's default then (now 1.5e-3, docs/ATTACKS.md)
                 "--output", out / "poison"]) == 0
    side = patch_geometry(32)[0]  # a UAP from an untrained generator: the uap stage is apart
    with torch.no_grad():
        UAP(UAPGenerator(side, seed=7)(), mode="patch", image_size=32).save(out / "uap.pt")
    for method in DEFENSES:
        assert main(["defend", *common, "--checkpoint", out / "poison" / "checkpoint.pt",
                     "--method", method, *(["--uap", out / "uap.pt"] if method == "abd" else []),
                     "--output", out / f"defend-{method}"]) == 0
    return {s: _record(out, s) for s in ["pretrain", "poison",
                                         *(f"defend-{m}" for m in DEFENSES)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", metavar="JSON", required=True,
                    help="add this machine's entry (from the code first on the path) to JSON")
    args = ap.parse_args()
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import abd_fast
    print(f"recording the results of {Path(abd_fast.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(Path(tmp), [])
    path = Path(args.record)
    table = json.loads(path.read_text()) if path.exists() else {"commit": COMMIT, "runs": {}}
    table["runs"][machine_key()] = results
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{machine_key()} -> {path}")


if __name__ == "__main__":
    main()
