import os
import zlib

# Triton kernels run on CPU tensors under the interpreter; it must be set before any
# @triton.jit function is defined. No test may reach the network.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Training commands compile their loops by default where that pays over a real stage; the
# tests' stages are tiny and a first compile takes 20-90 s, so they run eager unless a test
# asks for --compile (tests/test_compile.py does).
os.environ.setdefault("ABD_FAST_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def available_backends():
    """Fused backends runnable here: cpu, triton (interpreted on CPU), cuda with a GPU."""
    out = ["cpu", "triton"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def device_of(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) \
        else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    # Different random inputs per test, the same in every run.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any connection to a non-loopback address fails the test: nothing may download weights
    or data at run time (subprocesses, e.g. torchrun, are covered by HF_HUB_OFFLINE)."""
    import socket
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("localhost", "127.0.0.1", "::1", "") \
                and not host.startswith("/"):
            raise AssertionError(f"a test tried to reach the network: {address}")
        return real(self, address)
    monkeypatch.setattr(socket.socket, "connect", connect)


# What the suite writes at its peak (checkpoints of the tiny models; measured with passing
# tests' directories deleted, pyproject's tmp_path_retention_policy): see the header line.
# Measured 2026-12-06 (`du` of pytest's directory every 5 s over a whole run of a fresh clone
# of 3fb1d26; bench/suite_disk.sh does it): 1.15 GB, most of it the quick pipeline's stages
# (tests/test_pipeline.py); 2.06 GB before a module fixture stopped keeping its checkpoints to
# the session's end.
SUITE_PEAK_GB = 1.2


def pytest_report_header(config):
    """Free disk where the tests write: short of it, checkpoint writes fail (ENOSPC)."""
    import shutil
    import tempfile
    root = config.option.basetemp or tempfile.gettempdir()
    free = shutil.disk_usage(root).free / 2**30
    line = f"disk: {free:.1f} GB free in {root}; the suite writes up to ~{SUITE_PEAK_GB} GB"
    if free < SUITE_PEAK_GB:
        line += (" -- NOT ENOUGH: tests that save checkpoints will fail; free space or set "
                 "TMPDIR (or --basetemp) to a larger disk")
    return line
