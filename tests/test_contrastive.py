"""Fused InfoNCE / CLIP loss against the reference and open_clip, on every backend here."""
import pytest
import torch
import torch.nn.functional as F

from abd_fast.ops import ClipLoss, clip_loss, info_nce
from abd_fast.ops import reference
from conftest import available_backends, device_of

N, M, D = 37, 53, 129


def features(n, d, dtype, device, normalize=True):
    x = torch.randn(n, d, device=device, dtype=torch.float64)
    if normalize:
        x = F.normalize(x, dim=-1)
    return x.to(dtype)


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_and_gradients(backend, dtype, symmetric):
    dev = device_of(backend)
    n = N
    m = N if symmetric else M
    offset = 0 if symmetric else 11
    q = features(n, D, dtype, dev).requires_grad_(True)
    k = features(m, D, dtype, dev).requires_grad_(True)
    scale = torch.tensor(14.3, dtype=dtype, device=dev, requires_grad=True)
    if symmetric:
        ours, ref = clip_loss(q, k, scale, backend=backend), reference.clip_loss(q, k, scale)
    else:
        ours = info_nce(q, k, scale, offset, backend=backend)
        ref = reference.info_nce(q, k, scale, offset)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours, ref, **tol)
    for g, gr in zip(grads(ours, q, k, scale), grads(ref, q, k, scale)):
        torch.testing.assert_close(g, gr, **tol)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bound(backend, dtype):
    """In bf16/fp16 our error is at most twice plain PyTorch's in that dtype, both measured
    against fp64 on the same (rounded) inputs, as flash-attention's tests do."""
    dev = device_of(backend)
    q, k = features(N, D, dtype, dev), features(N, D, dtype, dev)
    s = torch.tensor(30.0, device=dev)
    q64, k64 = q.double().requires_grad_(True), k.double().requires_grad_(True)
    exact_loss = reference.clip_loss(q64, k64, s.double())
    exact = [exact_loss, *grads(exact_loss, q64, k64)]
    q, k = q.requires_grad_(True), k.requires_grad_(True)
    ours_loss = clip_loss(q, k, s, backend=backend)
    ours = [ours_loss, *grads(ours_loss, q, k)]
    # plain PyTorch in the low precision: logits and cross-entropy in dtype
    qp, kp = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    logits = s.to(dtype) * qp @ kp.T
    lab = torch.arange(N, device=dev)
    plain_loss = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
    plain = [plain_loss, *grads(plain_loss, qp, kp)]
    for o, p, e in zip(ours, plain, exact):
        err_o = (o.double() - e.double()).abs().max().item()
        err_p = (p.double() - e.double()).abs().max().item()
        assert err_o <= 2 * err_p + 1e-6, (err_o, err_p)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_float64(backend, symmetric):
    dev = device_of(backend)
    q = features(5, 7, torch.float64, dev, normalize=False).requires_grad_(True)
    k = features(5 if symmetric else 9, 7, torch.float64, dev, normalize=False).requires_grad_(True)
    s = torch.tensor(2.5, dtype=torch.float64, device=dev, requires_grad=True)
    fn = (lambda a, b, c: clip_loss(a, b, c, backend=backend)) if symmetric else \
        (lambda a, b, c: info_nce(a, b, c, 3, backend=backend))
    assert torch.autograd.gradcheck(fn, (q, k, s))


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (3, 300, 17), (300, 300, 8), (130, 130, 600)])
def test_shapes(backend, n, m, d):
    """Tile edges: one row, more columns than a tile, more rows than a tile, large D."""
    dev = device_of(backend)
    q, k = features(n, d, torch.float32, dev), features(m, d, torch.float32, dev)
    s = torch.tensor(20.0, device=dev)
    torch.testing.assert_close(info_nce(q, k, s, m - n, backend=backend),
                               reference.info_nce(q, k, s, m - n), rtol=1e-5, atol=1e-5)
    if n == m:
        torch.testing.assert_close(clip_loss(q, k, s, backend=backend),
                                   reference.clip_loss(q, k, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck(backend, symmetric):
    dev = device_of(backend)
    op = torch.ops.abd_fast.contrastive_forward_triton if backend == "triton" \
        else torch.ops.abd_fast.contrastive_forward
    q = features(N, D, torch.float32, dev).requires_grad_(True)
    k = features(N if symmetric else M, D, torch.float32, dev).requires_grad_(True)
    s = torch.tensor(10.0, device=dev, requires_grad=True)
    torch.library.opcheck(op, (q, k, s, 0 if symmetric else 5, symmetric))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph(backend):
    q = features(N, D, torch.float32, "cpu").requires_grad_(True)
    k = features(N, D, torch.float32, "cpu").requires_grad_(True)
    s = torch.tensor(10.0, requires_grad=True)

    def step(q, k, s):
        return (clip_loss(q * 2, k, s.exp(), backend=backend)
                + info_nce(q[:20], k, 3.0, 7, backend=backend))

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if backend == "cpu"
                             else "aot_eager")
    out = compiled(q, k, s)
    ref = step(q, k, s)
    torch.testing.assert_close(out, ref)
    for g, gr in zip(grads(out, q, k, s), grads(ref, q, k, s)):
        torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("backend", available_backends())
def test_matches_open_clip(backend):
    from open_clip.loss import ClipLoss as OpenClipLoss
    dev = device_of(backend)
    img = features(N, D, torch.float32, dev).requires_grad_(True)
    txt = features(N, D, torch.float32, dev).requires_grad_(True)
    s = torch.tensor(25.0, device=dev, requires_grad=True)
    ours = ClipLoss(backend=backend)(img, txt, s, output_dict=True)["contrastive_loss"]
    theirs = OpenClipLoss()(img, txt, s, output_dict=True)["contrastive_loss"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for g, gr in zip(grads(ours, img, txt, s), grads(theirs, img, txt, s)):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="offset"):
        info_nce(q, k, 1.0, offset=3)
    with pytest.raises(ValueError, match="one D"):
        info_nce(q, torch.randn(6, 9), 1.0)
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(q, k, 1.0)
    with pytest.raises(ValueError, match="one value"):
        clip_loss(q, q, torch.ones(2))
    with pytest.raises(ValueError, match="unknown backend"):
        clip_loss(q, q, 1.0, backend="fpga")


def test_patch_open_clip(monkeypatch):
    import argparse

    import open_clip
    import open_clip.factory
    import open_clip.loss

    from abd_fast.ops import patch_open_clip
    for module in (open_clip, open_clip.factory, open_clip.loss):  # undone after the test
        monkeypatch.setattr(module, "ClipLoss", module.ClipLoss)
    patch_open_clip()
    args = argparse.Namespace(distill=False, model="ViT-B-32", siglip=False, local_loss=False,
                              gather_with_grad=False, rank=0, world_size=1, horovod=False)
    assert isinstance(open_clip.factory.create_loss(args), ClipLoss)
    assert open_clip.ClipLoss is ClipLoss and open_clip.loss.ClipLoss is ClipLoss
