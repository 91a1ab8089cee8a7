"""The CUDA kernels compile and register, checked without a GPU.

Where nvcc and a CUDA build of torch are present, builds abd_fast._C_cuda alone with
`setup.py build_ext` (ABD_FAST_BUILD_CUDA=only: the checkout's abd_fast._C, which
scripts/setup.sh rebuilds whenever csrc/ changes, is the CPU half) into a temporary
--build-lib, so the in-place extension is left alone; the objects go to build/cuda-check, so
reruns are incremental (ninja). Then, in a fresh interpreter, loads both libraries and checks
that every op has a CUDA kernel, and that the fatbinary holds sm_80 and sm_90 code.
"""
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("image_op", "image_op_backward", "contrastive_forward", "contrastive_backward")
ARCHS = ("sm_80", "sm_90")


def _cuda_home():
    """CUDA_HOME if set, else /usr/local/cuda, else torch's guess. (torch derives its guess
    from `which nvcc`, which is /usr/local when /usr/local/bin/nvcc is a wrapper script; the
    toolkit's headers are not under /usr/local/include then.)"""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME or "/usr/local/cuda"


def _nvcc():
    nvcc = os.path.join(_cuda_home(), "bin", "nvcc")
    return nvcc if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else None


def _cuobjdump():
    """CUDA_HOME/bin, then PATH, then the copy Triton ships with its NVIDIA backend."""
    cands = [os.path.join(_cuda_home(), "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                  "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _tail(text, n=200):
    lines = text.splitlines()
    return "\n".join(lines[-n:])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build; the CUDA kernels need a "
                    "CUDA build of torch to compile")
    if _nvcc() is None:
        pytest.skip(f"nvcc not found under CUDA_HOME={_cuda_home()} (set CUDA_HOME to a CUDA "
                    "toolkit to build the CUDA kernels)")
    cpu_lib = glob.glob(os.path.join(ROOT, "abd_fast", "_C.*.so"))
    if not cpu_lib:
        pytest.fail(f"no abd_fast/_C*.so in {ROOT}: run `bash scripts/setup.sh` to build the "
                    "CPU extension first", pytrace=False)
    build_lib = tmp_path_factory.mktemp("abd_fast_cuda_build")
    env = dict(os.environ)
    env.update(ABD_FAST_BUILD_CUDA="only", CUDA_HOME=_cuda_home(), TORCH_CUDA_ARCH_LIST="8.0;9.0")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(build_lib),
           "--build-temp", os.path.join("build", "cuda-check")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"building the CUDA extension failed ({' '.join(cmd)}, exit "
                    f"{proc.returncode}):\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}",
                    pytrace=False)
    found = glob.glob(os.path.join(str(build_lib), "abd_fast", "_C_cuda*.so"))
    assert found, f"the build produced no abd_fast/_C_cuda*.so under {build_lib}:\n" \
        f"{_tail(proc.stdout, 40)}"
    return {"_C": cpu_lib[0], "_C_cuda": found[0]}


def test_cuda_kernels_registered(built):
    code = textwrap.dedent("""
        import sys
        import torch
        torch.ops.load_library(sys.argv[1])
        torch.ops.load_library(sys.argv[2])
        ops = sys.argv[3].split(",")
        missing = [op for op in ops
                   if not torch._C._dispatch_has_kernel_for_dispatch_key("abd_fast::" + op, "CUDA")]
        cpu_missing = [op for op in ops
                       if not torch._C._dispatch_has_kernel_for_dispatch_key("abd_fast::" + op, "CPU")]
        print("missing CUDA:", missing, "missing CPU:", cpu_missing)
        sys.exit(1 if missing or cpu_missing else 0)
    """)
    # A fresh interpreter outside the checkout, so the in-place abd_fast is not imported;
    # LD_BIND_NOW makes every undefined symbol (e.g. cublasGemmEx, which comes from libcublas
    # through libtorch_cuda) resolve at load time.
    env = dict(os.environ, LD_BIND_NOW="1")
    proc = subprocess.run([sys.executable, "-c", code, built["_C"], built["_C_cuda"], ",".join(OPS)],
                          cwd=os.path.dirname(built["_C"]), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"loading the built extensions failed:\n{proc.stdout}\n{proc.stderr}"


def test_cuda_code_for_a100_and_h100(built):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA_HOME/bin, PATH or Triton's NVIDIA backend)")
    proc = subprocess.run([tool, "--list-elf", built["_C_cuda"]], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{tool} --list-elf failed:\n{proc.stdout}\n{proc.stderr}"
    for arch in ARCHS:
        assert f".{arch}." in proc.stdout, f"no {arch} code in {built['_C_cuda']}:\n{proc.stdout}"
