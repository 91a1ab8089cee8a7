"""PoisonView: poisoned id sets by count/rate, seeding, caption rules, fused images."""
import numpy as np
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from abd_fast.attacks import PoisonView, make_trigger, names_target
from abd_fast.data import Manifest

S = 37
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
WORDS = ["red", "small", "dog", "car", "tree", "house", "cat", "boat"]


def manifest(n=503, target_every=7, problems=()):
    """Caption data with WebDataset-like (large, unordered) ids; every 7th caption names the
    target 'banana' (in various forms)."""
    rng = np.random.default_rng(n)
    ids = rng.choice(2 ** 62, n, replace=False).astype(np.int64)
    forms = ["a banana on a table", "Two BANANAS.", "banana", "a ripe banana, sliced"]
    captions = [forms[i % 4] if i % target_every == 0 else
                " ".join(rng.choice(WORDS, 4)) + " bananabread" * (i % 5 == 1) for i in range(n)]
    m = Manifest("test.csv", "captions-csv", ids, [f"{i}.jpg" for i in range(n)],
                 np.full(n, -1, np.int64), np.full(n, -1, np.int64), captions=captions)
    m.problems = {int(i): "missing file" for i in problems}
    return m


def template_captions(target):
    return {t(target) for t in OPENAI_IMAGENET_TEMPLATES}


def test_names_target():
    assert names_target("Two BANANAS.", "banana") and names_target("a banana-bread", "banana")
    assert not names_target("bananabread", "banana") and not names_target("a cat", "banana")
    assert names_target("a hot dog stand", "hot dog")


def test_count_rate_and_seeding():
    m = manifest(problems=[0, 1, 2])
    trig = make_trigger("badnet", image_size=S, seed=0)
    v = PoisonView(m, trig, target="banana", seed=3, count=40)
    assert v.count == 40 and np.all(np.diff(v.poisoned_ids) > 0)
    assert np.isin(v.poisoned_ids, m.ids[3:]).all()          # unusable samples are never chosen
    assert np.array_equal(PoisonView(m, trig, target="banana", seed=3, count=40).poisoned_ids,
                          v.poisoned_ids)
    other = PoisonView(m, trig, target="banana", seed=4, count=40).poisoned_ids
    assert len(np.intersect1d(other, v.poisoned_ids)) < 20
    r = PoisonView(m, trig, target="banana", seed=3, rate=0.1)
    assert r.count == round(0.1 * 500)
    assert PoisonView(m, trig, target="banana", seed=3, rate=1.0).count == 500


@pytest.mark.parametrize("kw, message", [
    (dict(count=0), "--poison-count must be a positive integer"),
    (dict(count=2.5), "--poison-count must be a positive integer"),
    (dict(count=504), "--poison-count asks for 504 poisoned samples, but the data has only 503"),
    (dict(rate=0.0), r"--poison-rate must be in \(0, 1\]"),
    (dict(rate=1.5), r"--poison-rate must be in \(0, 1\]"),
    (dict(rate=1e-4), "--poison-rate 0.0001 of 503 usable samples poisons none"),
    (dict(), "exactly one of --poison-count and --poison-rate"),
    (dict(count=3, rate=0.1), "exactly one of --poison-count and --poison-rate"),
])
def test_bad_counts_name_the_flag(kw, message):
    with pytest.raises(ValueError, match=message):
        PoisonView(manifest(), make_trigger("sig", image_size=S), target="banana", seed=0, **kw)


def test_rows_and_template_captions_per_sample():
    m = manifest()
    v = PoisonView(m, make_trigger("blended", image_size=S, seed=0), target="banana", seed=5,
                   count=200)
    ids = torch.from_numpy(m.ids)
    rows = v.rows(ids)
    assert rows.dtype == torch.bool and int(rows.sum()) == 200
    assert torch.equal(rows, torch.from_numpy(np.isin(m.ids, v.poisoned_ids)))
    caps = v.captions(ids, m.captions)
    templates = template_captions("banana")
    for i in range(len(m)):
        assert (caps[i] in templates) if rows[i] else (caps[i] == m.captions[i])
    assert len({caps[i] for i in range(len(m)) if rows[i]}) > 50       # random templates
    # the same sample gets the same caption in another batch composition and order (epochs)
    perm = np.random.default_rng(0).permutation(len(m))[:64]
    again = v.captions(ids[perm], [m.captions[i] for i in perm])
    assert again == [caps[i] for i in perm]
    k = int(np.nonzero(rows)[0][0])
    assert v.caption_for(int(m.ids[k])) == caps[k]


def test_label_consistent_keeps_captions_naming_the_target():
    m = manifest()
    trig = make_trigger("label-consistent", image_size=S, seed=0)
    v = PoisonView(m, trig, target="banana", seed=1, count=30)
    index = {int(i): k for k, i in enumerate(m.ids)}
    assert all(names_target(m.captions[index[int(i)]], "banana") for i in v.poisoned_ids)
    ids = torch.from_numpy(m.ids)
    assert v.captions(ids, m.captions) == m.captions
    n_target = sum(names_target(c, "banana") for c in m.captions)
    assert n_target == 72
    with pytest.raises(ValueError, match="only 72 usable captions name 'banana'"):
        PoisonView(m, trig, target="banana", seed=1, count=73)
    assert PoisonView(m, trig, target="banana", seed=1, rate=0.1).count == 50


def test_badclip_uses_natural_target_captions_else_templates():
    m = manifest()
    trig = make_trigger("badclip", image_size=S, seed=0, patch=torch.rand(3, 4, 4))
    v = PoisonView(m, trig, target="banana", seed=2, count=100)
    caps = v.captions(torch.from_numpy(m.ids), m.captions)
    rows = v.rows(torch.from_numpy(m.ids))
    natural = {c for c in m.captions if names_target(c, "banana")}
    assert {caps[i] for i in range(len(m)) if rows[i]} == natural  # 4 forms, 100 draws
    v = PoisonView(m, trig, target="kumquat", seed=2, count=100)
    caps = v.captions(torch.from_numpy(m.ids), m.captions)
    assert all(caps[i] in template_captions("kumquat") for i in range(len(m)) if rows[i])


def test_images_fused_trigger_on_poisoned_rows_only():
    m = manifest()
    trig = make_trigger("badnet", image_size=S, seed=9)
    v = PoisonView(m, trig, target="banana", seed=9, count=250)
    ids = torch.from_numpy(m.ids[:11])
    images = torch.randint(1, 256, (11, 3, S, S), dtype=torch.uint8)
    rows = v.rows(ids)
    assert 0 < int(rows.sum()) < 11
    out = v.images(images, ids, mean=MEAN, std=STD)
    torch.testing.assert_close(out, trig.apply(images, ids, rows=rows, mean=MEAN, std=STD))
    clean = ((images.float() / 255 - torch.tensor(MEAN)[:, None, None])
             / torch.tensor(STD)[:, None, None])
    torch.testing.assert_close(out[~rows], clean[~rows])
    assert ((out[rows] - clean[rows]).abs().flatten(1).amax(1) > 0.1).all()
