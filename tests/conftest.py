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
