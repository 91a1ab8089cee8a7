"""Builds abd_fast and its C++ extensions.

abd_fast._C       schemas of every op (TORCH_LIBRARY) and the CPU kernels; always built.
abd_fast._C_cuda  CUDA kernels for the same ops; built when nvcc, a CUDA build of torch and
                  a GPU are present. ABD_FAST_BUILD_CUDA=1 builds it without a GPU (and
                  fails if nvcc is missing), =only builds it without _C (whose build is
                  already installed: tests/test_cuda_build.py), =0 never builds it.
The Triton kernels live in kernels/ and install as abd_fast.kernels.
"""
import glob
import json
import os
import platform
import shutil
import warnings

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from `which nvcc`; where nvcc is a wrapper script (/usr/local/bin)
# that guess lacks the headers. The toolkit's own directory is the safer default.
if not os.environ.get("CUDA_HOME") and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))

def _simd_flags():
    """The widest of AVX-512 (F/BW/VL/DQ, + VBMI) or AVX2/FMA/F16C the build machine has: two to
    three times the throughput of the SSE2 baseline in the image kernels. The flags are
    recorded in abd_fast/_build_config.json, which abd_fast checks before loading the
    extension, so a build moved to an older CPU fails with a message instead of an illegal
    instruction. ABD_FAST_PORTABLE=1 builds for any x86-64."""
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("ABD_FAST_PORTABLE") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            have = set(next((line.split(":", 1)[1].split() for line in f
                             if line.startswith("flags")), []))
    except OSError:
        return []
    avx2 = ["avx2", "fma", "f16c"]
    avx512 = avx2 + ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
    avx512_vbmi = avx512 + ["avx512vbmi"]  # byte permutes: the CPU warp kernel's fast path
    for tier in (avx512_vbmi, avx512, avx2):
        if set(tier) <= have:
            return tier
    return []


SIMD = _simd_flags()
with open(os.path.join(ROOT, "abd_fast", "_build_config.json"), "w") as f:
    json.dump({"cpu_flags": SIMD}, f)
# -fno-trapping-math lets the compiler turn branches into selects (vectorizable); results
# are unchanged (no reassociation, no fast-math).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"] + [f"-m{flag}" for flag in SIMD]


def _cuda_wanted():
    """CUDA kernels are built where a GPU is visible, or on request (ABD_FAST_BUILD_CUDA=1,
    e.g. on a GPU cluster's login node); tests/test_cuda_build.py builds them where nvcc is."""
    flag = os.environ.get("ABD_FAST_BUILD_CUDA", "auto")
    have = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which(
        os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    if flag == "0":
        return False
    if flag in ("1", "only"):
        if not have:
            raise RuntimeError(f"ABD_FAST_BUILD_CUDA={flag} but nvcc or a CUDA build of torch is missing "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return True
    if have and not torch.cuda.is_available():
        warnings.warn("abd_fast: no GPU visible; building the CPU kernels only "
                      "(ABD_FAST_BUILD_CUDA=1 builds the CUDA kernels too)")
    return have and torch.cuda.is_available()


def _nvidia_include_dirs():
    # The pip CUDA wheels ship headers (cuda_bf16.h, cublas) under site-packages/nvidia/*/include.
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for base in (spec.submodule_search_locations if spec else []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def extensions():
    only_cuda = os.environ.get("ABD_FAST_BUILD_CUDA") == "only"
    exts = [] if only_cuda else [CppExtension(
        "abd_fast._C",
        sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    if cuda_sources and _cuda_wanted():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        exts.append(CUDAExtension(
            "abd_fast._C_cuda",
            sources=cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_include_dirs(),
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "-lineinfo"]},
        ))
    return exts


setup(
    name="abd_fast",
    version="0.1.0",
    description="Fast backdoor attacks on CLIP and Adversarial Backdoor Defense (ABD)",
    packages=find_packages(include=["abd_fast", "abd_fast.*"]) + ["abd_fast.kernels"],
    package_dir={"abd_fast.kernels": "kernels"},
    package_data={"abd_fast": ["model_configs/*.json", "_build_config.json", "data/*.cc"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
