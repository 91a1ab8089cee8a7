"""Defense building blocks: the UAP generator/discriminator and losses, and the fine-tuning
objectives, each against a direct computation written here (small random batches)."""
import math

import pytest
import torch
import torch.nn.functional as F

from abd_fast.defenses import objectives as obj
from abd_fast.ops import normalize_images
from abd_fast.defenses.uap import (UAP, Discriminator, UAPGenerator, apply_uap, backdoor_loss,
                                   discriminator_loss, generator_loss, patch_geometry,
                                   patch_places, topology_loss, uap_shape)


def unit(n, d=9):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)


def nce_by_hand(q, k, scale):
    """-mean_i log( exp(s q_i.k_i) / sum_j exp(s q_i.k_j) ), term by term."""
    total = 0.0
    for i in range(q.shape[0]):
        logits = [scale * float(q[i] @ k[j]) for j in range(k.shape[0])]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return total / q.shape[0]


# ---- objectives --------------------------------------------------------------------------

def test_mmcl_and_cleanclip_match_hand_computation():
    I, T, Ia, Ta = unit(5), unit(5), unit(5), unit(5)
    s = 7.3
    mm = (nce_by_hand(I, T, s) + nce_by_hand(T, I, s)) / 2
    assert obj.mmcl(I, T, s).item() == pytest.approx(mm, rel=1e-9)
    want = 0.7 * mm + 0.4 * 0.5 * (nce_by_hand(I, Ia, s) + nce_by_hand(T, Ta, s))
    got = obj.cleanclip_objective(I, T, Ia, Ta, s, lambda1=0.7, lambda2=0.4)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_abd_objectives_and_ablation_views():
    I, T, Ia, Te = unit(6), unit(6), unit(6), unit(6)
    s = 11.0
    mm = lambda a, b: (nce_by_hand(a, b, s) + nce_by_hand(b, a, s)) / 2  # noqa: E731
    align = mm(I, T) + 0.5 * (nce_by_hand(I, Ia, s) + nce_by_hand(T, Te, s))
    assert obj.abd_objective(I, T, Ia, Te, s).item() == pytest.approx(align, rel=1e-9)
    assert obj.abd_objective(I, T, Ia, None, s).item() == pytest.approx(
        mm(I, T) + 0.5 * nce_by_hand(I, Ia, s), rel=1e-9)
    assert obj.abd_objective(I, T, None, Te, s).item() == pytest.approx(
        mm(I, T) + 0.5 * nce_by_hand(T, Te, s), rel=1e-9)
    assert obj.abd_objective(I, T, None, None, s).item() == pytest.approx(mm(I, T), rel=1e-9)
    assert obj.abd_objective(I, T, Ia, Te, s, objective="replace").item() == pytest.approx(
        mm(Ia, Te), rel=1e-9)
    assert obj.abd_objective(I, T, None, Te, s, objective="replace").item() == pytest.approx(
        mm(I, Te), rel=1e-9)
    with pytest.raises(ValueError, match="--abd-objective"):
        obj.abd_objective(I, T, Ia, Te, s, objective="mix")


def test_abd_union_is_the_clean_and_the_enhanced_pairs_each_contrasted_in_their_batch():
    """union (the paper's enhanced dataset): λ1·mmcl(I, T) + λ2·mmcl(I_adv, T_eda); the clean
    view stands in for a missing one (ablation)."""
    I, T, Ia, Te = unit(6), unit(6), unit(6), unit(6)
    s = 9.0
    mm = lambda a, b: (nce_by_hand(a, b, s) + nce_by_hand(b, a, s)) / 2  # noqa: E731
    got = obj.abd_objective(I, T, Ia, Te, s, objective="union", lambda1=0.6, lambda2=1.5)
    assert got.item() == pytest.approx(0.6 * mm(I, T) + 1.5 * mm(Ia, Te), rel=1e-9)
    assert obj.abd_objective(I, T, None, Te, s, objective="union").item() == pytest.approx(
        mm(I, T) + mm(I, Te), rel=1e-9)
    # Not one batch of 2N pairs: that would make (I_adv_i, T_i) a negative.
    two_n = obj.mmcl(torch.cat([I, Ia]), torch.cat([T, Te]), s).item()
    assert got.item() != pytest.approx(two_n, rel=1e-3)


