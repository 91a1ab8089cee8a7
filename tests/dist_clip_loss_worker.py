"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): our ClipLoss must
give open_clip's loss and gradients on every rank in every gather mode."""
import itertools
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss

from abd_fast.ops import ClipLoss


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for local_loss, with_grad in itertools.product([False, True], [False, True]):
        gen = torch.Generator().manual_seed(100 + rank)
        img0 = F.normalize(torch.randn(11, 67, generator=gen), dim=-1)
        txt0 = F.normalize(torch.randn(11, 67, generator=gen), dim=-1)
        results = []
        for cls in (ClipLoss, OpenClipLoss):
            img, txt = img0.clone().requires_grad_(True), txt0.clone().requires_grad_(True)
            scale = torch.tensor(17.0, requires_grad=True)
            loss_fn = cls(local_loss=local_loss, gather_with_grad=with_grad, rank=rank,
                          world_size=world)
            loss = loss_fn(img, txt, scale)
            results.append((loss, *torch.autograd.grad(loss, (img, txt, scale))))
        for name, ours, theirs in zip(("loss", "d_img", "d_txt", "d_scale"), *results):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} local_loss={local_loss} "
                                                     f"gather_with_grad={with_grad} {name}: {m}")
        print(f"rank {rank} local_loss={local_loss} gather_with_grad={with_grad} OK "
              f"loss={results[0][0].item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
