"""Every training loss is safe under CUDA autocast, checked without a GPU.

Each loss runs under CPU bf16 autocast inside a dispatch mode that records the aten ops it
calls, forward and backward. Every recorded op that CUDA autocast handles (it has a kernel
for the AutocastCUDA dispatch key) is then called once more through that kernel, with the
recorded arguments: CUDA autocast's own rule, not a list of ours, decides, and for a refused
op (F.binary_cross_entropy) the kernel raises "unsafe to autocast". The backward of a refused
op has no autocast kernel of its own; it is listed explicitly. test_the_check_catches_*
shows the check failing on a deliberately bad loss.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from abd_fast.attacks.badclip import BadCLIPConfig, badclip_losses
from abd_fast.defenses import objectives as obj
from abd_fast.defenses.uap import (backdoor_loss, discriminator_loss, generator_loss,
                                   topology_loss)
from abd_fast.ops import clip_loss, info_nce

# Reached only through a refused forward op, so without an autocast kernel of its own.
REFUSED_BACKWARDS = {"aten::binary_cross_entropy_backward"}
AUTOCAST_CUDA = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA)


class RecordOps(TorchDispatchMode):
    """Remembers each aten op called below autocast, with (a copy of) its first arguments."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.calls:
            def copy(x):
                return x.detach().clone() if isinstance(x, torch.Tensor) else x
            self.calls[func] = (tree_map(copy, args), tree_map(copy, kwargs))
        return func(*args, **kwargs)


def refused_by_cuda_autocast(loss_fn) -> list[str]:
    """Runs loss_fn() (-> scalar) and its backward under CPU bf16 autocast; returns the ops it
    called that CUDA autocast refuses."""
    rec = RecordOps()
    with rec, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn()
    with rec:
        loss.backward()
    refused = []
    for func, (args, kwargs) in rec.calls.items():
        name = func.name()
        if name in REFUSED_BACKWARDS:
            refused.append(name)
        elif torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA"):
            try:  # CPU tensors: CUDA autocast casts nothing, the op just runs
                func.redispatch(AUTOCAST_CUDA, *args, **kwargs)
            except RuntimeError as e:
                if "unsafe to autocast" not in str(e):
                    raise
                refused.append(name)
    return sorted(refused)


def features(n=12, d=16, dtype=torch.float32):
    return F.normalize(torch.randn(n, d), dim=-1).to(dtype).requires_grad_()


def scale():
    return torch.tensor(10.0, requires_grad=True)


LOSSES = {
    "info_nce": lambda: info_nce(features(), features(), scale()),
    "clip_loss": lambda: clip_loss(features(), features(), scale()),
    "abd_align": lambda: obj.abd_objective(features(), features(), features(), features(),
                                           scale()),
    "abd_replace": lambda: obj.abd_objective(features(), features(), features(), features(),
                                             scale(), objective="replace"),
    "cleanclip": lambda: obj.cleanclip_objective(features(), features(), features(),
                                                 features(), scale()),
    "roclip_nearest": lambda: _roclip(epoch=1),
    "roclip_plain": lambda: _roclip(epoch=0),
    "uap_generator": lambda: _generator(),
    "uap_discriminator": lambda: discriminator_loss(torch.randn(12, requires_grad=True),
                                                    torch.randn(12, requires_grad=True)),
    "backdoor": lambda: backdoor_loss(features(), features()),
    "topology": lambda: topology_loss(features(), features()),
    "badclip": lambda: badclip_losses(features(), features(), features(1)[0], features(1)[0],
                                      features(), BadCLIPConfig())["loss"],
}


def _roclip(epoch):
    bank = obj.TextBank(32, 16)
    bank.update(features(20).detach())
    return obj.roclip_objective(features(), features(), scale(), bank, epoch)


def _generator():
    x = torch.randn(12, 3, 8, 8)
    loss, _ = generator_loss(torch.randn(12, requires_grad=True),
                             (x + 0.1 * torch.randn_like(x)).requires_grad_(), x,
                             features(), features(), features(),
                             backdoor=backdoor_loss(features(), features()))
    return loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_uses_no_op_cuda_autocast_refuses(name):
    assert refused_by_cuda_autocast(LOSSES[name]) == []


def test_the_check_catches_binary_cross_entropy():
    """AdvCLIP's form, sigmoid then F.binary_cross_entropy, which the UAP stage used before."""
    def bad():
        p = torch.sigmoid(torch.randn(12, requires_grad=True))
        return F.binary_cross_entropy(p, torch.ones_like(p))
    assert refused_by_cuda_autocast(bad) == ["aten::binary_cross_entropy",
                                             "aten::binary_cross_entropy_backward"]
    # ... and the form the stage uses now passes.
    def good():
        z = torch.randn(12, requires_grad=True)
        return F.binary_cross_entropy_with_logits(z, torch.ones_like(z))
    assert refused_by_cuda_autocast(good) == []
