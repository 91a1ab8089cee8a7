"""Every training stage runs under bf16 autocast on CPU, the nearest stand-in for a GPU run
we have: pretrain, poison, badclip-trigger, uap and defend with each method, through the
command line with --precision bf16 (abd-tiny-rn: convolutions, BatchNorm, channels-last).
Each stage's losses are finite, and its first step's loss, computed from the same weights
on the same batch, is close to the fp32 run's."""
import json
import shutil
from pathlib import Path

import pytest

from abd_fast.train import main

# bf16 keeps 8 bits of mantissa: a few rounding steps of 2^-8 through a small tower; the
# fp32-vs-bf16 gaps measured here were at most ~0.5% (the UAP loss, whose adversarial terms
# carry a weight of 10-50).
RTOL = 0.03
DEFENSES = ("ft", "cleanclip", "roclip", "abd")


def _losses(path, key="loss"):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{precision: {stage: losses}}: every stage run in fp32, then again in bf16 from the same
    inputs (the fp32 run's checkpoints and UAP), so both first steps see the same weights."""
    from abd_fast.data.synthetic import ensure_dataset
    root = tmp_path_factory.mktemp("precision")
    data = ensure_dataset(root / "data", seed=2, n_train=64, n_eval_per_class=2, image_size=32,
                          per_shard=64)
    common = ["--model", "abd-tiny-rn", "--train-data", data.shards, "--eval-data",
              data.eval_dir, "--batch-size", "16", "--max-samples", "32", "--epochs", "1",
              "--warmup", "1", "--workers", "0", "--loader", "torch", "--no-compile"]
    victim = [*common, "--target-label", "star"]
    inputs = root / "fp32"
    stages = [("pretrain", ["pretrain", *common]),
              ("badclip-trigger", ["badclip-trigger", *common, "--target-label", "star",
                                   "--pretrained", inputs / "pretrain" / "checkpoint.pt",
                                   "--steps", "2", "--target-images", "8"]),
              ("poison", ["poison", *victim, "--pretrained", inputs / "pretrain" / "checkpoint.pt",
                          "--attack", "badnet", "--poison-count", "8"]),
              ("uap", ["uap", *victim, "--checkpoint", inputs / "poison" / "checkpoint.pt",
                       "--reference-model", inputs / "pretrain" / "checkpoint.pt"])]
    for method in DEFENSES:
        stages.append((f"defend-{method}", [
            "defend", *victim, "--checkpoint", inputs / "poison" / "checkpoint.pt",
            "--method", method, *(["--uap", inputs / "uap" / "uap.pt"] if method == "abd" else []),
            *(["--epochs", "2"] if method == "roclip" else [])]))  # its nearest-text epoch
    # Only the losses are kept: a stage's checkpoints go as soon as no later stage reads them
    # (16 stage runs of ~100 MB each, optimizer state included, would otherwise stay on disk
    # until the session ends).
    inputs_read = {a for _, argv in stages for a in argv if isinstance(a, Path)}
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = {}
        for stage, argv in stages:
            d = root / precision / stage
            assert main([str(a) for a in [*argv, "--precision", precision, "--output", d]]) == 0
            out[precision][stage] = _losses(d / ("badclip_losses.jsonl" if stage ==
                                                 "badclip-trigger" else "metrics.jsonl"))
            for f in d.glob("*.pt"):
                if f not in inputs_read:
                    f.unlink()
    shutil.rmtree(root)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "badclip-trigger", "poison", "uap",
                                   *(f"defend-{m}" for m in DEFENSES)])
def test_stage_runs_in_bf16_close_to_fp32(runs, stage):
    fp32, bf16 = runs["fp32"][stage], runs["bf16"][stage]
    assert len(bf16) == len(fp32) >= 2
    assert all(v == v and abs(v) != float("inf") for v in bf16)  # finite
    assert bf16[0] == pytest.approx(fp32[0], rel=RTOL)
    assert bf16[0] != fp32[0]  # it did run in bf16
