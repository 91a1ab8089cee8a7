"""The CPU output pool (csrc/cpu/output_pool.h): outputs of 1 MB or more reuse the blocks of
dead outputs, are never shared with a live tensor, and always hold the op's full result; a
block it does not know is left alone, and fork() while another thread holds its lock is safe."""
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from abd_fast.ops import (apply_perturbation, apply_trigger, cpu_pool_stats, reference,
                          release_cpu_pool, set_cpu_pool_limit)
from abd_fast.ops._backend import extension

pytestmark = pytest.mark.skipif(extension("_C") is not None,
                                reason=f"the C++ extension is not built: {extension('_C')}")

B, C, H, W = 11, 3, 97, 101  # fp32 output 1.3 MB: above the pool's 1 MB threshold
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


@pytest.fixture(autouse=True)
def default_limit():
    old = set_cpu_pool_limit(1024)
    yield
    set_cpu_pool_limit(old)


def pool_block(nbytes):
    """Bytes of the pool block behind nbytes: whole 2 MB pages."""
    return math.ceil(nbytes / 2**21) * 2**21


def images(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (B, C, H, W), dtype=torch.uint8, generator=g)


def case(kind, seed):
    """(ours(x), reference(x)) of one kind with fresh random parameters."""
    g = torch.Generator().manual_seed(seed)
    if kind == "patch":
        patch = torch.rand(C, 13, 9, generator=g)
        ys = torch.randint(-3, H - 3, (B,), generator=g)
        xs = torch.randint(-3, W - 3, (B,), generator=g)
        return (lambda x: apply_trigger(x, "patch", patch=patch, ys=ys, xs=xs, mean=MEAN, std=STD),
                lambda x: reference.image_op(x, "patch", patch, torch.stack([ys, xs], 1),
                                             mean=torch.tensor(MEAN), std=torch.tensor(STD)))
    if kind == "warp":
        grid = torch.rand(H, W, 2, generator=g) * 2 - 1
        return (lambda x: apply_trigger(x, "warp", grid=grid),
                lambda x: reference.image_op(x, "warp", grid))
    delta = (torch.rand(B, C, H, W, generator=g) - 0.5) * 0.1
    return (lambda x: apply_perturbation(x, delta, mode="linf", eps=0.03),
            lambda x: reference.image_op(x, "add", delta, eps=0.03))


def test_dead_outputs_are_reused_and_fully_overwritten():
    ours, _ = case("patch", 0)
    first = ours(images(0))
    ptr = first.data_ptr()
    del first
    before = cpu_pool_stats()
    assert before["cached_bytes"] >= B * C * H * W * 4
    for kind, seed in (("warp", 1), ("linf", 2), ("patch", 3)):
        ours, ref = case(kind, seed)
        x = images(seed)
        out = ours(x)
        assert out.data_ptr() == ptr  # the block of the dead output, newest first
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
        del out
    after = cpu_pool_stats()
    assert after["reused"] - before["reused"] == 3
    assert after["fresh"] == before["fresh"]


def test_live_outputs_are_never_shared():
    ours, ref = case("patch", 4)
    x = images(4)
    outs = [ours(x) for _ in range(3)]
    assert len({o.data_ptr() for o in outs}) == 3
    expected = ref(x)
    for o in outs:
        torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-5)


def test_backward_gradient_of_a_per_sample_delta_is_pooled():
    g = torch.Generator().manual_seed(5)
    x = images(5)
    gout = torch.randn(B, C, H, W, generator=g)
    delta = ((torch.rand(B, C, H, W, generator=g) - 0.5) * 0.1).requires_grad_()
    apply_perturbation(x, delta, mode="linf", eps=0.03).backward(gout)
    d_ref = delta.detach().clone().requires_grad_()
    reference.image_op(x, "add", d_ref, eps=0.03).backward(gout)
    torch.testing.assert_close(delta.grad, d_ref.grad, rtol=1e-5, atol=1e-6)
    live = cpu_pool_stats()["live_bytes"]
    assert live >= delta.grad.nbytes  # the gradient is a pooled block, alive while we hold it
    delta.grad = None
    assert cpu_pool_stats()["live_bytes"] == live - pool_block(d_ref.grad.nbytes)


def test_limit_zero_keeps_nothing_and_release_empties():
    ours, ref = case("linf", 6)
    x = images(6)
    ours(x)
    assert cpu_pool_stats()["cached_bytes"] > 0
    release_cpu_pool()
    assert cpu_pool_stats()["cached_bytes"] == 0
    assert set_cpu_pool_limit(0) == 1024
    fresh = cpu_pool_stats()["fresh"]
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    stats = cpu_pool_stats()
    assert stats["cached_bytes"] == 0 and stats["fresh"] == fresh + 2 and stats["limit_bytes"] == 0


