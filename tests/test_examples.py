"""examples/poison_step.py: poisoning inside a plain PyTorch CLIP training step."""
import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "poison_step.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("poison_step", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_poison_batch_stamps_the_patch_on_the_chosen_rows_only(example):
    g = torch.Generator().manual_seed(3)
    B, S, p = 37, 19, 5                              # odd sizes
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g)
    patch = torch.rand(3, p, p, generator=g)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
    captions = [f"caption {k}" for k in range(B)]
    x, new_captions, rows = example.poison_batch(
        images, captions, rate=0.3, patch=patch, target_caption="a banana.",
        generator=torch.Generator().manual_seed(5), mean=mean, std=std)
    assert 0 < int(rows.sum()) < B
    assert new_captions == ["a banana." if r else c for r, c in zip(rows.tolist(), captions)]
    # The same draws as poison_batch, to find where each patch went.
    g = torch.Generator().manual_seed(5)
    torch.rand(B, generator=g)
    ys, xs = (torch.randint(0, S - p + 1, (B,), generator=g) for _ in range(2))
    expected = images.float() / 255
    for b in range(B):
        if rows[b]:
            expected[b, :, ys[b]:ys[b] + p, xs[b]:xs[b] + p] = patch
    expected = (expected - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_training_steps_run(example, capsys):
    losses = example.main(steps=3, batch_size=16, rate=0.25)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    out = capsys.readouterr().out
    assert out.count("rows poisoned") == 3
