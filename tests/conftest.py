import os
import zlib

# Triton kernels run on CPU tensors under the interpreter; it must be set before any
# @triton.jit function is defined. No test may reach the network.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
