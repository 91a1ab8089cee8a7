"""Training engine pieces: schedule, parameter groups, atomic checkpoints."""
import math

import pytest
import torch

from abd_fast.engine import atomic_save, clamp_logit_scale, lr_at, make_optimizer, param_groups


@pytest.mark.parametrize("warmup,total", [(50, 1000), (0, 7), (3, 10), (10, 5), (1, 2)])
def test_schedule_formula(warmup, total):
    base = 3e-4
    lrs = [lr_at(s, base, warmup, total) for s in range(total)]
    w = max(0, min(warmup, total - 2))
    for s, lr in enumerate(lrs):
        if s < w:
            expected = base * (s + 1) / (w + 1)
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - 1 - w)))
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert lrs[-1] == 0.0                       # exactly 0 on the last step
    assert lrs[0] > 0                           # the first step learns
    assert max(lrs) == pytest.approx(base)      # the peak is the base rate, on step w
    assert lrs[w] == pytest.approx(base)
    assert all(a <= b for a, b in zip(lrs[:w], lrs[1:w + 1]))           # warmup rises
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))            # cosine falls
    with pytest.raises(ValueError):
        lr_at(total, base, warmup, total)


def test_param_groups_exclude_norms_biases_and_logit_scale():
    from abd_fast.models import create_model
    model = create_model("abd-tiny-vit")
    no_decay, decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in nd and not d & nd
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(".ln_" in n or n.startswith("ln_") for n in nd) and any("bias" in n for n in nd)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = make_optimizer(model, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_logit_scale_clamp():
    from abd_fast.models import create_model
    model = create_model("abd-tiny-vit")
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise OSError("No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind
