"""Data sources: which samples a dataset has, where their image bytes are, their stable ids.

`open_source(path)` recognizes the format from the path and returns a `Manifest`; no image
is decoded here (that is `abd_fast.data.validate`). Formats (docs/DATA.md):

- caption CSV or TSV (CleanCLIP's `image,caption`, open_clip's `filepath<TAB>title`, ...):
  image and caption columns and the separator (comma or tab) found from the header, or
  given; image paths relative to the file; id = row index (0 = first data row).
- labels CSV: columns `image,label` (int); id = row index.
- ImageFolder: one folder per class, sorted; id = index in the sorted listing.
- WebDataset shards as img2dataset writes them (`.jpg/.jpeg/.png/.webp` + `.txt`), given as
  a brace pattern, one `.tar`, or a directory of `.tar`; id = 63-bit BLAKE2b hash of
  "<shard basename>/<sample key>". Members are read by byte offset, so shards must be
  uncompressed tars (img2dataset's are).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TABLE_EXTS = (".csv", ".tsv")
# Column names recognized without image_key= / caption_key= (open_clip's --csv-img-key
# default is `filepath`, --csv-caption-key `title`; CleanCLIP's are `image`, `caption`).
IMAGE_COLUMNS = ("image", "filepath", "file", "path", "img")
CAPTION_COLUMNS = ("caption", "title", "text")
SEPARATORS = {",": "comma", "\t": "tab"}
# How the command line names the options, for error messages (the library's keywords first).
KEY_FLAGS = {"image_key": "--csv-img-key", "caption_key": "--csv-caption-key",
             "delimiter": "--csv-separator"}
log = logging.getLogger("abd_fast.data")
_WNID = re.compile(r"^n\d{8}$")


@dataclass
class Manifest:
    """Everything known about a source's samples before decoding.

    Sample i has id `ids[i]` (int64); its image is the file `files[i]` when `offsets[i] < 0`,
    else `sizes[i]` bytes at `offsets[i]` inside the tar `files[i]`. `problems` maps sample
    indices to the reason they cannot be used, when that is known without decoding
    (empty caption, missing image member, bad label)."""
    source: str
    kind: str                       # "captions-csv" | "labels-csv" | "imagefolder" | "webdataset"
    ids: np.ndarray                 # int64 [N]
    files: list[str]
    offsets: np.ndarray             # int64 [N]
    sizes: np.ndarray               # int64 [N]
    captions: list[str] | None = None
    labels: np.ndarray | None = None    # int64 [N]
    classnames: list[str] | None = None
    problems: dict[int, str] = field(default_factory=dict)
    fingerprint: str = ""           # changes when the listing / CSV / shards change

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> bytes:
        """The encoded image bytes of sample i (raises OSError when unreadable)."""
        off = int(self.offsets[i])
        with open(self.files[i], "rb") as f:
            if off < 0:
                return f.read()
            f.seek(off)
            data = f.read(int(self.sizes[i]))
        if len(data) != int(self.sizes[i]):
            raise OSError("truncated shard")
        return data

    def subset(self, positions, what: str) -> "Manifest":
        """The samples at `positions` (indices into this manifest), ids kept so triggers stay
        seeded by them; `what` names the subset in the fingerprint."""
        return dataclasses.replace(
            self, ids=self.ids[positions], files=[self.files[i] for i in positions],
            offsets=self.offsets[positions], sizes=self.sizes[positions],
            captions=None if self.captions is None else [self.captions[i] for i in positions],
            labels=None if self.labels is None else self.labels[positions], problems={},
            fingerprint=f"{self.fingerprint}-{what}-{len(positions)}")


def wds_sample_id(shard: str, key: str) -> int:
    """Stable int64 id of a WebDataset sample: BLAKE2b-64 of "<shard basename>/<key>", top bit
    cleared (non-negative). The same in every engine, epoch, worker and rank."""
    name = f"{os.path.basename(shard)}/{key}".encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(name, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def expand_braces(pattern: str) -> list[str]:
    """`shards/{00000..00002}.tar` -> [shards/00000.tar, shards/00001.tar, shards/00002.tar];
    also `{a,b}` alternatives; several braces expand as a product, in order."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.group(1), r.group(2)
        width = len(a) if (a.startswith("0") or len(a) == len(b)) else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def open_source(source, *, classnames=None, image_key: str | None = None,
                caption_key: str | None = None, label_key: str = "label",
                delimiter: str | None = None) -> Manifest:
    """Recognize and parse a data source (see the module docstring).

    source: `*.csv` / `*.tsv` (caption table, or labels CSV when it has a `label_key` column
    and no caption column), a brace pattern / `*.tar` / directory of `.tar` (WebDataset), or
    a directory of class folders (ImageFolder). classnames: a file (one name per line,
    folder/label order) or a list, for evaluation data.
    image_key / caption_key / delimiter: a table's image and caption columns and separator;
    None finds them from the header (`IMAGE_COLUMNS`, `CAPTION_COLUMNS`; comma or tab, tab
    tried first for .tsv). A missing or ambiguous column raises ValueError listing the
    columns found."""
    s = os.fspath(source)
    if "{" in s and "}" in s:
        return _webdataset(s, expand_braces(s))
    p = Path(s)
    if not p.exists():
        raise FileNotFoundError(f"data source {s!r} does not exist")
    if p.is_file() and p.suffix.lower() in TABLE_EXTS:
        return _csv(p, s, classnames, image_key, caption_key, label_key, delimiter)
    if p.is_file() and p.suffix.lower() == ".tar":
        return _webdataset(s, [s])
    if p.is_dir():
        tars = sorted(str(q) for q in p.iterdir() if q.suffix.lower() == ".tar" and q.is_file())
        if tars:
            return _webdataset(s, tars)
        if any(q.is_dir() and not q.name.startswith(".") for q in p.iterdir()):
            return _imagefolder(p, s, classnames)
    raise ValueError(f"cannot recognize data source {s!r}: expected a .csv or .tsv file, "
                     "WebDataset shards (a .tar, a brace pattern like shards/{00000..00099}.tar, "
                     "or a directory of .tar files) or an ImageFolder directory of class folders")


