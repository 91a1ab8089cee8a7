"""DALI engine: the epoch plan is fed through `fn.external_source` (encoded bytes read by us,
crop boxes, flips, manifest positions); DALI decodes only the crop (`decoders.image_slice`,
on the GPU with device="mixed" when CUDA is available, else on CPU with device_id=None),
resizes (bicubic, antialiased), flips and transposes to CHW (crop_mirror_normalize).

Why not fn.readers.webdataset / fn.readers.file: the webdataset reader does not return the
sample key (our id), neither reader can be told to skip samples found corrupt (one corrupt
image aborts DALI's decoder, hence the pipeline), and their shuffling differs from the torch
engine's. Reading the bytes ourselves costs one pread per sample. See docs/DATA.md.
"""
from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from .loader import Loader, decode_batch


class _Feeder:
    """Batches of the plan as external_source inputs; restarts when DALI calls iter()."""
    def __init__(self, manifest, plan, size):
        self.manifest, self.plan, self.size, self.k = manifest, plan, size, 0

    def __iter__(self):
        self.k = 0
        return self

    def __next__(self):
        if self.k >= len(self.plan):
            raise StopIteration
        p = self.plan[self.k]
        self.k += 1
        data = [self._read(i) for i in p.positions.tolist()]
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

    def _pipeline(self, plan):
        size, gpu = self.image_size, self.gpu

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
