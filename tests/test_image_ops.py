"""Fused image ops against the plain-PyTorch reference, on every backend runnable here."""
import math

import pytest
import torch

from abd_fast.ops import apply_perturbation, apply_trigger, normalize_images
from abd_fast.ops import reference
from conftest import available_backends, device_of

B, C, H, W = 7, 3, 37, 41
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)  # CLIP's


def make_images(dtype, device):
    if dtype == torch.uint8:
        return torch.randint(1, 256, (B, C, H, W), dtype=torch.uint8, device=device)
    # slightly outside [0,1] as well, so that the clamp of unselected rows is exercised
    return (torch.rand(B, C, H, W, device=device) * 1.1 - 0.05).to(dtype)


def make_case(kind, per_sample, device, dtype=torch.float32):
    """(src, kwargs for apply_trigger, kwargs for reference.image_op)."""
    lead = (B,) if per_sample else ()
    if kind == "patch":
        src = (torch.rand(*lead, C, 9, 11, device=device) * 1.2 - 0.1).to(dtype)
        ys = torch.randint(-4, H - 2, (B,), device=device)  # some boxes cross the border
        xs = torch.randint(-4, W - 2, (B,), device=device)
        return src, dict(patch=src, ys=ys, xs=xs), dict(loc=torch.stack([ys, xs], 1))
    if kind in ("blend", "add"):
        src = ((torch.rand(*lead, C, H, W, device=device) - 0.5) * 0.8).to(dtype)
        alpha = 0.2 if kind == "blend" else 0.0
        return src, dict(pattern=src, alpha=alpha), dict(alpha=alpha)
    if kind == "warp":
        src = (torch.rand(*lead, H, W, 2, device=device) * 2.2 - 1.1).to(dtype)
        return src, dict(grid=src), {}
    return None, {}, {}


