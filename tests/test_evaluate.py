"""Zero-shot evaluation: the template ensemble, and CA/ASR/distance on a hand-made case."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from abd_fast.attacks import make_trigger
from abd_fast.data import Batch
from abd_fast.evaluate import default_tokenizer, evaluate, summary_line, zero_shot_classifier
from abd_fast.models import create_model, get_tokenizer

S, C, TARGET = 13, 7, 2
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
# The hand-made case: 12 constant images, image i has pixel value 10 + 20 i.
LABELS = [0, 1, 2, 3, 4, 5, 6, 2, 0, 1, 3, 4]
CLEAN_RANK = [0, 0, 0, 1, 0, 5, 0, 0, 3, 6, 0, 2]     # rank of the true class in clean scores
TRIGGERED_PRED = [2, 2, 2, 3, 2, 1, 2, 0, 2, 2, 5, 2]
# By hand: top-1 right where rank 0: images 0,1,2,4,6,7,10 -> 7/12. Top-5 right where
# rank < 5: all but images 5 and 9 -> 10/12. ASR: non-target images are all but 2 and 7
# (10); of those, triggered predictions equal to 2: images 0,1,4,6,8,9,11 -> 7/10.
# (Counting the target-class images too would give 8/12.)
EXPECTED = {"ca_top1": 100 * 7 / 12, "ca_top5": 100 * 10 / 12, "asr": 70.0, "n_eval": 12,
            "n_asr": 10}


def clean_scores(i):
    others = [c for c in range(C) if c != LABELS[i]]
    order = others[:CLEAN_RANK[i]] + [LABELS[i]] + others[CLEAN_RANK[i]:]
    s = torch.zeros(C)
    s[torch.tensor(order)] = torch.arange(C, 0, -1, dtype=torch.float32)   # 7, 6, ..., 1
    return s


def triggered_scores(i):
    return 0.1 + F.one_hot(torch.tensor(TRIGGERED_PRED[i]), C).float()


class FakeCLIP(torch.nn.Module):
    """Identifies each image by its top-left pixel and a trigger by the bottom-right pixel
    differing from it; returns the hand-made scores as the image embedding (the classifier
    is the identity, so cosine scores are the normalized scores)."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def encode_image(self, x):
        assert not torch.is_grad_enabled() and not self.training
        v = x[:, 0] * STD[0] + MEAN[0]                                   # un-normalize
        i = ((v[:, 0, 0] * 255).round() - 10) / 20
        triggered = (v[:, -1, -1] - v[:, 0, 0]).abs() > 1e-3
        self.seen.append(len(x))
        return torch.stack([triggered_scores(int(k)) if t else clean_scores(int(k))
                            for k, t in zip(i.round().long().tolist(), triggered.tolist())])


def loader():
    values = torch.tensor([10 + 20 * i for i in range(12)], dtype=torch.uint8)
    images = values[:, None, None, None].expand(12, 3, S, S).contiguous()
    ids, labels = torch.arange(100, 112), torch.tensor(LABELS)
    return [Batch(images[:5], ids[:5], labels=labels[:5]),
            Batch(images[5:], ids[5:], labels=labels[5:])]


def test_hand_made_ca_asr_distance():
    model = FakeCLIP().train()
    trigger = make_trigger("badnet", image_size=S, seed=0, patch_content="fixed",
                           location="corner", patch_size=3)
    out = evaluate(model, loader(), classnames=[f"c{k}" for k in range(C)], trigger=trigger,
                   target_index=TARGET, mean=MEAN, std=STD, classifier=torch.eye(C))
    for k, v in EXPECTED.items():
        assert out[k] == pytest.approx(v, abs=1e-9), k
    d = np.mean([2 - 2 * float(F.cosine_similarity(clean_scores(i), triggered_scores(i), dim=0))
                 for i in range(12)])
    assert out["embedding_distance"] == pytest.approx(d, rel=1e-6)
    assert model.seen == [10, 14]      # one forward per batch: clean and triggered together
    assert model.training              # mode restored
    assert "ASR 70.00% (10 non-target images)" in summary_line(out)

    clean_only = evaluate(model, loader(), classnames=[f"c{k}" for k in range(C)], mean=MEAN,
                          std=STD, classifier=torch.eye(C))
    assert clean_only["asr"] is None and clean_only["embedding_distance"] is None
    assert clean_only["ca_top1"] == out["ca_top1"] and clean_only["ca_top5"] == out["ca_top5"]


