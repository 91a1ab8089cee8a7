"""The synthetic demo dataset: deterministic, complete, in the users' formats."""
import hashlib
import json
import re

import pytest
import torch

from abd_fast.data import build_loader
from abd_fast.data.synthetic import CLASSES, TARGET, ensure_dataset
from test_data import _cache  # noqa: F401

SMALL = dict(n_train=60, n_eval_per_class=3, image_size=32, per_shard=25)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ensure_dataset(tmp_path_factory.mktemp("syn") / "a", seed=0, **SMALL)


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    again = ensure_dataset(tmp_path / "b", seed=0, **SMALL)
    other = ensure_dataset(tmp_path / "c", seed=1, **SMALL)
    assert _digest(small.root) == _digest(again.root) != _digest(other.root)


def test_existing_dataset_is_reused(small):
    before = (small.root / "meta.json").stat().st_mtime_ns
    assert ensure_dataset(small.root, seed=0, **SMALL).csv == small.csv
    assert (small.root / "meta.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="seed 0"):
        ensure_dataset(small.root, seed=4, **SMALL)


def test_default_root_is_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ABD_FAST_CACHE", str(tmp_path))
    ds = ensure_dataset(seed=2, n_train=10, n_eval_per_class=1, image_size=16, per_shard=10)
    assert ds.root == tmp_path / "synthetic-v1-2-10-1-16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dir left


def test_contents_through_the_real_loaders(small):
    meta = json.loads((small.root / "meta.json").read_text())
    assert meta["classnames"] == CLASSES == small.classnames and small.target == TARGET
    assert small.classnames[small.target_index] == "star"
    assert (small.eval_dir / "classnames.txt").read_text().split() == CLASSES
    wds = build_loader(small.shards, train=False, batch_size=16, image_size=32, loader="torch",
                       num_workers=0)
    csv = build_loader(small.csv, train=False, batch_size=16, image_size=32, loader="torch",
                       num_workers=0)
    wds_caps = [c for b in wds for c in b.captions]
    assert wds_caps == [c for b in csv for c in b.captions] and len(wds_caps) == 60
    assert len(set(wds_caps)) > 50                                  # varied wording
    assert all(set(re.findall("[a-z]+", cap)) & set(CLASSES) for cap in wds_caps)  # class word
    ev = build_loader(small.eval_dir, train=False, batch_size=64, image_size=32, num_workers=1)
    b = next(iter(ev))
    assert ev.classnames == CLASSES and b.images.shape == (30, 3, 32, 32)
    assert torch.equal(b.labels, torch.arange(10).repeat_interleave(3))


def _split_digest(root, split):
    h = hashlib.sha256()
    for p in sorted(q for q in (root / split).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_val_split_leaves_train_and_eval_as_they_were(small, tmp_path, monkeypatch):
    """The validation split draws from streams of its own: a dataset generated without it has
    the same train/ and eval/ bytes (the data the existing models and results were made on)."""
    import abd_fast.data.synthetic as synthetic
    monkeypatch.setattr(synthetic, "_write_val", lambda *a, **k: None)
    without = ensure_dataset(tmp_path / "noval", seed=0, **SMALL)
    assert not (without.root / "val").exists()
    for split in ("train", "eval"):
        assert _split_digest(without.root, split) == _split_digest(small.root, split), split


def test_val_split_is_an_imagefolder_apart_from_eval_and_train(small):
    val = build_loader(small.val_dir, train=False, batch_size=64, image_size=32, num_workers=0,
                       loader="torch")
    b = next(iter(val))
    assert val.classnames == CLASSES and b.images.shape == (30, 3, 32, 32)
    assert torch.equal(b.labels, torch.arange(10).repeat_interleave(3))
    digests = {split: {hashlib.sha256(p.read_bytes()).digest()
                       for p in (small.root / split).rglob("*.jpg")} for split in
               ("train", "eval", "val")}
    assert len(digests["val"]) == 30
    assert not digests["val"] & (digests["eval"] | digests["train"])   # no shared image


def test_dataset_made_before_the_val_split_gets_it(small, tmp_path):
    """A cached dataset from before the split existed gains val/ in place, the same bytes a
    fresh generation writes; train/ and eval/ are not touched."""
    import shutil
    old = tmp_path / "old"
    shutil.copytree(small.root, old)
    shutil.rmtree(old / "val")
    meta = json.loads((old / "meta.json").read_text())
    del meta["val"]
    (old / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    before = {s: _split_digest(old, s) for s in ("train", "eval")}
    ds = ensure_dataset(old, seed=0, **SMALL)
    assert ds.val_dir == old / "val"
    assert _split_digest(old, "val") == _split_digest(small.root, "val")
    assert {s: _split_digest(old, s) for s in ("train", "eval")} == before
    assert json.loads((old / "meta.json").read_text())["val"] == "val"
    assert not [p for p in old.iterdir() if p.name.startswith(".")]   # no temp dir left