def tol(out_dtype):
    return dict(rtol=1e-2, atol=1e-2) if out_dtype in (torch.bfloat16, torch.float16) \
        else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("kind", ["none", "patch", "blend", "add", "warp"])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_trigger_forward(backend, kind, in_dtype, out_dtype):
    dev = device_of(backend)
    images = make_images(in_dtype, dev)
    for per_sample in (False, True):
        for rows in (None, torch.rand(B, device=dev) > 0.4):
            for norm in (False, True):
                src, kw, ref_kw = make_case(kind, per_sample, dev)
                mean, std = (MEAN, STD) if norm else (None, None)
                out = apply_trigger(images, kind, rows=rows, mean=mean, std=std,
                                    out_dtype=out_dtype, backend=backend, **kw)
                ref = reference.image_op(
                    images, kind, src, rows=rows, eps=math.inf,
                    mean=torch.tensor(MEAN) if norm else None,
                    std=torch.tensor(STD) if norm else None, out_dtype=out_dtype,
                    **{k: v.to(dev) if torch.is_tensor(v) else v for k, v in ref_kw.items()})
                assert out.dtype == out_dtype and out.shape == images.shape
                torch.testing.assert_close(out.float(), ref.float(), **tol(out_dtype))
                if rows is not None:  # unselected rows carry only the clean image
                    clean = normalize_images(images, mean, std, out_dtype, backend=backend)
                    assert torch.equal(out[~rows], clean[~rows])


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("kind", ["patch", "blend", "add"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_trigger_gradient(backend, kind, out_dtype):
    dev = device_of(backend)
    images = make_images(torch.uint8, dev)
    rows = torch.rand(B, device=dev) > 0.3
    for per_sample in (False, True):
        src, kw, ref_kw = make_case(kind, per_sample, dev)
        src.requires_grad_(True)
        kw = {k: (src if v is src else v) for k, v in kw.items()}
        out = apply_trigger(images, kind, rows=rows, mean=MEAN, std=STD, out_dtype=out_dtype,
                            backend=backend, **kw)
        upstream = torch.randn(out.shape, device=dev)
        (grad,) = torch.autograd.grad((out.float() * upstream).sum(), src)
        ref = reference.image_op(images, kind, src, rows=rows, mean=torch.tensor(MEAN, device=dev),
                                 std=torch.tensor(STD, device=dev), out_dtype=out_dtype,
                                 **{k: v.to(dev) if torch.is_tensor(v) else v
                                    for k, v in ref_kw.items()})
        (ref_grad,) = torch.autograd.grad((ref.float() * upstream).sum(), src)
        assert grad.shape == src.shape and grad.abs().sum() > 0
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("mode", ["linf", "patch"])
def test_perturbation(backend, mode):
    dev = device_of(backend)
    images = make_images(torch.uint8, dev)
    if mode == "linf":
        delta = ((torch.rand(C, H, W, device=dev) - 0.5) * 0.1).requires_grad_(True)
        kw, ref_kw = dict(eps=0.03), dict(kind="add", eps=0.03)
    else:
        delta = torch.rand(C, 8, 8, device=dev).requires_grad_(True)
        kw = dict(box=(H - 10, W - 9))
        ref_kw = dict(kind="patch", loc=torch.tensor([[H - 10, W - 9]] * B, device=dev))
    out = apply_perturbation(images, delta, mode=mode, mean=MEAN, std=STD, backend=backend, **kw)
    ref = reference.image_op(images, src=delta, mean=torch.tensor(MEAN, device=dev),
                             std=torch.tensor(STD, device=dev), **ref_kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(out.shape, device=dev)
    g = torch.autograd.grad((out * upstream).sum(), delta)[0]
    g_ref = torch.autograd.grad((ref * upstream).sum(), delta)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_perturbation_properties():
    """L-inf stays within eps of the clean image; patch mode changes only its box."""
    images = make_images(torch.uint8, "cpu")
    clean = normalize_images(images, None, None)
    delta = (torch.rand(C, H, W) - 0.5)
    out = apply_perturbation(images, delta, mode="linf", eps=0.03)
    assert (out - clean).abs().max() <= 0.03 + 1e-6
    assert (out - clean).abs().max() > 0.02
    patch = torch.rand(C, 6, 5)
    out = apply_perturbation(images, patch, mode="patch", box=(30, 33))
    changed = (out != clean).any(dim=(0, 1))
    assert changed[30:36, 33:38].any() and not changed[:30].any() and not changed[:, :33].any()
    assert not changed[36:].any() and not changed[:, 38:].any()


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("kind", ["patch", "blend", "add"])
def test_trigger_gradcheck_float64(backend, kind):
    dev = device_of(backend)
    images = torch.rand(3, 3, 6, 7, dtype=torch.float64, device=dev)
    rows = torch.tensor([True, False, True], device=dev)
    if kind == "patch":
        src = torch.rand(3, 3, 4, dtype=torch.float64, device=dev) * 0.8 + 0.1
        fn = lambda s: apply_trigger(images, "patch", patch=s, ys=torch.tensor([1, 0, -1]),
                                     xs=torch.tensor([2, 5, 0]), rows=rows, mean=MEAN, std=STD,
                                     out_dtype=torch.float64, backend=backend)
    else:
        # away from the clamp kinks, where the derivative is not defined
        src = (torch.rand(3, 6, 7, dtype=torch.float64, device=dev) - 0.5) * 0.04
        images = images * 0.8 + 0.1
        fn = lambda s: apply_trigger(images, kind, pattern=s, alpha=0.3, rows=rows, mean=MEAN,
                                     std=STD, out_dtype=torch.float64, backend=backend)
    assert torch.autograd.gradcheck(fn, (src.requires_grad_(True),))


def op_args(kind, dev):
    images = make_images(torch.uint8, dev)
    src, kw, ref_kw = make_case(kind, False, dev)
    loc = ref_kw.get("loc")
    return (images, kind, src, loc, torch.rand(B, device=dev) > 0.5, 0.2, math.inf,
            torch.tensor(MEAN, device=dev), torch.tensor(STD, device=dev), torch.float32)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("kind", ["patch", "add", "warp"])
def test_opcheck(backend, kind):
    dev = device_of(backend)
    op = torch.ops.abd_fast.image_op_triton if backend == "triton" else torch.ops.abd_fast.image_op
    args = list(op_args(kind, dev))
    if kind != "warp":
        args[2] = args[2].requires_grad_(True)
    torch.library.opcheck(op, tuple(args))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compile_fullgraph(backend):
    images = make_images(torch.uint8, "cpu")
    patch = torch.rand(C, 5, 5, requires_grad=True)
    ys, xs = torch.randint(0, H - 5, (B,)), torch.randint(0, W - 5, (B,))

    def step(images, patch):
        x = apply_trigger(images, "patch", patch=patch, ys=ys, xs=xs, mean=MEAN, std=STD,
                          backend=backend)
        return (x * x).mean()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(images, patch)
    (g,) = torch.autograd.grad(loss, patch)
    loss_e = step(images, patch)
    (g_e,) = torch.autograd.grad(loss_e, patch)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, g_e)


def test_bad_arguments():
    images = make_images(torch.uint8, "cpu")
    with pytest.raises(ValueError, match="needs patch"):
        apply_trigger(images, "patch", ys=0, xs=0)
    with pytest.raises(ValueError, match="alpha"):
        apply_trigger(images, "blend", pattern=torch.rand(C, H, W), alpha=1.5)
    with pytest.raises(ValueError, match="unknown trigger kind"):
        apply_trigger(images, "sparkle")
    with pytest.raises(ValueError, match="channels"):
        normalize_images(images, (0.5, 0.5), (0.2, 0.2))
    with pytest.raises(RuntimeError, match="match the image size"):
        apply_trigger(images, "add", pattern=torch.rand(C, H, W + 1))
    with pytest.raises(ValueError, match="eps must be positive"):
        apply_perturbation(images, torch.rand(C, H, W), mode="linf", eps=-0.1)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("shape", [(2, 3, 1, 5), (2, 3, 5, 1), (1, 1, 2, 2), (3, 3, 17, 9)])
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32])
def test_warp_edge_sizes(backend, shape, in_dtype):
    """Planes of one row or column, and grids reaching outside the image (zero padding)."""
    dev = device_of(backend)
    b, c, h, w = shape
    images = (torch.randint(1, 256, shape, dtype=torch.uint8, device=dev) if in_dtype == torch.uint8
              else torch.rand(shape, device=dev))
    grid = torch.rand(h, w, 2, device=dev) * 2.6 - 1.3
    out = apply_trigger(images, "warp", grid=grid, backend=backend)
    ref = reference.image_op(images, "warp", grid)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_warp_planes_of_several_tap_blocks(per_sample):
    """The CPU warp kernel computes taps in blocks of 64K pixels: a plane of more than one
    block (257 x 263), shared and per-sample grids, some rows unselected, uint8 -> fp32."""
    b, c, h, w = 3, 2, 257, 263
    images = torch.randint(1, 256, (b, c, h, w), dtype=torch.uint8)
    grid = torch.rand(*((b,) if per_sample else ()), h, w, 2) * 2.2 - 1.1
    rows = torch.tensor([True, False, True])
    mean, std = (0.4, 0.5), (0.25, 0.3)
    out = apply_trigger(images, "warp", grid=grid, rows=rows, mean=mean, std=std, backend="cpu")
    ref = reference.image_op(images, "warp", grid, rows=rows, mean=torch.tensor(mean),
                             std=torch.tensor(std))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 37, 41), (2, 3, 64, 64)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_warp_smooth_grid(shape, per_sample):
    """A WaNet-like grid (identity plus a smooth shift of under a pixel), where the CPU kernel
    reads the taps of 16 neighbouring pixels from one 64-byte window of each row instead of
    gathering them; more channels than it does at once (5 > 4), rows of 41 pixels (groups of
    16 that straddle two rows), and the last plane of the batch (done without vectors)."""
    b, c, h, w = shape
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    lead = (b,) if per_sample else (1,)
    phase = torch.rand(*lead, 1, 1) * 6.28
    shift_x = 0.9 * torch.sin(3 * ys + phase) * 2 / (w - 1)  # under a pixel
    shift_y = 0.9 * torch.cos(2 * xs + phase) * 2 / (h - 1)
    grid = torch.stack([xs + shift_x, ys + shift_y], -1)
    grid = grid if per_sample else grid[0]
    rows = torch.rand(b) > 0.3
    mean, std = tuple(torch.rand(c).tolist()), tuple((torch.rand(c) * 0.5 + 0.2).tolist())
    out = apply_trigger(images, "warp", grid=grid, rows=rows, mean=mean, std=std, backend="cpu")
    ref = reference.image_op(images, "warp", grid, rows=rows, mean=torch.tensor(mean),
                             std=torch.tensor(std))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["patch", "blend", "add"])