def test_roclip_bank_fifo_and_nearest_neighbour():
    bank = obj.TextBank(size=4, dim=3)
    with pytest.raises(RuntimeError, match="empty"):
        bank.nearest(unit(2, 3).float())
    e = torch.eye(3)
    bank.update(torch.stack([e[0], e[1]]) * 2.0)          # stored normalized
    bank.update(torch.stack([e[2], -e[0], -e[1]]))         # wraps: overwrites slot 0
    assert bank.count == 4 and bank.next == 1
    assert torch.equal(bank.features, torch.stack([-e[1], e[1], e[2], -e[0]]))
    images = torch.tensor([[0.9, 0.1, 0.0], [-1.0, 0.2, 0.1], [0.1, -2.0, 0.3]])
    nn = bank.nearest(images)
    assert torch.equal(nn, torch.stack([e[1], -e[0], -e[1]]))
    # A batch larger than the bank keeps its last rows.
    big = unit(6, 3).float()
    bank.update(big)
    assert torch.allclose(bank.features[:bank.count].sort(0).values,
                          big[-4:].sort(0).values)


def test_roclip_objective_alternates_and_fills_the_bank():
    I, T = unit(4).float(), unit(4).float()
    s = 5.0
    bank = obj.TextBank(16, I.shape[1])
    assert not obj.roclip_uses_nearest(0, 2) and obj.roclip_uses_nearest(1, 2)
    plain = obj.roclip_objective(I, T, s, bank, epoch=0, break_epoch=2)
    assert plain.item() == pytest.approx(obj.mmcl(I, T, s).item(), rel=1e-6)
    assert bank.count == 4
    I2 = unit(4).float()
    nn = bank.nearest(I2)
    got = obj.roclip_objective(I2, unit(4).float(), s, bank, epoch=1, break_epoch=2)
    assert got.item() == pytest.approx(obj.mmcl(I2, nn, s).item(), rel=1e-6)
    assert bank.count == 8


# ---- the UAP -----------------------------------------------------------------------------

def test_patch_geometry_matches_advclip_at_224():
    assert patch_geometry(224, 0.03) == (38, 172)
    side, corner = patch_geometry(32, 0.03)
    assert side == 5 and corner + side <= 32
    with pytest.raises(ValueError, match="--patch-area"):
        patch_geometry(224, 0.0)


@pytest.mark.parametrize("size", [5, 17, 38])
def test_generator_shape_and_range_do_not_depend_on_the_batch(size):
    g = UAPGenerator(size, seed=3)
    p = g()
    assert p.shape == (3, size, size) and p.min() >= 0 and p.max() <= 1
    l = UAPGenerator(size, mode="linf", eps=0.03, seed=3)()
    assert l.shape == (3, size, size) and l.abs().max() <= 0.03
    g.eval()
    assert torch.equal(g(), p)  # no running statistics: train == eval
    # The same image gets the same adversarial version in batches of any size.
    S = 37
    side, corner = patch_geometry(S)
    gen = UAPGenerator(side, seed=1)
    uap = gen()
    images = torch.randint(0, 256, (9, 3, S, S), dtype=torch.uint8)
    full = apply_uap(images, uap, mode="patch", image_size=S)
    for b in (1, 4):
        part = apply_uap(images[:b], uap, mode="patch", image_size=S)
        assert torch.equal(part, full[:b])


def test_same_seed_same_z_and_uap():
    a, b = UAPGenerator(11, seed=7), UAPGenerator(11, seed=7)
    assert torch.equal(a.z, b.z)
    assert not torch.equal(a.z, UAPGenerator(11, seed=8).z)
    assert "z" in a.state_dict()


