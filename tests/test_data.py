"""Data layer: source formats, the two engines, same samples under both, sharding."""
import csv
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from abd_fast.data import Batch, build_loader, open_source
from abd_fast.data.sources import expand_braces, wds_sample_id

try:
    import nvidia.dali  # noqa: F401
    ENGINES = ["torch", "dali"]
except ImportError:  # the torch engine alone still runs everywhere
    ENGINES = ["torch"]


# -- helpers shared with test_data_bad.py -------------------------------------------------
def encode(rng, size=(28, 22), mode="RGB", fmt="JPEG") -> bytes:
    w, h = size
    arr = (np.linspace(0, 1, w)[None, :, None] * rng.integers(40, 255, 3)
           + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def add_member(tf, name, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_pairs(root, items, shards=2):
    """items: [(image bytes or None, caption or None)] -> (csv path, brace pattern); the CSV
    and the shards hold the same pairs (None image: a missing file / member)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i, (data, cap) in enumerate(items):
        if data is not None:
            (root / "images" / f"{i:04d}.jpg").write_bytes(data)
        rows.append((f"images/{i:04d}.jpg", cap or ""))
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    per = -(-len(items) // shards)
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(s * per, min(len(items), (s + 1) * per)):
                data, cap = items[i]
                if data is not None:
                    add_member(tf, f"{i:04d}.jpg", data)
                if cap is not None:
                    add_member(tf, f"{i:04d}.txt", cap.encode())
    return root / "pairs.csv", str(root / f"{{00000..{shards - 1:05d}}}.tar")


def write_imagefolder(root, classes, per_class, rng):
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            (root / c / f"{k:03d}.jpg").write_bytes(encode(rng, (20 + k, 24)))
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ABD_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rng = np.random.default_rng(0)
    items = [(encode(rng, (24 + i % 9, 20 + i % 5)), f"caption number {i}") for i in range(48)]
    return write_pairs(tmp_path_factory.mktemp("pairs"), items)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("folder") / "val", ["cat", "dog", "fox"], 7,
                             np.random.default_rng(1))


# -- formats ------------------------------------------------------------------------------
def test_expand_braces():
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_source_detection(pairs, folder, tmp_path):
    csv_path, pattern = pairs
    assert open_source(csv_path).kind == "captions-csv"
    assert open_source(pattern).kind == "webdataset"
    assert open_source(pattern.replace("{00000..00001}", "00000")).kind == "webdataset"
    assert open_source(csv_path.parent).kind == "webdataset"   # a directory of .tar
    assert open_source(folder).kind == "imagefolder"
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        open_source(tmp_path / "nowhere.csv")
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        open_source(str(csv_path.parent / "{00001..00002}.tar"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        open_source(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        open_source(tmp_path / "empty")


def test_csv_columns_delimiter_and_labels(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "a.jpg").write_bytes(encode(rng))
    (tmp_path / "b.jpg").write_bytes(encode(rng))
    (tmp_path / "c.csv").write_text("idx;filepath;title\n0;a.jpg;first one\n1;b.jpg;second\n")
    m = open_source(tmp_path / "c.csv", image_key="filepath", caption_key="title", delimiter=";")
    assert m.kind == "captions-csv" and m.captions == ["first one", "second"]
    assert m.ids.tolist() == [0, 1] and m.files[1] == str(tmp_path / "b.jpg")
    assert open_source(tmp_path / "c.csv", delimiter=";").captions == m.captions  # found
    with pytest.raises(ValueError, match=r"no image column .*\['idx;filepath;title'\].*"
                                         "--csv-separator"):
        open_source(tmp_path / "c.csv")       # neither a comma nor a tab splits the header
    (tmp_path / "l.csv").write_text("image,label\nb.jpg,1\na.jpg,0\n")
    (tmp_path / "classnames.txt").write_text("apple\nbanana\n")
    m = open_source(tmp_path / "l.csv")
    assert m.kind == "labels-csv" and m.labels.tolist() == [1, 0]
    assert m.classnames == ["apple", "banana"] and m.captions is None


TSV_CAPTIONS = ['a "quoted" dog, on grass', "tab\tinside quotes", "plain words",
                'line\nbreak, and ""doubled"" quotes']


def _write_table(path, header, rows, sep):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=sep, quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("name,header,sep", [
    ("pairs.csv", ["filepath", "caption"], ","),          # open_clip's layout, CleanCLIP's key
    ("cc3m.tsv", ["filepath", "title"], "\t"),            # open_clip's defaults, tab-separated
    ("odd.csv", ["id", "Image", "Text", "url"], "\t"),     # tabs in a .csv, names in any case
    ("plain.tsv", ["img", "text"], ","),                   # commas in a .tsv
])
def test_table_columns_and_separator_are_detected(tmp_path, name, header, sep):
    rng = np.random.default_rng(4)
    for k in range(len(TSV_CAPTIONS)):
        (tmp_path / f"{k}.jpg").write_bytes(encode(rng))
    rows = []
    for k, cap in enumerate(TSV_CAPTIONS):
        cells = {"id": str(k), "url": f"http://x/{k}", "caption": cap, "title": cap,
                 "Text": cap, "text": cap, "filepath": f"{k}.jpg", "Image": f"{k}.jpg",
                 "img": f"{k}.jpg"}
        rows.append([cells[c] for c in header])
    path = _write_table(tmp_path / name, header, rows, sep)
    m = open_source(path)
    assert m.kind == "captions-csv" and m.captions == TSV_CAPTIONS
    assert m.files == [str(tmp_path / f"{k}.jpg") for k in range(len(TSV_CAPTIONS))]
    # The same with the columns and the separator given (open_clip's flags).
    given = open_source(path, image_key=header[1] if header[0] == "id" else header[0],
                        caption_key=header[2] if header[0] == "id" else header[1], delimiter=sep)
    assert given.captions == TSV_CAPTIONS and given.files == m.files
    loader = build_loader(path, train=False, batch_size=3, image_size=16, loader="torch",
                          num_workers=0)
    assert [c for b in loader for c in b.captions] == TSV_CAPTIONS


@pytest.mark.parametrize("header,message,flags", [
    (["image", "filepath", "caption"], r"several possible image columns \['image', 'filepath'\]"
                                       r".*--csv-img-key \(image_key=\)", {"image_key": "image"}),
    (["filepath", "caption", "title"], r"several possible caption columns .*--csv-caption-key",
     {"caption_key": "title"}),
    (["uri", "caption"], r"no image column among the columns found \['uri', 'caption'\].*"
                         r"--csv-img-key.*--csv-separator", {"image_key": "uri"}),
    (["filepath", "alt"], r"no caption column .*\['filepath', 'alt'\].*--csv-caption-key",
     {"caption_key": "alt"}),
    (["0.jpg", "a headerless row"], r"no image column .*'0.jpg'", None),
])
def test_ambiguous_or_missing_columns_name_the_flags(tmp_path, header, message, flags):
    path = _write_table(tmp_path / "pairs.tsv", header, [["0.jpg"] * len(header)], "\t")
    with pytest.raises(ValueError, match=message) as e:
        open_source(path)
    assert "pairs.tsv" in str(e.value)
    if flags is not None:  # what the message asks for resolves it
        assert open_source(path, **flags).kind == "captions-csv"
    with pytest.raises(ValueError, match=r"no 'nope' column .*--csv-caption-key"):
        open_source(path, image_key=header[0], caption_key="nope")


def test_imagefolder_classnames(folder, tmp_path):
    m = open_source(folder)
    assert m.classnames == ["cat", "dog", "fox"]       # folder names by default
    assert m.labels.tolist() == [0] * 7 + [1] * 7 + [2] * 7
    assert m.ids.tolist() == list(range(21))
    names = tmp_path / "names.txt"
    names.write_text("house cat\nhound\nred fox\n")
    assert open_source(folder, classnames=names).classnames == ["house cat", "hound", "red fox"]
    names.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        open_source(folder, classnames=names)
    wn = tmp_path / "imagenet"
    for wnid in ("n01443537", "n01440764", "n07753592"):   # goldfish, tench, banana
        shutil.copytree(folder / "cat", wn / wnid)
    assert open_source(wn).classnames == ["tench", "goldfish", "banana"]


def test_webdataset_ids_are_hashes_of_shard_and_key(pairs, tmp_path):
    _, pattern = pairs
    m = open_source(pattern)
    assert m.ids[0] == wds_sample_id("00000.tar", "0000") and (m.ids >= 0).all()
    assert len(set(m.ids.tolist())) == len(m) == 48
    assert m.captions[30] == "caption number 30"
    moved = tmp_path / "elsewhere"
    shutil.copytree(os.path.dirname(pattern), moved)
    assert np.array_equal(open_source(moved).ids, m.ids)   # independent of the location


# -- engines ------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["csv", "wds", "folder"])
def test_engine_batches(engine, kind, pairs, folder):
    src = {"csv": pairs[0], "wds": pairs[1], "folder": folder}[kind]
    train = kind != "folder"
    loader = build_loader(src, train=train, batch_size=8, image_size=16, loader=engine,
                          num_workers=0 if engine == "torch" else 2)
    batches = list(loader)
    assert len(batches) == len(loader) == (6 if train else 3)
    b = batches[0]
    assert isinstance(b, Batch) and b.images.shape == (8, 3, 16, 16)
    assert b.images.dtype == torch.uint8 and b.ids.dtype == torch.int64
    if kind == "folder":
        assert b.captions is None and b.labels.dtype == torch.int64
        assert loader.classnames == ["cat", "dog", "fox"] and len(batches[-1]) == 5
        assert torch.cat([x.labels for x in batches]).tolist() == [0] * 7 + [1] * 7 + [2] * 7
    else:
        m = loader.manifest
        assert b.labels is None
        assert b.captions == [m.captions[int(np.flatnonzero(m.ids == i)[0])] for i in b.ids]
    assert loader.bad_samples == []


@pytest.mark.parametrize("train", [True, False])
def test_same_samples_under_both_engines(pairs, train):
    runs = {e: list(build_loader(pairs[1], train=train, batch_size=8, image_size=24, loader=e,
                                 seed=3, num_workers=2)) for e in ENGINES}
    for a, b in zip(*runs.values(), strict=True):
        assert torch.equal(a.ids, b.ids) and a.captions == b.captions
        # Same crop boxes and flips: the images differ only by the resamplers' rounding.
        assert (a.images.float() - b.images.float()).abs().mean() < 1.0


def test_epochs_reshuffle_deterministically(pairs):
    def ids(seed, epoch, engine="torch"):
        loader = build_loader(pairs[0], train=True, batch_size=8, image_size=8, seed=seed,
                              loader=engine, num_workers=0)
        loader.set_epoch(epoch)
        return torch.cat([b.ids for b in loader]).tolist()
    assert ids(0, 0) == ids(0, 0) == ids(0, 0, ENGINES[-1])
    assert ids(0, 1) != ids(0, 0) and ids(1, 0) != ids(0, 0)
    assert sorted(ids(0, 1)) == sorted(ids(0, 0)) == list(range(48))


def test_torch_engine_does_not_depend_on_workers(pairs):
    runs = [list(build_loader(pairs[1], train=True, batch_size=8, image_size=16, loader="torch",
                              num_workers=w)) for w in (0, 2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("train", [True, False])
def test_two_ranks_are_disjoint_and_complete(pairs, engine, train):
    per_rank = [torch.cat([b.ids for b in build_loader(
        pairs[1], train=train, batch_size=6, image_size=8, loader=engine, rank=r, world_size=2,
        num_workers=0 if engine == "torch" else 1)]).tolist() for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 24           # 48 = 2 ranks x 4 x 6
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(open_source(pairs[1]).ids.tolist())


def test_train_drops_only_the_incomplete_global_batch(pairs):
    loader = build_loader(pairs[0], train=True, batch_size=5, image_size=8, loader="torch",
                          rank=1, world_size=2, num_workers=0)
    assert len(loader) == 4 and loader.num_samples == 20        # 48 // (2 x 5) x 5
    eval_loader = build_loader(pairs[0], train=False, batch_size=5, image_size=8,
                               loader="torch", rank=1, world_size=2, num_workers=0)
    assert eval_loader.num_samples == 24 and len(eval_loader) == 5


def test_default_engine(pairs):
    """DALI where it is installed and fast: a GPU, or on CPU our resize operator built; else
    the torch engine."""
    engine = build_loader(pairs[0], train=False, batch_size=4, image_size=8).engine
    if "dali" not in ENGINES:
        assert engine == "torch"
        return
    from abd_fast.data.dali import resize_plugin
    assert engine == ("dali" if torch.cuda.is_available() or resize_plugin() else "torch")


def test_ranks_split_each_global_batch(pairs):
    """Batch k of rank 0 followed by batch k of rank 1 is batch k of one process with the
    doubled batch size: what makes a 2-process run follow the 1-process loss curve."""
    one = [b.ids.tolist() for b in build_loader(pairs[0], train=True, batch_size=10,
                                                  image_size=8, loader="torch", num_workers=0)]
    ranks = [[b.ids.tolist() for b in build_loader(pairs[0], train=True, batch_size=5,
                                                     image_size=8, loader="torch", rank=r,
                                                     world_size=2, num_workers=0)]
             for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) > 1
    assert [a + b for a, b in zip(*ranks)] == one
