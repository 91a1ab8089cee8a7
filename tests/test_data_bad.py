"""Bad data: every kind of unusable sample is skipped, counted and reported with its id, under
both engines; above the threshold the run stops with a message naming the source. Non-RGB
images are converted to RGB by default (non_rgb="skip": bad samples)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from abd_fast.data import BadDataError, build_loader
from test_data import ENGINES, encode, write_pairs
from test_data import _cache  # noqa: F401 (autouse fixture: a private index cache)

N_GOOD = 30


def _bad_items(rng):
    good = encode(rng, (26, 22))
    return {
        "corrupt": (bytes(rng.integers(0, 256, 300, dtype=np.uint8)), "corrupt bytes"),
        "truncated": (good[: len(good) // 2], "truncated jpeg"),
        "zero-byte": (b"", "an empty file"),
        "L": (encode(rng, mode="L"), "a grayscale image"),
        "RGBA": (encode(rng, mode="RGBA", fmt="PNG"), "an rgba png"),
        "CMYK": (encode(rng, mode="CMYK"), "a cmyk jpeg"),
        "P": (encode(rng, mode="P", fmt="PNG"), "a palette png"),
        "GIF": (encode(rng, fmt="GIF"), "a gif named jpg"),
        "missing": (None, "the image is missing"),
        "empty-caption": (good, "   "),
    }


NON_RGB = {"L", "RGBA", "CMYK", "P"}
EXPECTED = {"corrupt": "corrupt image", "truncated": "truncated image",
            "zero-byte": "zero-byte file", "L": "non-RGB image (mode L)",
            "RGBA": "non-RGB image (mode RGBA)", "CMYK": "non-RGB image (mode CMYK)",
            "P": "non-RGB image (mode P)", "GIF": "unsupported format GIF",
            "missing": "missing", "empty-caption": "empty caption"}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """30 good pairs with the 10 kinds of bad samples interleaved; CSV and shards."""
    rng = np.random.default_rng(5)
    bad = _bad_items(rng)
    items, kinds = [], {}
    for k in range(N_GOOD):
        items.append((encode(rng, (24 + k % 7, 20)), f"a good caption {k}"))
        if k % 3 == 1:
            name = list(bad)[k // 3]
            kinds[len(items)] = name
            items.append(bad[name])
    csv_path, pattern = write_pairs(tmp_path_factory.mktemp("bad"), items, shards=3)
    return csv_path, pattern, kinds


def _by_kind(loader, kinds):
    """{kind: reason} of the reported bad samples, through the manifest's ids."""
    index = {int(i): n for n, i in enumerate(loader.manifest.ids)}
    return {kinds[index[i]]: reason for i, reason in loader.bad_samples}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", ["csv", "wds"])
@pytest.mark.parametrize("non_rgb", ["skip", "convert"])
def test_bad_samples_are_skipped_and_reported(crafted, engine, fmt, non_rgb):
    csv_path, pattern, kinds = crafted
    loader = build_loader(csv_path if fmt == "csv" else pattern, train=False, batch_size=7,
                          image_size=16, loader=engine, bad_threshold=0.5, num_workers=1,
                          non_rgb=non_rgb)
    ids = torch.cat([b.ids for b in loader]).tolist()
    expected = EXPECTED if non_rgb == "skip" else {
        k: r for k, r in EXPECTED.items() if k not in NON_RGB}
    assert len(ids) == N_GOOD + 10 - len(expected)
    reported = _by_kind(loader, kinds)
    assert set(reported) == set(expected)
    for kind, reason in reported.items():
        assert reason.startswith(expected[kind]), (kind, reason)
    bad_ids = {i for i, _ in loader.bad_samples}
    assert not bad_ids & set(ids)
    report = loader.report()
    assert f"skipped {len(expected)} of {N_GOOD + 10}" in report
    assert str(next(iter(bad_ids))) in report
    converted = "converted 4 non-RGB images to RGB (epoch 0; 1 CMYK, 1 L, 1 P, 1 RGBA)"
    assert (converted in report) == (non_rgb == "convert")
    assert loader.epoch_stats == {"skipped": len(expected),
                                  "converted": 4 if non_rgb == "convert" else 0}