def test_patch_uap_changes_only_its_box_and_linf_stays_within_eps():
    S = 41
    side, corner = patch_geometry(S)
    images = torch.randint(1, 255, (5, 3, S, S), dtype=torch.uint8)
    x = images.double() / 255
    uap = UAPGenerator(side, seed=0)().detach()
    out = apply_uap(images, uap, mode="patch", image_size=S).double()
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[corner:corner + side, corner:corner + side] = True
    plain = normalize_images(images, None, None).double()  # the op's own uint8 -> [0,1]
    assert torch.equal(out[..., ~inside], plain[..., ~inside])
    assert torch.allclose(plain, x, atol=1e-7)
    assert torch.allclose(out[..., inside], uap.double().expand(5, 3, side, side)
                          .reshape(5, 3, -1), atol=1e-6)
    delta = UAPGenerator(S, mode="linf", eps=0.03, seed=0)().detach()
    lin = apply_uap(images, delta, mode="linf", image_size=S, eps=0.03).double()
    assert (lin - x).abs().max() <= 0.03 + 1e-6
    assert (lin - x).abs().max() > 0.005  # it does perturb


def test_uap_gradient_reaches_the_generator():
    S = 32
    side, _ = patch_geometry(S)
    g = UAPGenerator(side, seed=0)
    images = torch.randint(0, 256, (3, 3, S, S), dtype=torch.uint8)
    out = apply_uap(images, g(), mode="patch", image_size=S,
                    mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.25])
    (out.square().mean()).backward()
    grads = [p.grad for p in g.parameters()]
    assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0


def _footprint(images, out, S):
    """bool [B, S, S]: the pixels where out differs from the plain normalized images."""
    plain = normalize_images(images, None, None)
    return (out - plain).abs().amax(1) > 1e-6


def test_random_place_patch_moves_per_image_and_is_a_function_of_the_id():
    S = 40
    side, corner = patch_geometry(S)
    images = torch.randint(1, 255, (64, 3, S, S), dtype=torch.uint8)
    uap = torch.zeros(3, side, side)  # black: every patch pixel differs from images >= 1
    ids = torch.arange(100, 164)
    out = apply_uap(images, uap, mode="patch", image_size=S, place="random", ids=ids)
    ys, xs = patch_places(64, S, place="random", ids=ids)
    hit = _footprint(images, out, S)
    for b in range(64):
        want = torch.zeros(S, S, dtype=torch.bool)
        want[ys[b]:ys[b] + side, xs[b]:xs[b] + side] = True
        assert torch.equal(hit[b], want)
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 32   # places differ between images
    assert int(ys.max()) + side <= S and int(xs.max()) + side <= S and int(ys.min()) >= 0
    # the same id gets the same place in any batch; no ids: a place from the generator
    again = apply_uap(images[5:9], uap, mode="patch", image_size=S, place="random", ids=ids[5:9])
    assert torch.equal(again, out[5:9])
    g1, g2 = (torch.Generator().manual_seed(0) for _ in range(2))
    a = apply_uap(images, uap, mode="patch", image_size=S, place="random", generator=g1)
    assert torch.equal(a, apply_uap(images, uap, mode="patch", image_size=S, place="random",
                                    generator=g2))
    corner_out = apply_uap(images, uap, mode="patch", image_size=S, place="corner")
    assert _footprint(images, corner_out, S)[:, corner:corner + side,
                                              corner:corner + side].all()
    with pytest.raises(ValueError, match="--patch-place"):
        apply_uap(images, uap, mode="patch", image_size=S, place="middle")


def test_patch_plus_linf_is_the_linf_image_with_the_patch_on_top():
    S, eps = 36, 0.05
    side, corner = patch_geometry(S)
    g = UAPGenerator(S, mode="patch+linf", eps=eps, seed=2)
    delta = g()
    assert tuple(delta.shape) == uap_shape("patch+linf", S) == (6, S, S)
    assert delta[:3].abs().max() <= eps and 0 <= delta[3:].min() and delta[3:].max() <= 1
    images = torch.randint(0, 256, (4, 3, S, S), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.3, 0.25]
    out = apply_uap(images, delta, mode="patch+linf", image_size=S, eps=eps, mean=mean, std=std)
    # by hand: x + delta clamped, the patch pasted at the corner, normalized
    x = (images.float() / 255 + delta[:3].detach()).clamp(0, 1)
    x[..., corner:corner + side, corner:corner + side] = delta[3:, :side, :side].detach()
    want = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, want, atol=1e-5)
    out.square().mean().backward()   # both parts of the generator's output get a gradient
    grads = [p.grad for p in g.parameters()]
    assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0
    # rows: only the selected rows are perturbed
    rows = torch.tensor([True, False, True, False])
    part = apply_uap(images, delta.detach(), mode="patch+linf", image_size=S, eps=eps,
                     rows=rows)
    plain = normalize_images(images, None, None)
    assert torch.equal(part[~rows], plain[~rows]) and not torch.equal(part[rows], plain[rows])


