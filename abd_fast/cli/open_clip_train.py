"""open_clip's own trainer with abd_fast's fused loss (abd_fast/open_clip_train.py is the
`-m` entry point):

    python -m abd_fast.open_clip_train <open_clip_train flags>
    torchrun --nproc_per_node 8 -m abd_fast.open_clip_train <open_clip_train flags>

runs `open_clip_train.main.main` (the trainer shipped in the open_clip_torch wheel) with its
flags as they are. Three things differ, all set up before open_clip builds anything:
- its contrastive loss is `abd_fast.ops.ClipLoss` (`patch_open_clip`: open_clip's
  `create_loss` builds ours; same loss and gradients, no N x M logits);
- `--model` also accepts abd_fast's tiny configs (abd-tiny-rn, abd-tiny-vit);
- on a CPU device its DDP wrapper gets no `device_ids` (open_clip passes `[device]`, which
  torch rejects for a CPU module), so `torchrun` with gloo runs on CPU machines too.
Distillation, CoCa and SigLIP losses stay open_clip's.
"""
from __future__ import annotations

import sys


def _cpu_ddp():
    """torch's DistributedDataParallel, taking device_ids=[cpu device] as None."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class CpuTolerantDDP(DistributedDataParallel):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    return CpuTolerantDDP


def prepare():
    """Everything `main` changes before open_clip runs (see the module docstring)."""
    import open_clip
    import torch

    from abd_fast.models import CONFIG_DIR
    from abd_fast.ops import patch_open_clip
    patch_open_clip()
    open_clip.add_model_config(CONFIG_DIR)
    torch.nn.parallel.DistributedDataParallel = _cpu_ddp()


def main(argv=None) -> int:
    """Runs open_clip_train with `argv` (default: sys.argv[1:]); 1 when it reports an error
    (it returns -1, e.g. an experiment name that exists), else 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prepare()
    from open_clip_train.main import main as open_clip_main
    return 1 if open_clip_main(argv) == -1 else 0
