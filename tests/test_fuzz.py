"""Hostile input: the caption-data readers, caption tokenization and EDA are fed random and
malformed bytes (hypothesis). A source either opens, with its unusable samples counted as
bad samples, or is refused with an error that names it; tokenization and EDA never fail."""
import csv
import io
import os
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abd_fast.data import BadDataError, build_loader
from abd_fast.data.sources import open_source
from test_data import _cache, encode  # noqa: F401 (autouse fixture: a private index cache)

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# What a refused source may raise: each names the source in its message.
REFUSALS = (ValueError, FileNotFoundError, BadDataError)


def _open_and_load(path):
    """open_source + one eval-mode epoch; returns the number of samples loaded, or None when
    the source was refused (the error must name it)."""
    try:
        m = open_source(path)
        loader = build_loader(m, train=False, batch_size=4, image_size=16, loader="torch",
                              num_workers=0, bad_threshold=1.0)
        return sum(len(b) for b in loader)
    except REFUSALS as e:
        assert os.path.basename(str(path)) in str(e), f"error does not name the source: {e}"
        return None


@pytest.fixture(scope="module")
def good_jpeg():
    return encode(np.random.default_rng(3), (20, 18))


@pytest.mark.parametrize("name", ["pairs.csv", "00000.tar"])
@FUZZ
@given(blob=st.binary(max_size=3000))
def test_source_of_random_bytes(tmp_path_factory, name, blob):
    path = tmp_path_factory.mktemp("random") / name
    path.write_bytes(blob)
    _open_and_load(path)


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=30), max_size=4), max_size=8),
       header=st.sampled_from([["image", "caption"], ["caption", "image", "x"], ["image"],
                               ["image", "label"], []]),
       data=st.data())
def test_malformed_caption_csv(tmp_path_factory, good_jpeg, rows, header, data):
    """Ragged rows, odd cells (NUL, quotes, newlines, other encodings), paths that point
    nowhere or at directories, a few real images among them."""
    d = tmp_path_factory.mktemp("csvrows")
    (d / "ok.jpg").write_bytes(good_jpeg)
    (d / "sub").mkdir()
    cells = st.one_of(st.text(max_size=20), st.sampled_from(["ok.jpg", "sub", "../x.jpg", "",
                                                             "ok.jpg\x00", "\"", "a\nb"]))
    rows = [[data.draw(cells) for _ in r] for r in rows]
    buf = io.StringIO()
    w = csv.writer(buf)
    if header:
        w.writerow(header)
    w.writerows(rows)
    encoding = data.draw(st.sampled_from(["utf-8", "latin-1", "utf-16"]))
    (d / "pairs.csv").write_bytes(buf.getvalue().encode(encoding, errors="replace"))
    _open_and_load(d / "pairs.csv")


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@FUZZ
@given(names=st.lists(st.tuples(st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s),
                                st.sampled_from(["jpg", "png", "webp", "txt", "json", "JPG",
                                                 "txt.gz", ""])), max_size=8),
       payloads=st.lists(st.binary(max_size=200), min_size=8, max_size=8),
       cut=st.floats(0.0, 1.0), data=st.data())
def test_malformed_and_truncated_shards(tmp_path_factory, good_jpeg, names, payloads, cut, data):
    """Valid tar structure with hostile members (random names, random bytes as images and
    captions, non-UTF-8 captions), then possibly truncated anywhere."""
    members = []
    for (stem, ext), payload in zip(names, payloads):
        if data.draw(st.booleans()):
            payload = good_jpeg if ext.lower() in ("jpg", "png", "webp") else payload
        members.append((f"{stem}.{ext}" if ext else stem, payload))
    members += [("k1.jpg", good_jpeg), ("k1.txt", "a caption".encode())]
    blob = _tar_bytes(members)
    if data.draw(st.booleans()):
        blob = blob[:int(cut * len(blob))]
    path = tmp_path_factory.mktemp("wds") / "00000.tar"
    path.write_bytes(blob)
    _open_and_load(path)


def test_truncated_shard_keeps_the_samples_before_the_cut(tmp_path, good_jpeg):
    """A shard cut short (an interrupted download) still yields the complete samples
    before the cut; the cut sample is a bad sample, not a fatal error."""
    members = [(f"{k:04d}.{ext}", good_jpeg if ext == "jpg" else b"caption %d" % k)
               for k in range(6) for ext in ("jpg", "txt")]
    blob = _tar_bytes(members)
    path = tmp_path / "00000.tar"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    m = open_source(path)
    loader = build_loader(m, train=False, batch_size=4, image_size=16, loader="torch",
                          num_workers=0, bad_threshold=1.0)
    loaded = sum(len(b) for b in loader)
    ends = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        for mem in tf:
            key = mem.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), mem.offset_data + mem.size)
    whole = sum(end <= len(blob) * 2 // 3 for end in ends.values())
    assert 3 <= whole < 6 and loaded == whole
    assert loaded + len(loader.bad_samples) == len(m)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400))
def test_tokenizer_never_fails(text):
    from abd_fast.models import get_tokenizer
    tok = get_tokenizer("abd-tiny-vit")
    ids = tok([text])
    assert ids.shape == (1, 32) and int(ids.min()) >= 0 and int(ids.max()) < 49408


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=300),
                      st.binary(max_size=300).map(lambda b: b.decode("latin-1"))),
       seed=st.integers(0, 2**31 - 1), key=st.integers(0, 2**62))
def test_eda_never_fails(text, seed, key):
    from abd_fast.text import EDA
    out = EDA(seed=seed)(text, key=key)
    assert isinstance(out, str)
