"""DALI engine: the epoch plan is fed through `fn.external_source` (encoded bytes read by us,
crop boxes, flips, manifest positions); DALI decodes only the crop (`decoders.image_slice`,
on the GPU with device="mixed" when CUDA is available, else on CPU with device_id=None),
resizes (bicubic, antialiased), flips and transposes to CHW.

On CPU the resize + flip + CHW step is our DALI operator `AbdResizeCHW`
(dali_resize.cc: Pillow's filter and fixed-point arithmetic, vectorizable passes), built
once with the system's C++ compiler into the cache and loaded as a DALI plugin: DALI 2.4's
own CPU fn.resize is 2-4x slower than Pillow, which made this engine slower than the torch
engine (docs/PERFORMANCE.md). The decoded slice is the crop widened by the filter's
support, so the taps near the crop's edges see the same pixels as PIL's `resize(box=...)`.
Without a compiler or the CUDA headers DALI's includes need, fn.resize +
crop_mirror_normalize are used (and a warning says why).

Why not fn.readers.webdataset / fn.readers.file: the webdataset reader does not return the
sample key (our id), neither reader can be told to skip samples found corrupt (one corrupt
image aborts DALI's decoder, hence the pipeline), and their shuffling differs from the torch
engine's. Reading the bytes ourselves costs one pread per sample. See docs/DATA.md.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from .loader import Loader, decode_batch
from .validate import cache_dir

log = logging.getLogger("abd_fast.data")
_PLUGIN_SRC = Path(__file__).with_name("dali_resize.cc")
_plugin_state: dict = {}


def _cuda_include() -> str | None:
    """A folder with cuda_runtime.h and crt/host_config.h (DALI's headers include them)."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include/crt/host_config.h").exists():
            return str(Path(root) / "include")
    return None


def resize_plugin() -> bool:
    """Build (once per source, DALI version and CPU; cached in $ABD_FAST_CACHE/dali-plugin)
    and load the AbdResizeCHW operator. False, with a warning, when it cannot be built."""
    if "ok" in _plugin_state:
        return _plugin_state["ok"]
    import nvidia.dali as dali
    import nvidia.dali.plugin_manager as plugin_manager
    import nvidia.dali.sysconfig as sysconfig
    try:
        with open("/proc/cpuinfo") as f:  # -march=native: one build per CPU model
            cpu = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        cpu = ""
    cxx = os.environ.get("CXX", "g++")
    key = hashlib.blake2b(_PLUGIN_SRC.read_bytes() + dali.__version__.encode() + cpu.encode()
                          + cxx.encode(), digest_size=8).hexdigest()
    lib = cache_dir() / "dali-plugin" / f"libabd_resize_{key}.so"
    why = None
    if not lib.exists():
        cuda = _cuda_include()
        if shutil.which(cxx) is None:
            why = f"no C++ compiler ({cxx})"
        elif cuda is None:
            why = "no CUDA headers (set CUDA_HOME; DALI's C++ headers include cuda_runtime.h)"
        else:
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / lib.name
                cmd = [cxx, "-std=c++20", "-O3", "-march=native", "-shared", "-fPIC", "-w",
                       *sysconfig.get_compile_flags(), f"-I{cuda}", str(_PLUGIN_SRC),
                       *sysconfig.get_link_flags(), "-o", str(out)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode == 0:
                    os.replace(out, lib)  # atomic: concurrent builders agree
                else:
                    why = f"build failed: {' '.join(cmd)}\n{r.stderr[-2000:]}"
    if why is None:
        try:
            plugin_manager.load_library(str(lib))
        except Exception as e:  # noqa: BLE001
            why = f"cannot load {lib}: {e}"
    if why:
        log.warning("DALI engine: using DALI's fn.resize on CPU (slower than the torch "
                    "engine) because the AbdResizeCHW operator is unavailable: %s", why)
    _plugin_state["ok"] = why is None
    return _plugin_state["ok"]


class _Feeder:
    """Batches of the plan as external_source inputs; restarts when DALI calls iter().
    With `dims` (int64 [N, 2] image width, height per manifest position) the slice to decode
    is the crop widened by the bicubic filter's support (2 source pixels per output pixel
    of the larger of 1 and the scale, +2 for rounding), cut at the image's edges, and a
    sixth output gives AbdResizeCHW the box in the slice's pixels and the flip."""
    def __init__(self, manifest, plan, size, dims=None):
        self.manifest, self.plan, self.size, self.dims, self.k = manifest, plan, size, dims, 0

    def __iter__(self):
        self.k = 0
        return self

    def __next__(self):
        if self.k >= len(self.plan):
            raise StopIteration
        p = self.plan[self.k]
        self.k += 1
        data = [self._read(i) for i in p.positions.tolist()]
        if self.dims is not None:
            # Uniform per-sample shapes go in as one [B, ...] array each: DALI then converts
            # one array per input instead of B (the feeder runs on the consumer's thread).
            box = p.boxes.astype(np.int64)
            margin = np.ceil(2 * np.maximum(box[:, 2:] / self.size, 1)).astype(np.int64) + 2
            lo = np.maximum(box[:, :2] - margin, 0)
            hi = np.minimum(box[:, :2] + box[:, 2:] + margin, self.dims[p.positions])
            par = np.concatenate([box[:, :2] - lo, box[:, :2] + box[:, 2:] - lo,
                                  p.flips[:, None]], 1).astype(np.float32)
            return (data, lo.astype(np.float32), (hi - lo).astype(np.float32), par,
                    p.positions.astype(np.int64))
        anchors = [b[:2].astype(np.float32) for b in p.boxes]
        shapes = [b[2:].astype(np.float32) for b in p.boxes]
        flips = [np.array(f, np.int32) for f in p.flips]
        resize = [np.array((b[2], b[3]) != (self.size, self.size)) for b in p.boxes]
        positions = [np.array(i, np.int64) for i in p.positions]
        return data, anchors, shapes, flips, resize, positions

    def _read(self, i):
        try:
            return np.frombuffer(self.manifest.read(i), np.uint8)
        except OSError:  # gone since validation: the decoder fails, _decoded falls back
            return np.zeros(0, np.uint8)


class DaliLoader(Loader):
    """DALI decoding of the epoch plan (see the module docstring); `num_workers` DALI threads.
    Images come out on the GPU when CUDA is available (nvJPEG via device="mixed")."""
    engine = "dali"

    def __init__(self, manifest, **kw):
        super().__init__(manifest, **kw)
        self.gpu = torch.cuda.is_available()
        self.fast_resize = not self.gpu and resize_plugin()

    def _pipeline(self, plan):
        size, gpu = self.image_size, self.gpu
        if self.fast_resize:
            return self._cpu_pipeline(plan)

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                      device_id=torch.cuda.current_device() if gpu else None,
                      prefetch_queue_depth=2, seed=self.seed, enable_conditionals=True)
        def pipe():
            data, anchor, shape, flip, resize, pos = fn.external_source(
                source=_Feeder(self.manifest, plan, size), num_outputs=6, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.BOOL,
                       types.INT64])
            # EXIF orientation is ignored, as PIL (and open_clip's transforms) do.
            images = fn.decoders.image_slice(
                data, anchor, shape, device="mixed" if gpu else "cpu", output_type=types.RGB,
                normalized_anchor=False, normalized_shape=False, adjust_orientation=False)
            if resize:  # crops already at the output size skip the resampler (as PIL does)
                images = fn.resize(images, resize_x=size, resize_y=size,
                                   interp_type=types.INTERP_CUBIC, antialias=True)
            # Flip + HWC->CHW in one pass (uint8 in, uint8 out: mean 0, std 1 is exact).
            images = fn.crop_mirror_normalize(images, mirror=flip, dtype=types.UINT8,
                                              output_layout="CHW", mean=[0.0], std=[1.0])
            return images, pos

        p = pipe()
        p.build()
        return p

    def _cpu_pipeline(self, plan):
        size, dims = self.image_size, np.stack([self.width, self.height], 1).astype(np.int64)

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.num_workers),
                      device_id=None, prefetch_queue_depth=2, seed=self.seed)
        def pipe():
            data, anchor, shape, par, pos = fn.external_source(
                source=_Feeder(self.manifest, plan, size, dims), num_outputs=5, batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.FLOAT, types.INT64])
            images = fn.decoders.image_slice(
                data, anchor, shape, device="cpu", output_type=types.RGB,
                normalized_anchor=False, normalized_shape=False, adjust_orientation=False)
            return fn.abd_resize_chw(images, par, size=size), pos

        p = pipe()
        p.build()
        return p

    def _decoded(self, plan):
        if not plan:
            return
        pipe = self._pipeline(plan)
        try:
            for k in range(len(plan)):
                try:
                    images, pos = pipe.run()
                except StopIteration:
                    return
                except Exception:  # noqa: BLE001
                    # The data changed after validation (a file rewritten or removed): finish
                    # the epoch with the PIL path, which skips and reports what fails.
                    for p in plan[k:]:
                        yield decode_batch(self.manifest, p, self.image_size)
                    return
                yield _to_torch(images), torch.from_numpy(np.array(pos.as_array())), []
        finally:
            del pipe


def _to_torch(tl) -> torch.Tensor:
    if hasattr(tl, "as_cpu") and not hasattr(tl, "as_array"):  # TensorListGPU
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device="cuda")
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(tl.as_array())