def test_capture_is_target_free():
    """capture: per class c, images not of class c sent to c (by hand from TRIGGERED_PRED:
    c2 7/10, c0 1/10 (image 7), c1 1/10 (image 5), c5 1/11 (image 10), c3 0 (image 3 is a 3));
    the largest is c2 at 70%, whichever class the ASR is measured for."""
    names = [f"c{k}" for k in range(C)]
    trigger = make_trigger("badnet", image_size=S, seed=0, patch_content="fixed",
                           location="corner", patch_size=3)
    for target, asr in ((TARGET, 70.0), (0, 10.0)):
        out = evaluate(FakeCLIP(), loader(), classnames=names, trigger=trigger,
                       target_index=target, mean=MEAN, std=STD, classifier=torch.eye(C))
        assert out["asr"] == pytest.approx(asr)
        assert out["capture_class"] == "c2" and out["capture_rate"] == pytest.approx(70.0)
    clean_only = evaluate(FakeCLIP(), loader(), classnames=names, mean=MEAN, std=STD,
                          classifier=torch.eye(C))
    assert clean_only["capture_class"] is None and clean_only["capture_rate"] is None


def test_evaluate_refuses_bad_input():
    names = [f"c{k}" for k in range(C)]
    trigger = make_trigger("sig", image_size=S)
    with pytest.raises(ValueError, match="--target-label"):
        evaluate(FakeCLIP(), loader(), classnames=names, trigger=trigger, mean=MEAN, std=STD,
                 classifier=torch.eye(C))
    unlabeled = [Batch(b.images, b.ids) for b in loader()]
    with pytest.raises(ValueError, match="no labels"):
        evaluate(FakeCLIP(), unlabeled, classnames=names, mean=MEAN, std=STD,
                 classifier=torch.eye(C))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("abd-tiny-vit"), get_tokenizer("abd-tiny-vit")


def test_zero_shot_template_ensemble(tiny):
    model, tokenizer = tiny
    names = ["golden retriever", "star", "tench"]
    got = zero_shot_classifier(model, tokenizer, names, max_texts=100)  # one class per chunk
    # default chunking and default tokenizer (open_clip's at the model's context length)
    torch.testing.assert_close(zero_shot_classifier(model, None, names), got)
    assert default_tokenizer(model) is default_tokenizer(model)   # built once per process
    with torch.no_grad():
        model.eval()
        for c, name in enumerate(names):
            embs = [F.normalize(model.encode_text(tokenizer([t(name)]))[0], dim=0)
                    for t in OPENAI_IMAGENET_TEMPLATES]
            direct = F.normalize(torch.stack(embs).mean(0), dim=0)
            torch.testing.assert_close(got[c], direct, rtol=1e-4, atol=1e-5)
            single = F.normalize(model.encode_text(tokenizer([f"a photo of a {name}."]))[0], dim=0)
            assert not torch.allclose(got[c], single, atol=1e-3)   # it is an ensemble
    assert got.shape == (3, 128) and torch.allclose(got.norm(dim=1), torch.ones(3))


