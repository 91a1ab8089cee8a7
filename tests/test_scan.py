"""The backdoor scans' library (abd_fast.scan): the per-class UAP search and its verdict on a
model with a planted backdoor and on the same model without it, the statistics, and the data
scan's neighbourhood scores against brute force."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_fast.scan.data import auroc, density_scores, knn, precision_at
from abd_fast.scan.model import (Geometry, arcsine, class_scores, class_search, outlier_z,
                                 perturb, verdict)


# ---- a small encoder with and without a planted backdoor --------------------------------------

class ToyEncoder(nn.Module):
    """encode_image: a fixed random linear map of the 4x4-pooled image (every class about as
    easy to reach with a patch). With `backdoor=(pattern, target_embedding)`, a matched filter
    finds the 8x8 pattern anywhere in the image and adds the target's embedding: a BadNets
    backdoor at a random place, without training."""

    def __init__(self, dim=16, seed=0, backdoor=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(3 * 8 * 8, dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 3 * 8 * 8, generator=g) / 8)
            self.proj.bias.zero_()
        self.backdoor = backdoor

    def encode_image(self, x):
        f = self.proj(F.avg_pool2d(x, 4).flatten(1))
        f = F.normalize(f, dim=-1)
        if self.backdoor is not None:
            pattern, target = self.backdoor
            kernel = (pattern - pattern.mean()) / pattern.norm()
            response = F.conv2d(x, kernel[None]).amax(dim=(1, 2, 3))      # [B]
            f = f + 4 * torch.sigmoid((response - 10) / 2)[:, None] * target
        return f


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(1)
    classifier = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    images = torch.randint(0, 256, (120, 3, 32, 32), generator=g, dtype=torch.uint8)
    # In normalized pixels: the left half bright, the right half dark; it points to class 4.
    pattern = torch.ones(3, 8, 8)
    pattern[:, :, 4:] = -1
    clean = ToyEncoder()
    victim = ToyEncoder(backdoor=(pattern * 2, classifier[4]))
    return clean, victim, classifier, images


def _search(model, toy, **kw):
    _, _, classifier, images = toy
    kw = {"geometries": [Geometry("patch", size=0.25, place="random")], **kw}
    return class_search(model, images, classifier, mean=[0.5] * 3, std=[0.25] * 3, steps=25,
                        batch_size=8, lr=0.2, **kw)


def test_the_verdict_flips_between_a_backdoored_model_and_the_same_model_without(toy):
    clean, victim, classifier, _ = toy
    names = ["a", "b", "c", "d", "e", "f"]
    s_clean, s_victim = _search(clean, toy), _search(victim, toy)
    # Self mode at a threshold of 3: the toy has none of the natural attractors the demo's
    # calibrated self threshold allows for (docs/SCAN.md); reference mode below uses its own.
    v_clean = verdict(s_clean, names, threshold=3)
    v_victim = verdict(s_victim, names, threshold=3)
    assert v_victim["backdoored"] and v_victim["suspected_target"] == "e", v_victim
    assert not v_clean["backdoored"] and v_clean["suspected_target"] is None, v_clean
    assert v_victim["per_class"]["e"] > 70 > max(v for k, v in v_victim["per_class"].items()
                                                   if k != "e")
    # The clean model as reference: the backdoor's perturbation captures on the victim only.
    s_ref = _search(victim, toy, reference=clean, reference_classifier=classifier)
    v_ref = verdict(s_ref, names)
    assert v_ref["mode"] == "reference" and v_ref["suspected_target"] == "e", v_ref
    assert v_ref["reference_capture"]["patch-random-0.25"]["e"] < 20
    # The search left the models as it found them.
    assert all(p.requires_grad for p in victim.parameters()) and victim.training


def test_search_is_seeded_and_its_perturbations_are_in_range(toy):
    clean, victim, classifier, images = toy
    geometries = [Geometry("linf", eps=8 / 255), Geometry.parse("patch-center-0.25")]
    a = class_search(victim, images, classifier, mean=[0.5] * 3, std=[0.25] * 3, steps=3,
                     batch_size=4, classes=[1, 4], geometries=geometries, restarts=2)
    b = class_search(victim, images, classifier, mean=[0.5] * 3, std=[0.25] * 3, steps=3,
                     batch_size=4, classes=[1, 4], geometries=geometries, restarts=2)
    assert torch.equal(a.hits, b.hits)
    assert all(torch.equal(x, y) for x, y in zip(a.deltas, b.deltas))
    assert a.hits.shape == a.counts.shape == (2, 2)
    assert a.deltas[0].shape == (2, 3, 32, 32) and a.deltas[0].abs().max() <= 8 / 255 + 1e-6
    assert a.deltas[1].shape == (2, 3, 8, 8) and 0 <= a.deltas[1].min() <= a.deltas[1].max() <= 1
    # perturb pastes the patch where told and nowhere else
    g, delta = a.uap(1, 0)
    x = perturb(images[:2], g, delta, mean=None, std=None,
                places=(torch.tensor([12, 12]), torch.tensor([12, 12])))
    assert torch.allclose(x[:, :, 12:20, 12:20], delta.expand(2, -1, -1, -1))
    assert torch.allclose(x[:, :, :12], images[:2, :, :12].float() / 255)


def test_search_in_chunks_matches_one_pass(toy):
    """Many classes: the fit step's images go through the model `chunk` at a time, the gradient
    of their mean accumulated: the same search up to the sums' rounding (restarts x classes x
    batch images per step would otherwise all be in one pass)."""
    _, victim, _, _ = toy
    geometries = [Geometry.parse("patch-random-0.25"), Geometry("linf", eps=8 / 255)]
    one, chunked = (_search(victim, toy, geometries=geometries, restarts=2, chunk=c)
                    for c in (256, 20))  # 2 x 6 x 8 = 96 images per step: 1 pass, or 6 of 16
    for a, b in zip(one.deltas, chunked.deltas):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert torch.equal(one.hits, chunked.hits) and torch.equal(one.counts, chunked.counts)


@pytest.mark.parametrize("text, geometry", [
    ("patch-random-0.25", Geometry("patch", size=0.25, place="random")),
    ("patch-center-0.125", Geometry("patch", size=0.125, place="center")),
    ("linf-8/255", Geometry("linf", eps=8 / 255)),
    ("linf-0.03", Geometry("linf", eps=0.03)),
])
def test_geometry_names_parse_back(text, geometry):
    assert Geometry.parse(text) == geometry
    assert Geometry.parse(geometry.name) == geometry


@pytest.mark.parametrize("text, message", [
    ("patch-left-0.25", "place must be one of"), ("patch-random-2", "fraction of the image"),
    ("linf-0", "eps must be in"), ("blob-3", "expected patch-"), ("linf-x/255", "linf-x/255"),
])
def test_bad_geometries_say_what_is_expected(text, message):
    with pytest.raises(ValueError, match=message):
        Geometry.parse(text)


def test_outlier_z_finds_the_outlier_and_discounts_noisy_entries():
    hits = torch.tensor([[5., 6, 4, 5, 200, 7], [0., 0, 0, 3, 0, 0]])
    counts = torch.full_like(hits, 400)
    lo, var = arcsine(hits, counts)
    z = outlier_z(lo, var, floor=0.01)
    assert int(z[0].argmax()) == 4 and z[0, 4] > 5
    # 3 images of 400 against 0 elsewhere: within sampling noise at this count
    assert z[1].max() < 2.5
    # without the variance term the same 3 images would look like an outlier
    assert outlier_z(lo, torch.zeros_like(var), floor=0.01)[1].max() > 2 * z[1].max()


def test_class_scores_with_a_reference_use_the_gap():
    from abd_fast.scan.model import Search
    g = (Geometry("linf", eps=0.03),)
    hits = torch.tensor([[300., 20, 20, 25, 18, 22]])    # class 0: a natural attractor...
    ref = torch.tensor([[290., 19, 21, 24, 2, 20]])      # ...the reference shares; class 4 not
    s = Search(g, list(range(6)), hits, torch.full_like(hits, 400), [None], 32,
               reference_hits=ref)
    z = class_scores(s)
    assert int(z.argmax()) == 4
    assert int(class_scores(Search(g, list(range(6)), hits, s.counts, [None], 32)).argmax()) == 0


# ---- data scan statistics ---------------------------------------------------------------------

def test_knn_matches_brute_force_in_chunks():
    x = torch.randn(37, 5)
    d, i = knn(x, 6, chunk=8)
    full = torch.cdist(x, x)
    full.fill_diagonal_(float("inf"))
    ref_d, ref_i = full.topk(6, dim=1, largest=False)
    assert torch.allclose(d, ref_d, atol=1e-4) and torch.equal(i, ref_i)
    with pytest.raises(ValueError, match="k must be in"):
        knn(x, 37)


def test_density_scores_rank_an_isolated_point_and_a_tight_cluster():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    x[0] = 8.0                                           # isolated
    x[1:11] = 0.01 * torch.randn(10, 4, generator=g) + 3  # tight cluster
    d, i = knn(x, 8)
    s = density_scores(d, i, 8)
    for name in ("kdist", "slof", "dao"):
        assert int(s[name].argmax()) == 0, name
    assert s["kdist"][1:11].max() < s["kdist"][11:].min()


def test_auroc_and_precision_against_pairwise_counts():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 200).astype(float)            # many ties
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(brute)
    assert auroc(np.arange(10), np.arange(10) >= 7) == 1.0
    assert precision_at(np.arange(10), np.arange(10) >= 7, 5) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="one positive and one negative"):
        auroc([1, 2], [True, True])


def test_calibration_size_counts_false_positives_and_detections_per_subset():
    """bench/calibration_size.py: for each k-subset of the clean fine-tunes, the pipeline's
    threshold (max + 1), the others above it (on the applied split when given) and the judged
    models above it; hand-counted on three fine-tunes."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.calibration_size import sizes
    rows = sizes([1.0, 2.0, 0.5], {"v": 2.8}, max_k=5)
    assert [r["k"] for r in rows] == [1, 2]            # at least one fine-tune left out
    # k=1: thresholds 2.0, 3.0, 1.5; others above: none, none, 2.0 of two; v above 2.0 and 1.5
    assert rows[0]["fp_mean"] == pytest.approx(100 / 6) and rows[0]["fp_max"] == 50
    assert rows[0]["flagged_v"] == pytest.approx(200 / 3)
    # k=2: thresholds 3.0, 2.0, 3.0; the one left (0.5, 2.0, 1.0) never strictly above
    assert rows[1]["fp_mean"] == 0 and rows[1]["flagged_v"] == pytest.approx(100 / 3)
    # the thresholds from the first split, the false positives counted on the second
    applied = sizes([1.0, 2.0, 0.5], {}, max_k=1, applied=[1.0, 2.6, 0.5])
    assert applied[0]["fp_mean"] == pytest.approx(100 / 3)   # 2.6 > 2.0 and 2.6 > 1.5
