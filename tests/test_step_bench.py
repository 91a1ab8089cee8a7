"""bench/step.py compares like with like: its fused and reference paths compute the same
image views, the same ABD loss and the same gradients on the same batch."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step import (demo_timing_rows, eager_views, fused_loss, fused_views,  # noqa: E402
                        make_uap, read_demo_report, reference_loss)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


@pytest.mark.parametrize("mode,size", [("patch", 37), ("linf", 29)])
def test_views_match(mode, size):
    images = torch.randint(0, 256, (5, 3, size, size), dtype=torch.uint8)
    ids = torch.arange(5)
    uap = make_uap(size, mode, seed=3)
    fused = fused_views(images, ids, uap, MEAN, STD)
    eager = eager_views(images, ids, uap, MEAN, STD)
    assert fused.shape == eager.shape == (10, 3, size, size)
    assert not torch.equal(fused[:5], fused[5:])  # the UAP changed the adversarial view
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_losses_and_gradients_match():
    n, d = 7, 19
    feats = [torch.nn.functional.normalize(torch.randn(n, d), dim=-1) for _ in range(4)]
    scale = torch.tensor(13.7)
    out = []
    for make in (fused_loss, reference_loss):
        leaves = [f.clone().requires_grad_() for f in feats] + [scale.clone().requires_grad_()]
        loss = make(lambda1=0.8, lambda2=1.3)(*leaves)
        loss.backward()
        out.append((loss.detach(), [v.grad for v in leaves]))
    (lf, gf), (lr, gr) = out
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_demo_report(tmp_path):
    p = tmp_path / "report.json"
    p.write_text('{"timing": {"pretrain": 181.5, "poison": 60.25}, "clean": {}}')
    assert read_demo_report(p) == {"stages": {"pretrain": 181.5, "poison": 60.25},
                                   "total": None, "sum_of_stages": 241.75}
    p.write_text('{"timing": {"pretrain": 181.5, "poison": 60.25, "total": 3.5}}')
    assert read_demo_report(p) == {"stages": {"pretrain": 181.5, "poison": 60.25},
                                   "total": 3.5, "sum_of_stages": 241.75}
    p.write_text('{"clean": {}}')
    with pytest.raises(SystemExit, match="timing"):
        read_demo_report(p)
    with pytest.raises(SystemExit, match="no such file"):
        read_demo_report(tmp_path / "missing.json")


def test_demo_timing_rows_compare_runs():
    a = {"stages": {"pretrain": 300.0, "poison": 100.0, "roclip": 50.0}, "total": None,
         "sum_of_stages": 450.0}
    b = {"stages": {"pretrain": 200.0, "poison": 80.0}, "total": None, "sum_of_stages": 280.0}
    rows = {r["stage"]: r for r in demo_timing_rows([a, b])}
    assert rows["pretrain"] == {"stage": "pretrain", "s0": 300.0, "s1": 200.0, "x1": "1.50x"}
    assert rows["roclip"] == {"stage": "roclip", "s0": 50.0}   # only in the baseline: no ratio
    assert rows["sum of common stages"] == {"stage": "sum of common stages", "s0": 400.0,
                                            "s1": 280.0, "x1": "1.43x"}
    assert rows["sum of stages"] == {"stage": "sum of stages", "s0": 450.0, "s1": 280.0}
    one = demo_timing_rows([a])
    assert [r["stage"] for r in one] == ["pretrain", "poison", "roclip", "sum of stages"]


def test_demo_timing_rows_median_of_the_other_runs():
    base = {"stages": {"poison": 150.0, "abd": 240.0, "clean": 400.0}, "total": None,
            "sum_of_stages": 790.0}
    runs = [{"stages": {"poison": 100.0, "abd": 180.0}, "total": None, "sum_of_stages": 280.0},
            {"stages": {"poison": 4000.0, "abd": 160.0}, "total": None, "sum_of_stages": 4160.0},
            {"stages": {"poison": 120.0, "abd": 200.0, "clean": 320.0}, "total": None,
             "sum_of_stages": 640.0}]
    rows = {r["stage"]: r for r in demo_timing_rows([base, *runs])}
    # The slowed run's 4000 s does not move the median; a stage one other run has: no median.
    assert rows["poison"]["med"] == 120.0 and rows["poison"]["xmed"] == "1.25x"
    assert rows["abd"]["med"] == 180.0 and "med" not in rows["clean"]
    total = rows["sum of stages with a median"]
    assert total["s0"] == 390.0 and total["med"] == 300.0 and total["xmed"] == "1.30x"


@pytest.mark.parametrize("model", ["abd-tiny-rn", "abd-tiny-vit"])
def test_attention_bench_kernels_compute_the_same_step(model):
    """bench/attention.py times the same step under both kernels: in fp32 torch's own kernel
    and the math kernel give the same gradients (to rounding)."""
    from bench.attention import make_step
    net, step = make_step(model, 6, 11, 32, "fp32")
    grads = {}
    for kernel in ("own", "math"):
        step(kernel)
        grads[kernel] = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    assert len(grads["own"]) == len(grads["math"]) > 10
    own, mat = (torch.cat([g.flatten() for g in grads[k]]) for k in ("own", "math"))
    assert float((own - mat).norm() / mat.norm()) < 1e-4  # fp32 rounding of other sums
