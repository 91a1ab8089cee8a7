"""The DALI engine's CPU resize operator (abd_fast/data/dali_resize.cc) against PIL's
Image.resize(box=..., BICUBIC) + flip, on random images, boxes and odd sizes."""
import math
import shutil

import numpy as np
import pytest
from PIL import Image

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
from abd_fast.data.dali import _cuda_include, resize_plugin  # noqa: E402

if shutil.which("g++") is None or _cuda_include() is None:
    pytest.skip("no g++ or CUDA headers: the DALI engine falls back to fn.resize (warned)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ABD_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _run(images, params, size):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        im, par = fn.external_source(source=lambda: (images, params), num_outputs=2,
                                     batch=True, dtype=[types.UINT8, types.FLOAT],
                                     layout=["HWC", ""])
        return fn.abd_resize_chw(im, par, size=size)
    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(images))]


@pytest.mark.parametrize("size", [37, 64])
def test_matches_pil_bicubic_box_resize_and_flip(size):
    assert resize_plugin()
    rng = np.random.default_rng(size)
    slices, params, refs = [], [], []
    for k in range(24):
        W, H = (int(v) for v in rng.integers(5, 3 * size, 2))
        img = (np.linspace(0, 200, W)[None, :, None] + rng.normal(0, 25, (H, W, 3)))
        img = img.clip(0, 255).astype(np.uint8)
        w, h = int(rng.integers(1, W + 1)), int(rng.integers(1, H + 1))
        if k % 6 == 0:  # the box is already the output size in one or both axes
            w, h = min(W, size), min(H, size) if k % 12 == 0 else h
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        flip = bool(k % 2)
        ref = Image.fromarray(img).resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
        if flip:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        refs.append(np.asarray(ref).transpose(2, 0, 1))
        # The slice the engine decodes: the box widened by the filter's support (dali.py).
        mx, my = (math.ceil(2 * max(v / size, 1)) + 2 for v in (w, h))
        l, t, r, b = max(0, x - mx), max(0, y - my), min(W, x + w + mx), min(H, y + h + my)
        slices.append(np.ascontiguousarray(img[t:b, l:r]))
        params.append(np.array([x - l, y - t, x + w - l, y + h - t, flip], np.float32))
    outs = _run(slices, params, size)
    for out, ref in zip(outs, refs):
        assert out.shape == (3, size, size) and out.dtype == np.uint8
        d = np.abs(out.astype(int) - ref)
        # Same filter and fixed-point arithmetic as Pillow; only the order of the two passes
        # (Pillow picks it per image) can move a pixel by a few grey levels.
        assert d.mean() < 0.5 and (d == 0).mean() > 0.7, (d.mean(), (d == 0).mean())


def test_dali_engine_uses_the_operator_on_cpu(tmp_path):
    import torch

    from abd_fast.data import build_loader
    if torch.cuda.is_available():
        pytest.skip("with a GPU the DALI engine resizes on the GPU")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (30 + i, 41, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.jpg")
    (tmp_path / "pairs.csv").write_text(
        "image,caption\n" + "".join(f"{i}.jpg,a photo {i}\n" for i in range(8)))
    loader = build_loader(tmp_path / "pairs.csv", train=True, batch_size=4, image_size=19,
                          loader="dali", num_workers=1)
    assert loader.fast_resize
    assert [b.images.shape for b in loader] == [(4, 3, 19, 19)] * 2
