"""Bad data: every kind of unusable sample is skipped, counted and reported with its id, under
both engines; above the threshold the run stops with a message naming the source."""
import numpy as np
import pytest
import torch

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
def test_bad_samples_are_skipped_and_reported(crafted, engine, fmt):
    csv_path, pattern, kinds = crafted
    loader = build_loader(csv_path if fmt == "csv" else pattern, train=False, batch_size=7,
                          image_size=16, loader=engine, bad_threshold=0.5, num_workers=1)
    ids = torch.cat([b.ids for b in loader]).tolist()
    assert len(ids) == N_GOOD
    reported = _by_kind(loader, kinds)
    assert set(reported) == set(EXPECTED)
    for kind, reason in reported.items():
        assert reason.startswith(EXPECTED[kind]), (kind, reason)
    bad_ids = {i for i, _ in loader.bad_samples}
    assert not bad_ids & set(ids)
    report = loader.report()
    assert f"skipped 10 of {N_GOOD + 10}" in report and str(next(iter(bad_ids))) in report


@pytest.mark.parametrize("fmt", ["csv", "wds"])
def test_both_engines_yield_the_same_good_samples(crafted, fmt):
    src = crafted[0] if fmt == "csv" else crafted[1]
    runs = [list(build_loader(src, train=True, batch_size=4, image_size=16, loader=e,
                              bad_threshold=0.5, num_workers=1)) for e in ENGINES]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.ids, b.ids)


@pytest.mark.parametrize("engine", ENGINES)
def test_non_rgb_convert_option(crafted, engine):
    csv_path, _, kinds = crafted
    loader = build_loader(csv_path, train=False, batch_size=8, image_size=16, loader=engine,
                          bad_threshold=0.5, non_rgb="convert", num_workers=1)
    assert len(torch.cat([b.ids for b in loader])) == N_GOOD + 4   # L, RGBA, CMYK, P decoded
    assert not {"L", "RGBA", "CMYK", "P"} & set(_by_kind(loader, kinds))


def test_converted_images_agree_across_engines(crafted):
    runs = [torch.cat([b.images for b in build_loader(
        crafted[0], train=False, batch_size=8, image_size=16, loader=e, bad_threshold=0.5,
        non_rgb="convert", num_workers=1)]) for e in ENGINES]
    assert (runs[0].float() - runs[1].float()).abs().mean() < 2.0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fmt", ["csv", "wds"])
def test_too_many_bad_samples_stop_the_run(crafted, engine, fmt):
    src = crafted[0] if fmt == "csv" else crafted[1]
    with pytest.raises(BadDataError, match=r"10 of 40 samples \(25.0%\).*threshold of 1%") as e:
        build_loader(src, train=False, batch_size=8, image_size=16, loader=engine)
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
