"""Run by tests/test_open_clip_train.py, alone or under torchrun: `python -m
abd_fast.open_clip_train <flags>` exactly (runpy), with every loss the trainer computes
recorded beside open_clip's own ClipLoss (and its gradients) on the same features.

    python open_clip_train_worker.py RECORDS_PREFIX <open_clip_train flags>
writes RECORDS_PREFIX<rank>.json: [{"loss_class", "ours", "open_clip", "grad_diff",
"world_size", "local_loss", "gather_with_grad"}, ...], one per training step."""
import json
import os
import runpy
import sys

import open_clip.loss
import torch

OPEN_CLIP_LOSS = open_clip.loss.ClipLoss   # open_clip's, before the entry point patches it
from abd_fast.ops import ClipLoss  # noqa: E402

records = []
fused_forward = ClipLoss.forward


def recording_forward(self, image_features, text_features, logit_scale, logit_bias=None,
                      output_dict=False):
    """The trainer's call, then both losses again on detached copies, with gradients."""
    reference = OPEN_CLIP_LOSS(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                               cache_labels=True, rank=self.rank, world_size=self.world_size)
    results = []
    for loss_fn in (lambda *x: fused_forward(self, *x), reference):
        inputs = [t.detach().clone().requires_grad_(True)
                  for t in (image_features, text_features, logit_scale)]
        loss = loss_fn(*inputs)
        results.append((loss.detach(), torch.autograd.grad(loss, inputs)))
    (ours, g_ours), (ref, g_ref) = results
    records.append({"loss_class": f"{type(self).__module__}.{type(self).__qualname__}",
                    "ours": ours.item(), "open_clip": ref.item(),
                    "grad_diff": max((a - b).abs().max().item() for a, b in zip(g_ours, g_ref)),
                    "world_size": self.world_size, "local_loss": self.local_loss,
                    "gather_with_grad": self.gather_with_grad})
    return fused_forward(self, image_features, text_features, logit_scale, logit_bias,
                         output_dict)


if __name__ == "__main__":
    prefix = sys.argv.pop(1)
    ClipLoss.forward = recording_forward
    sys.argv[0] = "abd_fast.open_clip_train"
    try:
        runpy.run_module("abd_fast.open_clip_train", run_name="__main__", alter_sys=True)
    finally:
        rank = os.environ.get("RANK", "0")
        with open(f"{prefix}{rank}.json", "w") as f:
            json.dump(records, f)