def test_shared_src_gradient_is_deterministic(kind):
    """The gradient of a shared patch/pattern sums over the batch in a fixed order: bitwise
    the same on 1 and 2 threads and across calls."""
    images = torch.randint(0, 256, (33, C, H, W), dtype=torch.uint8)
    src, kw, _ = make_case(kind, False, "cpu")
    src.requires_grad_(True)
    kw = {k: (src if v is src else v) for k, v in kw.items()}
    if kind == "patch":
        kw.update(ys=torch.randint(-4, H - 2, (33,)), xs=torch.randint(-4, W - 2, (33,)))
    upstream = torch.randn(images.shape)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            out = apply_trigger(images, kind, mean=MEAN, std=STD, backend="cpu", **kw)
            grads.append(torch.autograd.grad((out * upstream).sum(), src)[0])
    finally:
        torch.set_num_threads(threads)
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("backend", available_backends())
def test_warp_refuses_a_grid_that_requires_grad_at_once(backend):
    """The fused warp has no grid gradient: the call itself fails with a clear error (before,
    it was accepted and failed later, in backward). Without grad mode, or with the grid
    detached, the same call runs; the reference backend differentiates through the grid."""
    dev = device_of(backend)
    images = make_images(torch.uint8, dev)
    grid, kw, _ = make_case("warp", False, dev)
    grid.requires_grad_(True)
    with pytest.raises(ValueError, match="no gradient with respect to its grid"):
        apply_trigger(images, "warp", grid=grid, backend=backend)
    op = torch.ops.abd_fast.image_op_triton if backend == "triton" else torch.ops.abd_fast.image_op
    args = list(op_args("warp", dev))
    args[2] = args[2].requires_grad_(True)
    with pytest.raises(ValueError, match="grid.detach()"):
        op(*args)
    with torch.no_grad():
        out = apply_trigger(images, "warp", grid=grid, backend=backend)
    torch.testing.assert_close(out, apply_trigger(images, "warp", grid=grid.detach(),
                                                  backend=backend))
    ref = apply_trigger(images, "warp", grid=grid, backend="reference")
    (g,) = torch.autograd.grad(ref.sum(), grid)
    assert g.abs().sum() > 0