def _stat_key(paths) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def _read_classnames(classnames, n: int, where: str) -> list[str] | None:
    if classnames is None:
        return None
    if isinstance(classnames, (str, os.PathLike)):
        names = [line.strip() for line in Path(classnames).read_text().splitlines() if line.strip()]
    else:
        names = [str(c) for c in classnames]
    if n and len(names) != n:
        raise ValueError(f"{where}: {len(names)} class names for {n} classes")
    return names


def _option(key: str) -> str:
    return f"{KEY_FLAGS[key]} ({key}=)"


def _header(text: str, delimiter: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error:
        return []


def _find(columns: list[str], given: str | None, candidates, key: str, shown: str,
          other: str = "") -> str:
    """The column named `given`, else the one column among `candidates` (any case); `other`
    ends the message when there is none."""
    if given is not None:
        if given not in columns:
            raise ValueError(f"{shown}: no {given!r} column (columns found: {columns}); "
                             f"name the right one with {_option(key)}")
        return given
    found = [c for c in columns if c.strip().lower() in candidates]
    if len(found) > 1:
        raise ValueError(f"{shown}: several possible {key.split('_')[0]} columns {found} "
                         f"(columns found: {columns}); choose one with {_option(key)}")
    if not found:
        raise ValueError(f"{shown}: no {key.split('_')[0]} column among the columns found "
                         f"{columns} (looked for {list(candidates)}); name it with "
                         f"{_option(key)}, or give {_option('delimiter')} if the separator "
                         f"is neither a comma nor a tab{other}")
    return found[0]


def _separator(text: str, path: Path, image_key: str | None) -> str:
    """Comma or tab, whichever splits the header into a recognized image column (tab first
    for .tsv); else whichever splits it at all."""
    order = ["\t", ","] if path.suffix.lower() == ".tsv" else [",", "\t"]
    for d in order:
        columns = _header(text, d)
        if (image_key in columns if image_key is not None
                else any(c.strip().lower() in IMAGE_COLUMNS for c in columns)):
            return d
    return next((d for d in order if len(_header(text, d)) > 1), order[0])


def _csv(path: Path, shown: str, classnames, image_key, caption_key, label_key, delimiter):
    raw = path.read_bytes()
    try:
        text, mangled = raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:  # rows with invalid bytes become bad samples, below
        text, mangled = raw.decode("utf-8-sig", errors="replace"), True
    if delimiter is None:
        delimiter = _separator(text, path, image_key)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        columns = reader.fieldnames or []
        rows = list(reader)
    except csv.Error as e:
        raise ValueError(f"{shown}: not a readable table ({e}); check the separator "
                         f"({_option('delimiter')}) and the file's quoting") from e
    image_key = _find(columns, image_key, IMAGE_COLUMNS, "image_key", shown)
    if caption_key is None and label_key in columns and not any(
            c.strip().lower() in CAPTION_COLUMNS for c in columns):
        is_labels = True
    else:
        caption_key = _find(columns, caption_key, CAPTION_COLUMNS, "caption_key", shown,
                            f" (evaluation data: a {label_key!r} column instead)")
        is_labels = False
    log.info("abd_fast.data: %s: image column %r, %s column %r, %s-separated", shown,
             image_key, "label" if is_labels else "caption",
             label_key if is_labels else caption_key, SEPARATORS.get(delimiter, repr(delimiter)))
    base = path.parent
    files = [str(base / (r[image_key] or "").strip()) for r in rows]
    n = len(rows)
    problems: dict[int, str] = {}
    m = Manifest(shown, "labels-csv" if is_labels else "captions-csv",
                 np.arange(n, dtype=np.int64), files, np.full(n, -1, np.int64),
                 np.full(n, -1, np.int64),
                 fingerprint=_fingerprint("csv", _stat_key([path]), image_key, caption_key,
                                          label_key, delimiter))
    for i, r in enumerate(rows):
        if not (r[image_key] or "").strip():
            problems[i] = "missing file (empty path)"
        elif mangled and any("\ufffd" in (v or "") for v in r.values() if isinstance(v, str)):
            problems[i] = "invalid UTF-8 in the row"
    if is_labels:
        labels = np.full(n, -1, np.int64)
        for i, r in enumerate(rows):
            try:
                labels[i] = int(r[label_key])
            except (TypeError, ValueError):
                problems.setdefault(i, f"bad label {r[label_key]!r}")
        m.labels = labels
        beside = path.parent / "classnames.txt"
        m.classnames = _read_classnames(classnames if classnames is not None else
                                        (beside if beside.exists() else None), 0, shown)
    else:
        m.captions = [(r[caption_key] or "") for r in rows]
        for i, c in enumerate(m.captions):
            if not c.strip():
                problems.setdefault(i, "empty caption")
    m.problems = problems
    return m


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1K wnids in class-index order (from timm, an open_clip dependency)."""
    from importlib.resources import files
    text = files("timm.data._info").joinpath("imagenet_synsets.txt").read_text()
    return text.split()


def _imagefolder(root: Path, shown: str, classnames):
    folders = sorted(q.name for q in root.iterdir() if q.is_dir() and not q.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(folders):
        for dirpath, dirnames, names in os.walk(root / name):
            dirnames.sort()
            for fn in sorted(names):
                if fn.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    files.append(os.path.join(dirpath, fn))
                    labels.append(label)
    n = len(files)
    if classnames is None and (root / "classnames.txt").exists():
        classnames = root / "classnames.txt"
    names = _read_classnames(classnames, len(folders), shown)
    if names is None and folders and all(_WNID.match(f) for f in folders):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise ValueError(f"{shown}: folders {unknown[:3]} are not ImageNet-1K wnids; "
                             "give a classnames file")
        names = [IMAGENET_CLASSNAMES[index[f]] for f in folders]
    if names is None:  # plain folders: their names are the class names
        names = [f.replace("_", " ") for f in folders]
    listing = [os.path.relpath(f, root) for f in files]
    return Manifest(shown, "imagefolder", np.arange(n, dtype=np.int64), files,
                    np.full(n, -1, np.int64), np.full(n, -1, np.int64),
                    labels=np.asarray(labels, np.int64), classnames=names,
                    fingerprint=_fingerprint("imagefolder", os.path.abspath(root), listing))


def scan_shard(path: str) -> list[dict]:
    """Samples of one WebDataset tar in order: dicts with key, image offset/size (or None),
    caption (or None). The key is the member path up to the first '.' of its basename."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, base = posixpath.split(m.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                key, ext = posixpath.join(d, stem), ext.lower()
                s = samples.setdefault(key, {"key": key, "offset": None, "size": None,
                                             "caption": None})
                if ext in IMAGE_EXTS and s["offset"] is None:
                    s["offset"], s["size"] = m.offset_data, m.size
                elif ext == "txt":
                    s["caption"] = tf.extractfile(m).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # A shard cut short (an interrupted download) keeps the samples read before the
        # damage; a member cut in two fails its read and is counted as a bad sample.
        log.warning("abd_fast.data: shard %s is damaged after %d samples (%s: %s); "
                    "the rest of it is skipped", path, len(samples), type(e).__name__, e)
    return list(samples.values())


def _webdataset(shown: str, shards: list[str]) -> Manifest:
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"data source {shown!r}: shard {missing[0]!r} does not exist"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    from .validate import cached_json  # the scan is cached with the validation index
    fingerprint = _fingerprint("webdataset", _stat_key(shards))
    scans = cached_json(f"scan-{fingerprint}", lambda: [scan_shard(s) for s in shards])
    files, ids, offsets, sizes, captions, problems = [], [], [], [], [], {}
    for shard, samples in zip(shards, scans):
        for s in samples:
            i = len(files)
            files.append(shard)
            ids.append(wds_sample_id(shard, s["key"]))
            offsets.append(s["offset"] if s["offset"] is not None else 0)
            sizes.append(s["size"] if s["size"] is not None else 0)
            captions.append(s["caption"] or "")
            if s["offset"] is None:
                problems[i] = "missing image"
            elif s["caption"] is None:
                problems[i] = "missing caption"
            elif not s["caption"].strip():
                problems[i] = "empty caption"
    ids = np.asarray(ids, np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        where = [f"{os.path.basename(files[i])}" for i in np.flatnonzero(ids == dup)[:2]]
        raise ValueError(f"{shown}: two samples share the id {dup} ({where}): sample keys must be "
                         "unique and shard basenames distinct")
    return Manifest(shown, "webdataset", ids, files, np.asarray(offsets, np.int64),
                    np.asarray(sizes, np.int64), captions=captions, problems=problems,
                    fingerprint=fingerprint)