@pytest.mark.parametrize("fmt", ["csv", "wds"])
def test_both_engines_yield_the_same_good_samples(crafted, fmt):
    src = crafted[0] if fmt == "csv" else crafted[1]
    runs = [list(build_loader(src, train=True, batch_size=4, image_size=16, loader=e,
                              bad_threshold=0.5, num_workers=1)) for e in ENGINES]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.ids, b.ids)


def test_converted_images_agree_across_engines(crafted):
    runs = [torch.cat([b.images for b in build_loader(
        crafted[0], train=False, batch_size=8, image_size=16, loader=e, bad_threshold=0.5,
        num_workers=1)]) for e in ENGINES]
    assert (runs[0].float() - runs[1].float()).abs().mean() < 2.0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", ["csv", "wds"])
@pytest.mark.parametrize("non_rgb", ["skip", "convert"])
def test_too_many_bad_samples_stop_the_run(crafted, engine, fmt, non_rgb):
    src = crafted[0] if fmt == "csv" else crafted[1]
    bad = r"10 of 40 samples \(25.0%\)" if non_rgb == "skip" else r"6 of 40 samples \(15.0%\)"
    with pytest.raises(BadDataError, match=bad + ".*threshold of 1%") as e:
        build_loader(src, train=False, batch_size=8, image_size=16, loader=engine,
                     non_rgb=non_rgb)
    assert str(src) in str(e.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_data_corrupted_after_validation_is_skipped_at_load_time(tmp_path, engine):
    """A file rewritten after the validation pass: the torch engine skips it in its worker,
    the DALI engine finishes the epoch on the PIL path. Nothing crashes."""
    rng = np.random.default_rng(7)
    items = [(encode(rng), f"caption {i}") for i in range(40)]
    csv_path, _ = write_pairs(tmp_path, items)
    loader = build_loader(csv_path, train=False, batch_size=8, image_size=16, loader=engine,
                          num_workers=1, bad_threshold=0.05)
    (tmp_path / "images" / "0013.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ids = torch.cat([b.ids for b in loader]).tolist()
    assert ids == [i for i in range(40) if i != 13]
    assert [(i, r.split(" (")[0]) for i, r in loader.bad_samples] == [(13, "failed at load time")]
    (tmp_path / "images" / "0014.jpg").unlink()
    (tmp_path / "images" / "0015.jpg").unlink()
    with pytest.raises(BadDataError, match="pairs.csv"):   # 3 of 40 > 5%
        list(loader)


@pytest.mark.parametrize("engine", ENGINES)
def test_evaluation_data_keeps_non_rgb_images(tmp_path, engine):
    """In an evaluation set every image counts: grayscale and CMYK JPEGs are converted."""
    rng = np.random.default_rng(3)
    for c in ("ant", "bee"):
        (tmp_path / c).mkdir()
        for k, mode in enumerate(["RGB", "L", "CMYK", "RGB"]):
            (tmp_path / c / f"{k}.jpg").write_bytes(encode(rng, mode=mode))
    loader = build_loader(tmp_path, train=False, batch_size=3, image_size=16, loader=engine,
                          num_workers=1)
    labels = torch.cat([b.labels for b in loader])
    assert labels.tolist() == [0] * 4 + [1] * 4 and not loader.bad_samples


def _non_rgb_images(rng, side=16):
    """{name: (encoded bytes, the RGB image expected)} for every mode real data brings."""
    rgb = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (side, side, 4), dtype=np.uint8))
    grey16 = rng.integers(0, 65536, (side, side)).astype(np.uint16)
    out = {}
    for name, img, fmt in [("L", rgb.convert("L"), "PNG"), ("LA", rgb.convert("LA"), "PNG"),
                           ("1", rgb.convert("1"), "PNG"), ("P", rgb.convert("P"), "PNG"),
                           ("RGBA", rgba, "PNG"), ("RGBA-webp", rgba, "WEBP"),
                           ("L-jpeg", rgb.convert("L"), "JPEG"),
                           ("CMYK", rgb.convert("CMYK"), "JPEG"),
                           ("I;16", Image.fromarray(grey16), "PNG")]:
        buf = io.BytesIO()
        img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        out[name] = buf.getvalue()
    p = rgb.convert("P")
    p.info["transparency"] = 3          # a palette PNG with a transparent entry
    buf = io.BytesIO()
    p.save(buf, "PNG")
    out["P-transparent"] = buf.getvalue()
    expected = {}
    for name, data in out.items():
        with Image.open(io.BytesIO(data)) as im:
            expected[name] = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    # 16-bit grey is scaled to 8 bits (round(v / 257)), not clipped at 255 as PIL's
    # convert("RGB") does, which would turn this image almost white.
    scaled = np.round(grey16 / 257).astype(np.uint8)
    assert (expected["I;16"] != scaled).mean() > 0.9
    expected["I;16"] = np.repeat(scaled[None], 3, 0)
    return {name: (out[name], expected[name]) for name in out}