def test_evaluate_real_model_matches_direct_computation(tiny):
    model, tokenizer = tiny
    names = ["circle", "square", "star", "heart", "ring", "cross"]
    images = torch.randint(1, 256, (9, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 2, 1, 0])
    batches = [Batch(images[:4], torch.arange(4), labels=labels[:4]),
               Batch(images[4:], torch.arange(4, 9), labels=labels[4:])]
    trigger = make_trigger("blended", image_size=32, seed=3)
    out = evaluate(model, batches, classnames=names, trigger=trigger, target_index=2,
                   mean=MEAN, std=STD, tokenizer=tokenizer)
    classifier = zero_shot_classifier(model, tokenizer, names)
    with torch.no_grad():
        def norm(x):
            return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        x = images.float() / 255
        clean = F.normalize(model.encode_image(norm(x)), dim=-1)
        trig = F.normalize(model.encode_image(norm((0.8 * x + 0.2 * trigger.pattern).clamp(0, 1))),
                           dim=-1)
    pred = (clean @ classifier.T).argmax(1)
    pred_t = (trig @ classifier.T).argmax(1)
    keep = labels != 2
    assert out["ca_top1"] == pytest.approx(100 * (pred == labels).float().mean().item())
    top5 = (clean @ classifier.T).topk(5, 1).indices
    assert out["ca_top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())
    assert out["asr"] == pytest.approx(100 * (pred_t[keep] == 2).float().mean().item())
    assert out["n_asr"] == 7 and out["n_eval"] == 9
    assert out["embedding_distance"] == pytest.approx((2 - 2 * (clean * trig).sum(1)).mean().item(),
                                                      rel=1e-4)


def test_similarity_analysis_matches_direct_computation(tiny):
    from abd_fast.defenses.uap import UAP, UAPGenerator, patch_geometry
    from abd_fast.evaluate import similarity_analysis
    model, tokenizer = tiny
    images = torch.randint(1, 256, (7, 3, 32, 32), dtype=torch.uint8)
    captions = ["a red star", "a blue heart on white", "a small ring", "a green cross",
                "a big circle", "a yellow square", "a purple diamond"]
    batches = [Batch(images[:3], torch.arange(3), captions=captions[:3]),
               Batch(images[3:], torch.arange(3, 7), captions=captions[3:])]
    trigger = make_trigger("badnet", image_size=32, seed=1)
    side, _ = patch_geometry(32)
    uap = UAP(UAPGenerator(side, seed=2)().detach(), mode="patch", image_size=32)
    out = similarity_analysis(model, batches, target="star", trigger=trigger, uap=uap,
                              mean=MEAN, std=STD, tokenizer=tokenizer)
    with torch.no_grad():
        model.eval()
        img = lambda x: F.normalize(model.encode_image(x), dim=-1)  # noqa: E731
        txt = lambda t: F.normalize(model.encode_text(tokenizer(t)), dim=-1)  # noqa: E731
        backdoor = txt([t("star") for t in OPENAI_IMAGENET_TEMPLATES])
        want = {k: 0.0 for k in ("clean_own_caption", "triggered_backdoor_caption", "adversarial_own_caption",
                                 "adversarial_backdoor_caption", "adversarial_unrelated_caption")}
        for b in batches:
            own = txt(b.captions)
            clean = img(trigger.apply(b.images, b.ids, rows=torch.zeros(len(b), dtype=torch.bool),
                                      mean=MEAN, std=STD))
            trig = img(trigger.apply(b.images, b.ids, mean=MEAN, std=STD))
            adv = img(uap.apply(b.images, b.ids, mean=MEAN, std=STD))
            want["clean_own_caption"] += (clean * own).sum().item()
            want["triggered_backdoor_caption"] += (trig @ backdoor.T).mean(1).sum().item()
            want["adversarial_own_caption"] += (adv * own).sum().item()
            want["adversarial_backdoor_caption"] += (adv @ backdoor.T).mean(1).sum().item()
            unrelated = own[[len(b) - 1] + list(range(len(b) - 1))]
            want["adversarial_unrelated_caption"] += (adv * unrelated).sum().item()
    for k, v in want.items():
        assert out[k] == pytest.approx(100 * v / 7, rel=1e-4, abs=1e-4), k
    assert out["n_images"] == 7
    only_clean = similarity_analysis(model, batches, target="star", mean=MEAN, std=STD,
                                     tokenizer=tokenizer)
    assert only_clean["clean_own_caption"] == pytest.approx(out["clean_own_caption"])
    assert only_clean["adversarial_own_caption"] is None and only_clean["triggered_backdoor_caption"] is None
