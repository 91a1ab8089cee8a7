"""Issue 4's must-show, on a small configuration: from a clean tiny CLIP trained here on part
of the embedded synthetic dataset, `badnet` and `blended` victims reach ASR >= 90% while
their zero-shot CA stays within 3 points of the clean model they were poisoned from.

Every number is measured in the test (nothing is stored); docs/ATTACKS.md has the full-size
runs. The small configuration: the first N_PAIRS pairs of the 10,000, the tiny ResNet at
32 px, the full 1,000-image eval split (ASR over its 900 non-"star" images)."""
import json
from pathlib import Path

import pytest

from abd_fast.data.synthetic import ensure_dataset
from abd_fast.train import main

N_PAIRS = 5000                 # training pairs (of 10,000)
PRETRAIN = ["--epochs", "10", "--lr", "2e-3", "--warmup", "30"]
POISON = {                      # per attack: poison count (rate = count / N_PAIRS) and recipe
    "badnet": ["--poison-count", "750", "--epochs", "4", "--lr", "1e-3", "--warmup", "20"],
    "blended": ["--poison-count", "750", "--epochs", "4", "--lr", "1e-3", "--warmup", "20"],
}


def _run(argv, out: Path) -> dict:
    code = main([str(a) for a in argv] + ["--output", str(out)])
    assert code == 0, f"{argv[0]} exited with {code}"
    return json.loads((out / "eval.json").read_text())


@pytest.mark.slow
def test_badnet_and_blended_victims_keep_ca_and_reach_asr(tmp_path):
    data = ensure_dataset(seed=0)  # the embedded dataset (cached after the first build)
    rows = data.csv.read_text().splitlines()
    assert rows[0] == "image,caption" and len(rows) > N_PAIRS
    subset = tmp_path / "pairs.csv"  # absolute image paths: the CSV lives elsewhere
    subset.write_text("\n".join([rows[0]] + [f"{data.csv.parent / r}" for r in
                                             rows[1:N_PAIRS + 1]]) + "\n")
    common = ["--model", "abd-tiny-rn", "--train-data", subset, "--eval-data", data.eval_dir,
              "--batch-size", "128", "--seed", "0", "--loader", "torch"]
    clean = _run(["pretrain", *common, *PRETRAIN], tmp_path / "clean")
    assert clean["n_eval"] == 1000
    results = {}
    for attack, recipe in POISON.items():
        results[attack] = _run(["poison", *common, "--pretrained", tmp_path / "clean" /
                                "checkpoint.pt", "--attack", attack, "--target-label",
                                data.target, *recipe], tmp_path / attack)
    report = f"clean CA {clean['ca_top1']:.1f}%; " + "; ".join(
        f"{a}: CA {r['ca_top1']:.1f}% ASR {r['asr']:.1f}%" for a, r in results.items())
    print(report)
    for attack, r in results.items():
        assert r["n_asr"] == 900, report  # the 100 target-class images are excluded
        assert r["asr"] >= 90, report
        assert abs(r["ca_top1"] - clean["ca_top1"]) <= 3, report