@pytest.mark.parametrize("mode,place", [("patch", "random"), ("patch+linf", "random"),
                                        ("patch+linf", "corner"), ("linf", "corner")])
def test_uap_file_keeps_mode_and_place(tmp_path, mode, place):
    S = 32
    with torch.no_grad():
        d = UAPGenerator(uap_shape(mode, S)[-1], mode=mode, seed=0)()
    uap = UAP(d, mode=mode, image_size=S, place=place)
    uap.save(tmp_path / "u.pt")
    back = UAP.load(tmp_path / "u.pt")
    assert (back.mode, back.place) == (mode, place) and torch.equal(back.perturbation,
                                                                     uap.perturbation)
    images = torch.randint(0, 256, (6, 3, S, S), dtype=torch.uint8)
    assert torch.equal(back.apply(images, torch.arange(6)), uap.apply(images, torch.arange(6)))
    with pytest.raises(ValueError, match=r"is \[" + str(uap_shape(mode, S)[0])):
        UAP(torch.zeros(3, 7, 7), mode=mode, image_size=S)


def test_discriminator_output_and_weight_clipping():
    for S in (32, 37, 64):
        d = Discriminator(S)
        out = d(torch.randn(3, 3, S, S))  # logits: the losses take the logits form
        assert out.shape == (3,) and out.isfinite().all()
        assert isinstance(d.net[-1], torch.nn.Conv2d)
    d = Discriminator(32)
    with torch.no_grad():
        for p in d.parameters():
            p.uniform_(-1, 1)
    d.clip_weights(0.01)
    assert all(p.abs().max() <= 0.01 for p in d.parameters())
    assert max(p.abs().max().item() for p in d.parameters()) == pytest.approx(0.01)


def topology_by_hand(a, b, eps=1e-7):
    """AdvCLIP's U(a, b), element by element."""
    def graph(x):
        x = F.normalize(x, dim=-1)
        n = x.shape[0]
        P = torch.zeros(n, n, dtype=x.dtype)
        for i in range(n):
            dist = [1 - float(x[i] @ x[j]) if j != i else 3.0 for j in range(n)]
            m = min(dist)
            row = [(2 - (dist[j] - m if j != i else 0.0)) / 2 for j in range(n)]
            P[i] = torch.tensor(row, dtype=x.dtype) / sum(row)
        return P
    Q, P = graph(a), graph(b)
    total = 0.0
    for p, q in zip(P.flatten().tolist(), Q.flatten().tolist()):
        total += p * (math.log(p + eps) - math.log(q + eps))
        total += (1 - p) * (math.log(1 - p + eps) - math.log(1 - q + eps))
    return total


def test_topology_loss_matches_hand_computation():
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    # topology_loss works in fp32 (features come from the model in fp32 or bf16)
    assert topology_loss(a, b).item() == pytest.approx(topology_by_hand(a, b), rel=1e-4)
    assert topology_loss(a, a).item() == pytest.approx(0.0, abs=1e-5)


