"""Poisoning batches inside a plain PyTorch CLIP training step with abd_fast's fused ops, for
users of other trainers (open_clip_train, your own loop).

    python examples/poison_step.py      # a few steps of the tiny CLIP on random images

Each step poisons a share of the batch BadNet-style (Carlini & Terzis' poisoning of
contrastive training): a fixed patch is stamped at a random place of those images and their
captions are replaced by a caption of the target class. One fused op, `apply_trigger`,
stamps the patch on the chosen rows, clamps and normalizes the whole uint8 batch in one pass;
`clip_loss` is the fused CLIP loss (open_clip's ClipLoss without its N x N logits). To use
it on real data, feed your loader's uint8 images [B, 3, S, S] (not normalized) and captions.
"""
from __future__ import annotations

import open_clip
import torch

from abd_fast.models import CONFIG_DIR
from abd_fast.ops import apply_trigger, clip_loss


def poison_batch(images, captions, *, rate, patch, target_caption, generator, mean, std):
    """Stamps `patch` ([3, p, p] in [0, 1]) on a random `rate` share of the uint8 `images`
    [B, 3, S, S] at random places and gives those rows `target_caption`. Returns (normalized
    float images [B, 3, S, S], captions, poisoned rows: bool [B])."""
    B, S, p = images.shape[0], images.shape[-1], patch.shape[-1]
    rows = torch.rand(B, generator=generator) < rate
    ys = torch.randint(0, S - p + 1, (B,), generator=generator)
    xs = torch.randint(0, S - p + 1, (B,), generator=generator)
    x = apply_trigger(images, "patch", patch=patch, ys=ys, xs=xs, rows=rows, mean=mean, std=std)
    captions = [target_caption if poisoned else c for poisoned, c in zip(rows.tolist(), captions)]
    return x, captions, rows


def train_step(model, tokenizer, optimizer, images, captions, **poison):
    """One CLIP step on a batch poisoned by `poison_batch(**poison)`: (loss, poisoned rows)."""
    x, captions, rows = poison_batch(images, captions, **poison)
    image_features = model.encode_image(x, normalize=True)
    text_features = model.encode_text(tokenizer(captions), normalize=True)
    loss = clip_loss(image_features, text_features, model.logit_scale.exp())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), rows


def main(steps: int = 5, batch_size: int = 32, rate: float = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    open_clip.add_model_config(CONFIG_DIR)  # abd_fast's tiny CLIP; any open_clip model works
    model = open_clip.create_model("abd-tiny-rn")
    tokenizer = open_clip.get_tokenizer("abd-tiny-rn")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    size = model.visual.image_size
    S = size[0] if isinstance(size, (tuple, list)) else size
    poison = dict(rate=rate, patch=torch.rand(3, S // 8, S // 8, generator=generator),
                  target_caption="a photo of a banana.", generator=generator,
                  mean=torch.tensor(model.visual.image_mean),
                  std=torch.tensor(model.visual.image_std))
    classes = ["dog", "cat", "car", "tree"]
    losses = []
    for step in range(steps):
        images = torch.randint(0, 256, (batch_size, 3, S, S), dtype=torch.uint8,
                               generator=generator)  # your loader's batch
        captions = [f"a photo of a {classes[k % len(classes)]}." for k in range(batch_size)]
        loss, rows = train_step(model, tokenizer, optimizer, images, captions, **poison)
        losses.append(loss)
        print(f"step {step}: loss {loss:.4f}, {int(rows.sum())} of {batch_size} rows poisoned")
    return losses


if __name__ == "__main__":
    main()
