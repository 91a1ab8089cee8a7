"""`selfcheck`: check the fused ops against their PyTorch references (abd_fast.ops.reference)."""
from __future__ import annotations

import time

NAME = "selfcheck"


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, help="check the fused ops against their references")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> int:
    import torch
    import torch.nn.functional as F

    from abd_fast.ops import apply_perturbation, apply_trigger, clip_loss, info_nce, reference
    torch.manual_seed(args.seed)
    B, C, H, W, N, D = 16, 3, 64, 64, 256, 128
    images = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)
    mean, std = torch.tensor([0.48, 0.46, 0.41]), torch.tensor([0.27, 0.26, 0.28])
    patch = torch.rand(C, 8, 8)
    ys, xs = torch.randint(0, H - 8, (B,)), torch.randint(0, W - 8, (B,))
    delta = (torch.rand(C, H, W) - 0.5) * 0.1
    q, k = F.normalize(torch.randn(N, D), dim=-1), F.normalize(torch.randn(N, D), dim=-1)
    s = torch.tensor(50.0)
    checks = [
        ("apply_trigger patch", lambda: apply_trigger(images, "patch", patch=patch, ys=ys, xs=xs,
                                                      mean=mean, std=std),
         lambda: reference.image_op(images, "patch", patch, torch.stack([ys, xs], 1),
                                    mean=mean, std=std)),
        ("apply_perturbation linf", lambda: apply_perturbation(images, delta, mode="linf",
                                                               mean=mean, std=std),
         lambda: reference.image_op(images, "add", delta, eps=0.03, mean=mean, std=std)),
        ("clip_loss", lambda: clip_loss(q, k, s), lambda: reference.clip_loss(q, k, s)),
        ("info_nce", lambda: info_nce(q, k, s), lambda: reference.info_nce(q, k, s)),
    ]
    worst = 0.0
    for name, ours, ref in checks:
        t0 = time.perf_counter()
        out = ours()
        dt = (time.perf_counter() - t0) * 1e3
        err = (out - ref()).abs().max().item()
        worst = max(worst, err)
        print(f"{name:26s} max |ours - reference| = {err:.2e}   ({dt:.1f} ms)")
    ok = worst < 1e-4
    print("fused ops agree with the references" if ok else "MISMATCH against the references")
    return 0 if ok else 1
