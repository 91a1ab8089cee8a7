"""BadCLIP trigger optimization: the loss decreases, the patch file round-trips exactly."""
import torch

from abd_fast.attacks import load_patch, make_trigger, save_patch
from abd_fast.attacks.badclip import BadCLIPConfig, badclip_losses, optimize_patch
from abd_fast.data import Batch
from abd_fast.models import create_model, get_tokenizer, image_spec


def test_losses_by_formula():
    a, c = [torch.nn.functional.normalize(torch.randn(5, 6), dim=1) for _ in range(2)]
    t, v = [torch.nn.functional.normalize(torch.randn(6), dim=0) for _ in range(2)]
    texts = torch.nn.functional.normalize(torch.randn(5, 6), dim=1)
    cfg = BadCLIPConfig(temperature=0.5, margin=0.3, w_contrastive=2, w_pull=3, w_triplet=5)
    got = badclip_losses(a, c, t, v, texts, cfg)
    con = sum(-torch.log(torch.exp(a[i] @ t / 0.5) / (torch.exp(a[i] @ t / 0.5) + sum(
        torch.exp(a[i] @ texts[j] / 0.5) for j in range(5)))) for i in range(5)) / 5
    pull = sum(1 - a[i] @ v for i in range(5)) / 5
    trip = sum(max(0.0, 0.3 + (1 - a[i] @ v) - (1 - a[i] @ c[i])) for i in range(5)) / 5
    torch.testing.assert_close(got["contrastive"], con)
    torch.testing.assert_close(got["pull"], pull)
    torch.testing.assert_close(got["triplet"], torch.as_tensor(trip, dtype=torch.float32))
    torch.testing.assert_close(got["loss"], 2 * con + 3 * pull + 5 * trip)


def test_optimization_decreases_loss_and_patch_round_trips(tmp_path):
    torch.manual_seed(0)
    model = create_model("abd-tiny-vit")
    spec = image_spec(model)
    images = torch.randint(1, 256, (24, 3, 32, 32), dtype=torch.uint8)
    words = ["circle", "square", "ring", "cross"]
    batches = [Batch(images[k:k + 8], torch.arange(k, k + 8),
                     captions=[f"a {words[(k + i) % 4]} on a background" for i in range(8)])
               for k in range(0, 24, 8)]
    target_images = torch.randint(1, 256, (6, 3, 32, 32), dtype=torch.uint8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch, history = optimize_patch(
        model, batches, target_captions=["a star.", "a photo of a star."],
        target_images=target_images, mean=spec.mean, std=spec.std,
        config=BadCLIPConfig(steps=30, lr=0.05), tokenizer=get_tokenizer("abd-tiny-vit"))
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert last < first - 0.05, (first, last)
    assert patch.shape == (3, 8, 8) and patch.min() >= 0 and patch.max() <= 1
    assert model.training and all(q.requires_grad for q in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # frozen
    for name in ("patch.png", "patch.pt"):
        saved = save_patch(patch, tmp_path / name)
        assert torch.equal(load_patch(tmp_path / name), saved)
        trig = make_trigger("badclip", image_size=32, patch_file=tmp_path / name)
        assert torch.equal(trig.patch, saved)
    assert torch.equal(load_patch(tmp_path / "patch.pt"), patch)