def test_backdoor_loss_sign_and_pairing():
    x, xbd = unit(6), unit(6)
    want = nce_by_hand(x, xbd, 10.0)
    assert backdoor_loss(x, xbd).item() == pytest.approx(want, rel=1e-6)
    assert backdoor_loss(x, xbd, sign=-1).item() == pytest.approx(-want, rel=1e-6)
    assert backdoor_loss(x, xbd, pairing="adversarial-query").item() == pytest.approx(
        nce_by_hand(xbd, x, 10.0), rel=1e-6)
    # Minimizing it pulls each adversarial feature toward its reference feature.
    xbd = xbd.clone().float().requires_grad_(True)
    before = F.cosine_similarity(x.float(), xbd, dim=-1).mean()
    opt = torch.optim.SGD([xbd], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        backdoor_loss(x.float(), xbd).backward()
        opt.step()
    assert F.cosine_similarity(x.float(), xbd, dim=-1).mean() > before + 0.2


def test_generator_loss_is_the_sum_of_its_terms():
    B, D, S = 4, 8, 16
    d_fake = torch.randn(B)  # the discriminator's logits
    adv, clean = torch.randn(B, 3, S, S), torch.randn(B, 3, S, S)
    fc, fa, ft = torch.randn(B, D), torch.randn(B, D), torch.randn(B, D)
    bd = torch.tensor(0.37)
    total, terms = generator_loss(d_fake, adv, clean, fc, fa, ft, backdoor=bd, lambda_bd=2.0)
    nce = lambda q, k: nce_by_hand(F.normalize(q.double(), dim=-1),  # noqa: E731
                                   F.normalize(k.double(), dim=-1), 10.0)
    want = (-torch.log(torch.sigmoid(d_fake.double())).mean().item()
            + 10 * (-nce(fc, fa) - 5 * nce(fa, ft))
            + F.mse_loss(adv, clean).item()
            + (-topology_by_hand(fc.double(), fa.double())
               - 5 * topology_by_hand(fa.double(), ft.double()))
            + 2.0 * 0.37)
    assert total.item() == pytest.approx(want, rel=1e-4)
    assert set(terms) == {"gan", "adv", "mse", "topo", "backdoor"}
    d_real = torch.randn(B)
    assert discriminator_loss(d_real, d_fake).item() == pytest.approx(
        (-torch.log(torch.sigmoid(d_real)).mean()
         - torch.log(1 - torch.sigmoid(d_fake)).mean()).item(), rel=1e-5)


# ---- views -------------------------------------------------------------------------------

def test_eda_view_is_redrawn_every_epoch_and_stable_within_one():
    from abd_fast.defenses.views import eda_view
    from abd_fast.text import EDA
    eda = EDA(seed=4)
    caps = [f"a photo of a small red star on a striped background number {k}" for k in range(12)]
    ids = torch.arange(100, 112)
    e0, e0_again, e1 = eda_view(eda, caps, ids, 0), eda_view(eda, caps, ids, 0), \
        eda_view(eda, caps, ids, 1)
    assert e0 == e0_again                                 # workers, ranks, resume agree
    assert sum(a != b for a, b in zip(e0, e1)) >= 8       # a fresh draw next epoch
    assert sum(a != c for a, c in zip(e0, caps)) >= 8     # and it does augment
    # The view of a sample depends on its id, not on its place in the batch.
    assert eda_view(eda, caps[::-1], ids.flip(0), 0) == e0[::-1]


@pytest.mark.parametrize("view", ["autoaugment", "cross_augment"])
def test_image_views_are_per_sample_and_seeded(view):
    from abd_fast.defenses import views
    fn = getattr(views, view)
    img = torch.randint(0, 256, (3, 33, 33), dtype=torch.uint8)
    batch = img.expand(16, 3, 33, 33).contiguous()
    torch.manual_seed(0)
    a = fn(batch)
    torch.manual_seed(0)
    b = fn(batch)
    assert a.dtype == torch.uint8 and a.shape == batch.shape and torch.equal(a, b)
    distinct = {bytes(x.flatten().tolist()) for x in a}
    assert len(distinct) >= 8  # each copy of the same image gets its own augmentation


def test_brighten_raises_brightness_and_clamps():
    from abd_fast.defenses.views import brighten
    x = torch.randint(0, 256, (2, 3, 9, 9), dtype=torch.uint8)
    y = brighten(x, 1.2)
    assert torch.allclose(y, (x.float() / 255 * 1.2).clamp(0, 1))
    assert y.max() <= 1 and y.mean() > x.float().mean() / 255


@pytest.mark.parametrize("no_adv,adv_view", [(False, "raw"), (True, "raw"),
                                             (False, "autoaugment")])
def test_abd_loss_encodes_the_clean_and_adversarial_views_as_one_batch(no_adv, adv_view):
    """defense_loss('abd') builds [clean, clean + UAP] (--adv-view raw) or [clean,
    AutoAugment(clean) + UAP] (autoaugment) with one fused call on stacked uint8 images: the
    model sees exactly the concatenation of the two separately built views."""
    from abd_fast.defenses.views import autoaugment
    from types import SimpleNamespace
    from abd_fast.defenses.stages import defense_loss
    from abd_fast.defenses.uap import UAP
    from abd_fast.text import EDA
    B, size = 5, 32
    images = torch.randint(1, 256, (B, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        uap = UAP(UAPGenerator(patch_geometry(size)[0], mode="patch", seed=3)(), mode="patch",
                  image_size=size)
    mean, std = torch.tensor([0.481, 0.458, 0.408]), torch.tensor([0.269, 0.261, 0.276])
    seen = {}

    def model(x, t):
        seen["x"], seen["t"] = x, t
        g = torch.Generator().manual_seed(0)
        return torch.randn(x.shape[0], 8, generator=g), torch.randn(t.shape[0], 8, generator=g), \
            torch.tensor(10.0)
    run = SimpleNamespace(
        cfg=dict(lambda1=1.0, lambda2=1.0, no_adv=no_adv, no_eda=False, abd_objective="align",
                 adv_view=adv_view),
        info=SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu")),
        mean=mean, std=std, tokenizer=lambda caps: torch.arange(len(caps))[:, None])
    batch = SimpleNamespace(images=images, ids=torch.arange(B),
                            captions=[f"a photo of a red star number {k}" for k in range(B)])
    torch.manual_seed(5)
    loss = defense_loss(run, "abd", uap=uap, eda=EDA(seed=0))(model, batch, 0)
    torch.manual_seed(5)  # the same AutoAugment draws
    views = [normalize_images(images, mean, std)]
    if not no_adv:
        views.append(uap.apply(images if adv_view == "raw" else autoaugment(images),
                               mean=mean, std=std))
    assert torch.equal(seen["x"], torch.cat(views))
    assert seen["t"].shape[0] == 2 * B and torch.isfinite(loss)


# ---- budgets -----------------------------------------------------------------------------

def test_paper_budget_reproduces_the_papers_shape():
    """The paper: poisoning 500K pairs, batch 128, 10 epochs at lr 1e-6; defense 250K pairs,
    batch 64, 10 epochs at 3e-6 (the same steps, 3x the lr)."""
    from abd_fast.defenses.budget import budget_record, paper_budget
    per_epoch = 500_000 // 128
    poisoning = {"steps": 10 * per_epoch, "lr": 1e-6, "batch_size": 128, "epochs": 10,
                 "pairs": per_epoch * 128, "steps_x_lr": 10 * per_epoch * 1e-6}
    b = paper_budget(poisoning)
    assert (b["batch_size"], b["epochs"], b["steps"]) == (64, 10, poisoning["steps"])
    assert b["lr"] == pytest.approx(3e-6, rel=1e-12)
    assert b["pairs"] == per_epoch * 64 and abs(b["pairs"] - 250_000) < 64
    rec = budget_record("paper", pairs=b["pairs"], steps=b["steps"], lr=b["lr"],
                        batch_size=64, epochs=10, poisoning=poisoning)
    assert rec["ratio"] == pytest.approx(3.0, rel=1e-12)
    # Fewer steps (a compute budget): the lr grows so that steps x lr stays ratio x the
    # poisoning's; steps are whole epochs of whole batches (rounded up).
    fewer = paper_budget(poisoning, steps=1001, epochs=4, ratio=1.5)
    assert fewer["steps"] == 4 * 251 and fewer["pairs"] == 251 * 64
    assert fewer["steps"] * fewer["lr"] == pytest.approx(1.5 * poisoning["steps_x_lr"])
    # Epochs default to the poisoning's, at least 2 (RoCLIP's nearest-neighbour epoch).
    one_epoch = dict(poisoning, epochs=1)
    assert paper_budget(one_epoch)["epochs"] == 2
    assert budget_record("fixed", pairs=64, steps=1, lr=1e-3, batch_size=64, epochs=1,
                         poisoning=None)["ratio"] is None
    with pytest.raises(ValueError, match="--budget-ratio"):
        paper_budget(poisoning, ratio=0)