def test_limit_evicts_the_oldest_blocks():
    set_cpu_pool_limit(0)  # start empty
    block = pool_block(B * C * H * W * 4)
    set_cpu_pool_limit(block / 2**20)  # room for one block of our size
    ours, _ = case("linf", 7)
    ours(images(7))
    big = apply_trigger(torch.randint(1, 256, (B, C, 2 * H + 60, W), dtype=torch.uint8), "none")
    del big  # larger than the limit: freed, and the kept block stays
    assert cpu_pool_stats()["cached_bytes"] == block
    set_cpu_pool_limit(3 * block / 2**20)
    big = apply_trigger(torch.randint(1, 256, (B, C, 2 * H + 60, W), dtype=torch.uint8), "none")
    big_block = pool_block(big.nbytes)
    del big  # fits beside the first
    assert cpu_pool_stats()["cached_bytes"] == block + big_block
    set_cpu_pool_limit(big_block / 2**20)  # the older (smaller) block goes
    assert cpu_pool_stats()["cached_bytes"] == big_block
    with pytest.raises(ValueError, match="must be >= 0"):
        set_cpu_pool_limit(-1)


def test_pooled_tensors_behave_like_any_tensor():
    ours, ref = case("patch", 8)
    x = images(8)
    out = ours(x)
    expected = ref(x)
    torch.testing.assert_close(pickle.loads(pickle.dumps(out)), expected, rtol=1e-5, atol=1e-5)
    out.resize_(2 * out.numel())  # storage grows through the pool
    torch.testing.assert_close(out[: expected.numel()].view_as(expected), expected,
                               rtol=1e-5, atol=1e-5)
    out.add_(1)  # writable
    live = cpu_pool_stats()["live_bytes"]
    out.untyped_storage().resize_(0)  # the block goes back to the pool at once
    assert cpu_pool_stats()["live_bytes"] == live - pool_block(out.nbytes)


def test_threads_share_the_pool():
    """Several threads allocating and freeing at once: every result right, nothing leaked."""
    release_cpu_pool()
    live = cpu_pool_stats()["live_bytes"]
    errors = []

    def work(seed):
        try:
            for i in range(6):
                ours, ref = case(("patch", "linf", "warp")[i % 3], seed * 10 + i)
                x = images(seed * 10 + i)
                torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cpu_pool_stats()["live_bytes"] == live
    assert cpu_pool_stats()["reused"] > 0


def test_an_unknown_block_is_counted_and_left_alone():
    """The deleter on a block the pool never handed out (as a double give-back would be):
    no crash, nothing freed, the counters unchanged but `unknown_blocks`. In a subprocess, so
    that a crash fails this test rather than the suite."""
    code = ("import json\nfrom abd_fast.ops import cpu_pool_stats\nfrom abd_fast import _C\n"
            "before = cpu_pool_stats()\n_C._pool_give_back_unknown()\n"
            "print(json.dumps([before, cpu_pool_stats()]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, after = json.loads(r.stdout.splitlines()[-1])
    assert after["unknown_blocks"] == before["unknown_blocks"] + 1
    assert {k: v for k, v in after.items() if k != "unknown_blocks"} == \
        {k: v for k, v in before.items() if k != "unknown_blocks"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")
def test_fork_while_another_thread_holds_the_lock():
    """A thread holds the pool's lock while the main thread forks (a DataLoader starting its
    workers while a training thread frees an output, say): the child can still use the pool
    (without the fork handlers its copy of the lock stays locked forever)."""
    from abd_fast import _C
    cpu_pool_stats()  # the pool exists, with its fork handlers
    hold_ms = 1500
    holder = threading.Thread(target=_C._pool_hold_lock, args=(hold_ms,))
    holder.start()
    time.sleep(0.3)  # the holder has taken the lock (it does so at once) and keeps it
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the pool's lock, then exit without Python's teardown
        code = 1
        try:
            cpu_pool_stats()
            release_cpu_pool()
            code = 0
        finally:
            os._exit(code)
    forked_after = time.monotonic() - t0
    holder.join()
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child deadlocked on the output pool's lock")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    # fork() waited for the holder to let go of the lock (it was held when fork was called)
    assert forked_after > 0.5 * (hold_ms / 1000 - 0.3), forked_after


@pytest.mark.parametrize("value", ["abc", "-5", "1.5"])
def test_bad_environment_variable_is_named(value):
    code = ("import torch\nfrom abd_fast.ops import apply_trigger\n"
            "apply_trigger(torch.full((4, 3, 256, 256), 7, dtype=torch.uint8), 'none')\n")
    env = dict(os.environ, ABD_FAST_CPU_POOL_MB=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "ABD_FAST_CPU_POOL_MB must be a whole number of megabytes" in r.stderr


def test_opcheck_and_compile_on_pooled_outputs():
    g = torch.Generator().manual_seed(9)
    x = images(9)
    delta = ((torch.rand(B, C, H, W, generator=g) - 0.5) * 0.1).requires_grad_()
    torch.library.opcheck(torch.ops.abd_fast.image_op,
                          (x, "add", delta, None, torch.rand(B, generator=g) > 0.5, 0.0, 0.03,
                           torch.tensor(MEAN), torch.tensor(STD), torch.float32))

    def step(x, delta):
        out = apply_perturbation(x, delta, mode="linf", eps=0.03, mean=MEAN, std=STD)
        return (out * out).mean()
    loss = torch.compile(step, fullgraph=True)(x, delta)
    (grad,) = torch.autograd.grad(loss, delta)
    loss_e = step(x, delta)
    (grad_e,) = torch.autograd.grad(loss_e, delta)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(grad, grad_e)
