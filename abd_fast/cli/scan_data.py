"""`scan-data`: which training pairs are poisoned? Scores every image-caption pair of
--train-data from embeddings (abd_fast.scan.data; no trigger, no target) and writes
scan_data.csv, the pairs ranked most suspicious first; --drop-top K also writes
cleaned.csv, the data without the K most suspicious pairs, to train on."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from .common import (COMMON_DEFAULTS, Run, UsageError, check_int, check_path, loader_options,
                     open_caption_data, stage_parser)
from .scan import architecture, load_reference

NAME = "scan-data"
RANKING_FILE = "scan_data.csv"
CLEANED_FILE = "cleaned.csv"
SUMMARY_FILE = "scan_data.json"
DEFAULTS = dict(COMMON_DEFAULTS, checkpoint=None, reference_model=None, output=None,
                drop_top=None, poisoned_by=None)


def _flags(p):
    p.add_argument("--checkpoint", metavar="FILE",
                   help="the CLIP whose embeddings score the pairs (e.g. the model trained on "
                        "the data)")
    p.add_argument("--reference-model", metavar="FILE",
                   help="a clean CLIP of the same architecture: a pair's score becomes how "
                        "badly its image agrees with its caption under it (docs/SCAN.md)")
    p.add_argument("--drop-top", type=int, metavar="K",
                   help="also write cleaned.csv (image,caption): the data without the K "
                        "highest-scored pairs")
    p.add_argument("--poisoned-by", metavar="FILE",
                   help="measure the scan: a poisoning run's checkpoint (from `poison` on "
                        "--train-data); the pairs are scanned as that run poisoned them and "
                        "scan_data.json gets the AUROC and the precision at the poison count "
                        "(its poisoned ids only measure the scores, they never make them)")


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS, _flags,
                        help="rank the training pairs by how likely they are poisoned")


def check(cfg: dict):
    if cfg.get("checkpoint") is None:
        raise UsageError("--checkpoint is needed: the CLIP whose embeddings score the pairs")
    check_path(cfg, "reference_model", "file")
    check_path(cfg, "poisoned_by", "file")
    check_int(cfg, "drop_top", 0)
    if cfg.get("output") is None:
        cfg["output"] = str(Path(cfg["checkpoint"]).parent)
    cfg.update(architecture(cfg["checkpoint"], cfg))


def poison_view(path, manifest, image_size: int):
    """The PoisonView a `poison` run (its checkpoint's config) put over `manifest`."""
    from abd_fast.attacks import PoisonView, make_trigger
    from abd_fast.engine import load_checkpoint

    from .common import trigger_options, trigger_seed_of
    run = load_checkpoint(path, "--poisoned-by").get("config", {})
    if not run.get("attack") or not run.get("target_label"):
        raise UsageError(f"--poisoned-by {path}: not a poisoning run's checkpoint (its config "
                         "names no attack and target); give the checkpoint `poison` wrote")
    try:
        trigger = make_trigger(run["attack"], image_size=image_size, seed=trigger_seed_of(run),
                               **trigger_options(run))
        return PoisonView(manifest, trigger, target=run["target_label"], seed=run["seed"],
                          count=run.get("poison_count"), rate=run.get("poison_rate"))
    except (ValueError, OSError) as e:
        raise UsageError(f"--poisoned-by {path}: cannot re-create its poisoning ({e})") from e


def scan_training_data(run: Run, source, *, reference=None, poisoned_by=None):
    """(embeddings, scores, PoisonView or None) of every pair of `source`
    (abd_fast.scan.data.scan_pairs) with the run's model; poisoned_by: a poisoning run's
    checkpoint, whose PoisonView the pairs are seen through (as that victim saw them)."""
    from abd_fast.data import BadDataError, build_loader
    from abd_fast.scan.data import scan_pairs
    try:
        loader = build_loader(source, train=False, batch_size=250, image_size=run.spec.size,
                              loader=run.cfg.get("loader"), num_workers=run.cfg.get("workers"),
                              **loader_options(run.cfg))
    except (BadDataError, ValueError) as e:
        raise UsageError(f"--train-data {source}: {e}") from e
    poison = None if poisoned_by is None else poison_view(poisoned_by, loader.manifest,
                                                           run.spec.size)
    try:
        return (*scan_pairs(run.model, loader, run.tokenizer, mean=run.mean, std=run.std,
                            reference=reference, poison=poison, device=run.info.device), poison)
    except ValueError as e:
        raise UsageError(f"--train-data {source}: {e}") from e


def write_ranking(path: Path, emb, scores: dict):
    """CSV: rank, id, score, the signals it is made of, caption; most suspicious first."""
    import numpy as np

    from abd_fast.engine import atomic_write_text
    order = np.argsort(-scores["score"], kind="stable")
    signals = [k for k in scores if k != "score"]
    lines = [["rank", "id", "score", *signals, "caption"]]
    for r, i in enumerate(order, 1):
        lines.append([r, int(emb.ids[i]), f"{scores['score'][i]:.5g}",
                      *(f"{scores[k][i]:.5g}" for k in signals), emb.captions[i]])
    atomic_write_text(_csv_text(lines), path)
    return order


def write_cleaned(path: Path, manifest, drop_ids: set):
    """CSV image,caption of the manifest's pairs except drop_ids; images inside tar shards are
    copied out next to it (a CSV names image files)."""
    from abd_fast.engine import atomic_write_text
    images = path.parent / "cleaned_images"
    lines = [["image", "caption"]]
    for i in range(len(manifest)):
        sid = int(manifest.ids[i])
        if sid in drop_ids or i in manifest.problems:
            continue
        if int(manifest.offsets[i]) < 0:
            image = str(Path(manifest.files[i]).resolve())
        else:
            images.mkdir(exist_ok=True)
            image = f"cleaned_images/{sid}.jpg"
            (path.parent / image).write_bytes(manifest.read(i))
        lines.append([image, manifest.captions[i]])
    atomic_write_text(_csv_text(lines), path)
    return len(lines) - 1


def measure(emb, scores: dict, poison) -> dict:
    """How well the scores find the poisoned pairs (known only to measure): AUROC and the
    precision among the poison-count highest, for the score and each signal."""
    import numpy as np

    from abd_fast.scan.data import auroc, precision_at
    poisoned = np.isin(emb.ids, poison.poisoned_ids)
    out = {"auroc": auroc(scores["score"], poisoned),
           "precision_at_poison_count": precision_at(scores["score"], poisoned, poison.count),
           "poison_count": int(poisoned.sum())}
    out["signals_auroc"] = {k: round(auroc(v, poisoned), 4) for k, v in scores.items()
                            if k != "score"}
    return out


def _csv_text(rows) -> str:
    import io
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def run(cfg: dict) -> int:
    run = Run(cfg, weights_flag="--checkpoint")
    reference = load_reference(run, cfg.get("reference_model"))
    t0 = time.perf_counter()
    source = cfg.get("train_data") or run.synthetic.shards  # default: the embedded data
    emb, scores, poison = scan_training_data(run, source, reference=reference,
                                             poisoned_by=cfg.get("poisoned_by"))
    if not run.info.is_main:
        return 0
    out = Path(cfg["output"])
    order = write_ranking(out / RANKING_FILE, emb, scores)
    msg = f"scan-data: {len(order)} pairs ranked -> {out / RANKING_FILE}"
    if cfg.get("drop_top"):
        dropped = {int(emb.ids[i]) for i in order[:cfg["drop_top"]]}
        kept = write_cleaned(out / CLEANED_FILE, open_caption_data(cfg, source), dropped)
        msg += f"; {kept} pairs kept (top {cfg['drop_top']} dropped) -> {out / CLEANED_FILE}"
    summary = dict(pairs=len(order), reference_model=cfg.get("reference_model"),
                   score="reference disagreement" if reference is not None else "density",
                   seconds=round(time.perf_counter() - t0, 2))
    if poison is not None:
        summary.update(measure(emb, scores, poison), poisoned_by=cfg["poisoned_by"])
        msg += (f"; AUROC {summary['auroc']:.3f}, precision at the poison count "
                f"{summary['precision_at_poison_count']:.3f} ({poison.count} poisoned)")
    from abd_fast.engine import atomic_write_text
    atomic_write_text(json.dumps(summary, indent=1) + "\n", out / SUMMARY_FILE)
    print(f"{msg} ({summary['seconds']:.0f} s)", flush=True)
    return 0
