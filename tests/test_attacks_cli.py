"""The attack commands (show-triggers, export-poison, badclip-trigger) end to end, small."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from abd_fast.attacks import load_patch, make_trigger
from abd_fast.data import build_loader


def run(*argv):
    """Through train.py's real command line (its common flags and defaults)."""
    from abd_fast.train import main
    return main([str(a) for a in argv])


@pytest.fixture
def caption_csv(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(rng.integers(1, 256, (41, 47, 3), dtype=np.uint8)).save(
            tmp_path / "data" / f"{i}.png")
        rows.append((f"{i}.png", "a banana on a plate" if i % 3 == 0 else f"a red car {i}"))
    with open(tmp_path / "data" / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption")] + rows)
    return tmp_path / "data" / "pairs.csv"


def test_show_triggers(tmp_path):
    assert run("show-triggers", "--output", tmp_path, "--image-size", 32, "--n-images", 2) == 0
    grid = np.asarray(Image.open(tmp_path / "triggers.png"))
    tile, pad, head = 128, 4, 18
    assert grid.shape == (head + 2 * (tile + pad) + pad, 7 * (tile + pad) + pad, 3)
    def cell(r, c):
        top, left = head + pad + r * (tile + pad), pad + c * (tile + pad)
        return grid[top:top + tile, left:left + tile].astype(int)
    for r in range(2):
        assert cell(r, 0).std() > 5                                      # an image is there
        for c in range(1, 7):                                            # each trigger shows
            assert np.abs(cell(r, c) - cell(r, 0)).max() > 0, (r, c)


def test_export_poison(tmp_path, caption_csv):
    out = tmp_path / "out"
    assert run("export-poison", "--train-data", caption_csv, "--attack", "badnet",
               "--poison-count", 4, "--target-label", "banana", "--image-size", 32,
               "--seed", 5, "--output", out) == 0
    meta = json.loads((out / "poison.json").read_text())
    assert meta["count"] == meta["exported"] == 4 and meta["attack"] == "badnet"
    with open(out / "poisoned.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == meta["ids"]
    assert all("banana" in r["caption"] for r in rows)
    clean = {int(b.ids[i]): b.images[i] for b in build_loader(
        caption_csv, train=False, batch_size=12, image_size=32, loader="torch", num_workers=0)
        for i in range(len(b))}
    trig = make_trigger("badnet", image_size=32, seed=5)
    for r in rows:
        i = int(r["id"])
        got = torch.from_numpy(np.array(Image.open(out / r["image"]))).permute(2, 0, 1)
        y, x = (int(v[0]) for v in trig.locations([i]))
        p = trig.patch_size
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y:y + p, x:x + p] = True
        assert torch.equal(got[:, ~inside], clean[i][:, ~inside])      # only the patch changed
        assert not torch.equal(got[:, inside], clean[i][:, inside])


def test_export_poison_errors_name_the_flag(tmp_path, caption_csv):
    with pytest.raises(SystemExit, match="--poison-count asks for 13"):
        run("export-poison", "--train-data", caption_csv, "--attack", "sig", "--poison-count",
            13, "--target-label", "banana", "--image-size", 32, "--output", tmp_path)
    with pytest.raises(SystemExit, match="only 4 usable captions name 'banana'"):
        run("export-poison", "--train-data", caption_csv, "--attack", "label-consistent",
            "--poison-count", 5, "--target-label", "banana", "--image-size", 32,
            "--output", tmp_path)


def test_badclip_trigger_command(tmp_path, caption_csv):
    out = tmp_path / "patch"
    assert run("badclip-trigger", "--train-data", caption_csv, "--target-label", "banana",
               "--model", "abd-tiny-vit", "--batch-size", 4, "--steps", 3, "--output", out,
               "--loader", "torch") == 0
    patch = load_patch(out / "badclip_patch.png")
    assert patch.shape == (3, 8, 8)  # patch_side(32): MIN_PATCH
    assert len((out / "badclip_losses.jsonl").read_text().splitlines()) == 3
    trig = make_trigger("badclip", image_size=32, patch_file=out / "badclip_patch.png")
    assert torch.equal(trig.patch, patch)
