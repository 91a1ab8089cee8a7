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