@pytest.mark.parametrize("engine", ENGINES)
def test_every_non_rgb_mode_is_converted_exactly(tmp_path, engine):
    """Grey, grey + alpha, 1-bit, palette (with transparency), RGBA (PNG, WebP), CMYK JPEG and
    16-bit grey: decoded as the RGB image above by both engines (at the image's own size the
    resize is the identity), and counted as converted."""
    images = _non_rgb_images(np.random.default_rng(11))
    items = [(data, f"a {name} image") for name, (data, _) in images.items()]
    csv_path, _ = write_pairs(tmp_path, items)
    loader = build_loader(csv_path, train=False, batch_size=4, image_size=16, loader=engine,
                          num_workers=1)
    got = torch.cat([b.images for b in loader])
    assert not loader.bad_samples and len(got) == len(images)
    for k, (name, (_, expected)) in enumerate(images.items()):
        assert torch.equal(got[k], torch.tensor(expected)), name
    assert loader.converted == {"1": 1, "CMYK": 1, "I;16": 1, "L": 2, "LA": 1, "P": 2,
                                "RGBA": 2}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_real_shard_with_grey_images_and_4_undecodable_passes(tmp_path, engine):
    """600 samples in one shard: 60 grey/CMYK/palette/RGBA images and 4 undecodable ones.
    4 / 600 is under the 1% threshold: the epoch runs, converting the 60; skipping them as
    before (non_rgb="skip") would stop the run at 64 / 600."""
    rng = np.random.default_rng(12)
    modes = [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")]
    items = []
    for k in range(600):
        mode, fmt = modes[k // 10 % 4] if k % 10 == 3 else ("RGB", "JPEG")
        items.append((encode(rng, (12, 10), mode=mode, fmt=fmt), f"picture {k}"))
    for k in (7, 250, 251, 599):
        items[k] = (bytes(rng.integers(0, 256, 200, dtype=np.uint8)), f"picture {k}")
    _, pattern = write_pairs(tmp_path, items, shards=1)
    loader = build_loader(pattern, train=False, batch_size=100, image_size=8, loader=engine,
                          num_workers=1)
    assert sum(len(b) for b in loader) == 596
    assert [r.split(" (")[0] for _, r in loader.bad_samples] == ["corrupt image"] * 4
    assert loader.converted == {"CMYK": 15, "L": 15, "P": 15, "RGBA": 15}
    train = build_loader(pattern, train=True, batch_size=50, image_size=8, loader=engine,
                         num_workers=1)
    assert sum(len(b) for b in train) == 550 and len(train.bad_samples) == 4
    with pytest.raises(BadDataError, match=r"64 of 600 samples .*60 non-RGB image"):
        build_loader(pattern, train=True, batch_size=50, image_size=8, loader=engine,
                     num_workers=1, non_rgb="skip")
