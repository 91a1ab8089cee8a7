"""`python -m abd_fast.open_clip_train`: open_clip's own trainer with our fused ClipLoss, one
short epoch of the tiny model on a small open_clip-style TSV, in one process and in two gloo
processes under torchrun. Every loss it computes is checked against open_clip's ClipLoss."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).parent
N, BATCH = 40, 8


@pytest.fixture(scope="module")
def tsv(tmp_path_factory):
    """open_clip's CSV layout: filepath<TAB>title, absolute paths, quoted captions."""
    root = tmp_path_factory.mktemp("open_clip_data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        path = root / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)).save(path)
        rows.append([str(path), f'a "{["red", "green"][i % 2]}" shape,\tnumber {i}'])
    with open(root / "train.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    return root / "train.tsv"


def _flags(tsv, name, *extra):
    return ["--train-data", str(tsv), "--dataset-type", "csv", "--model", "abd-tiny-rn",
            "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0", "--lr", "1e-3",
            "--warmup", "2", "--precision", "fp32", "--device", "cpu", "--seed", "0",
            "--name", name, *extra]


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _check(tmp_path, name, world_size, local_loss):
    checkpoint = torch.load(tmp_path / "logs" / name / "checkpoints" / "epoch_1.pt",
                            map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and "state_dict" in checkpoint
    steps = N // (BATCH * world_size)   # open_clip's loader drops the last partial batch
    for rank in range(world_size):
        records = json.loads((tmp_path / f"records{rank}.json").read_text())
        assert len(records) == steps, records
        for r in records:
            assert r["loss_class"] == "abd_fast.ops.loss.ClipLoss"
            assert (r["world_size"], r["local_loss"]) == (world_size, local_loss)
            assert r["ours"] == pytest.approx(r["open_clip"], rel=1e-5), r
            assert r["grad_diff"] < 1e-5, r


def test_one_process(tmp_path, tsv):
    _run([sys.executable, str(HERE / "open_clip_train_worker.py"), str(tmp_path / "records"),
          *_flags(tsv, "single")], tmp_path)
    _check(tmp_path, "single", world_size=1, local_loss=False)
    log = (tmp_path / "logs" / "single" / "out.log").read_text()
    assert "Contrastive_loss" in log and "world_size: 1" in log


def test_two_processes_gloo(tmp_path, tsv):
    """open_clip's recommended multi-process setting: --local-loss --gather-with-grad."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(HERE / "open_clip_train_worker.py"), str(tmp_path / "records"),
          *_flags(tsv, "ddp", "--local-loss", "--gather-with-grad")], tmp_path)
    _check(tmp_path, "ddp", world_size=2, local_loss=True)
    assert "world_size: 2" in (tmp_path / "logs" / "ddp" / "out.log").read_text()


def test_the_command_line_entry_point():
    """The command itself (no recorder): it starts, and open_clip's flags are its flags."""
    proc = _run([sys.executable, "-m", "abd_fast.open_clip_train", "--help"], HERE)
    assert "--csv-img-key" in proc.stdout and "--local-loss" in proc.stdout
