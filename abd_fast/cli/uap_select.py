"""`uap-select`: choose among candidate UAPs (trained by `uap` with different geometries and
backdoor losses) without the target or the trigger, on the validation split
(abd_fast.defenses.select): per candidate, the class it captures far more on the poisoned
model than on the clean reference; the candidate with the largest such gain wins. With
--criterion scan (ours, docs/METHOD.md), when the scan of the poisoned model on the same
validation images flags it, the gain is read on the class the scan suspects. Writes
OUTPUT/uap.pt (a copy of the chosen UAP, what `defend --uap` takes) and
OUTPUT/selection.json (every candidate's score, top class and per-class capture), and
OUTPUT/eval.json: the chosen candidate's own `uap` evaluation when it sits beside its file.
--val-scan reads the scan's result that a steered candidate (`uap --steer scan`, the same
search on the same images) recorded instead of running the scan again. --scan-threshold
sets the score above which that scan flags the model (default: the scan's calibrated one for
its mode; a threshold calibrated on your own clean fine-tunes: docs/SCAN.md)."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from .common import (COMMON_DEFAULTS, Run, UsageError, check_int, check_number, check_path,
                     require_val_data, stage_parser)
from .scan import (UNKNOWN_TO_THE_SCAN, architecture, check_scan_steps, load_reference,
                   scan_steps_flag)

NAME = "uap-select"
SELECTION_FILE = "selection.json"
DEFAULTS = dict(COMMON_DEFAULTS, checkpoint=None, reference_model=None, candidates=None,
                criterion="gain", val_scan=None, scan_steps=None, scan_threshold=None,
                val_images=1000, output="runs/uap-select")
CRITERIA = {"gain": "largest per-class capture gain (points) of the poisoned model over the "
                    "reference on the validation images; no labels, no target",
            "scan": "capture gain (points) of the poisoned model over the reference on the "
                    "class the scan of the validation images suspects (the largest gain on any "
                    "class when the scan does not flag the model); no labels, no target"}


def _flags(p):
    p.add_argument("--checkpoint", metavar="FILE", help="the poisoned model's weights")
    p.add_argument("--reference-model", metavar="FILE",
                   help="the clean model's weights (required: the score is the capture gain "
                        "of the poisoned model over it)")
    p.add_argument("--candidates", metavar="LIST",
                   help="comma-separated UAP files (uap.pt) or `uap` output directories")
    p.add_argument("--criterion", choices=list(CRITERIA),
                   help="gain: the largest capture gain on any class; scan: the gain on the "
                        "class `scan` suspects on the validation images, when it flags the "
                        "model (ours: docs/METHOD.md)")
    p.add_argument("--val-scan", metavar="FILE",
                   help="--criterion scan: the val_scan.json of a `uap --steer scan` run on the "
                        "same --checkpoint, --reference-model, --val-data and --seed (the "
                        "same search), read instead of scanning again")
    p.add_argument("--val-images", type=int, metavar="N",
                   help="validation images used (evenly spaced over the listing)")
    scan_steps_flag(p, "--criterion scan")
    p.add_argument("--scan-threshold", type=float, metavar="Z",
                   help="--criterion scan: the score above which the scan flags the model "
                        "(default: the scan's calibrated threshold for its mode, docs/SCAN.md)")


# `pipeline --uap-candidates GEOM:LOSS[:steer],...`: each candidate's `uap` flags, the
# geometry's first. `steer` (ours): the UAP is also steered toward the class the scan of the
# validation images suspects (`uap --steer scan`; weight 10, the one value tried).
GEOMETRIES = {"corner": ["--mode", "patch", "--patch-place", "corner"],
              "random": ["--mode", "patch", "--patch-place", "random"],
              "linf": ["--mode", "linf"],
              "patch+linf": ["--mode", "patch+linf", "--patch-place", "random"]}
LOSSES = ("paper", "differential")
STEER = ["--steer", "scan", "--lambda-steer", "10"]


def candidate_specs(text) -> dict:
    """'corner:paper,random:differential:steer' -> {"corner-paper": [uap flags],
    "random-differential-steer": [...]}; a bare GEOM means GEOM:paper."""
    out = {}
    for item in (s.strip() for s in str(text).split(",") if s.strip()):
        geom, loss, steer, *rest = item.split(":") + ["", ""]
        loss = loss or "paper"
        if geom not in GEOMETRIES or loss not in LOSSES or steer not in ("", "steer") or any(rest):
            raise UsageError(f"--uap-candidates {item!r}: expected GEOMETRY[:LOSS[:steer]] "
                             f"with GEOMETRY one of {', '.join(GEOMETRIES)} and LOSS one of "
                             f"{', '.join(LOSSES)} (e.g. corner:paper,linf:differential,"
                             "random:differential:steer)")
        name = f"{geom.replace('+', '')}-{loss}" + ("-steer" if steer else "")
        out[name] = [*GEOMETRIES[geom], "--bd-loss", loss, *(STEER if steer else [])]
    if not out:
        raise UsageError("--uap-candidates is empty: give GEOMETRY[:LOSS],... "
                         "(e.g. corner:paper,linf:differential)")
    return out


def steered(flags) -> bool:
    """Whether a candidate's `uap` flags (candidate_specs' values) steer it toward the scan's
    class: it then also writes its scan of the val images (cli.scan.VAL_SCAN_FILE)."""
    return "--steer" in flags


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS, _flags,
                        help="choose among candidate UAPs on the validation split, without "
                             "the target or the trigger (capture gain over the reference)")


def candidate_files(text) -> dict:
    """{name: uap.pt path} from --candidates; a name is the file's directory name (the `uap`
    run's --output) or, for another file name, its stem."""
    names = text.split(",") if isinstance(text, str) else list(text or [])
    out = {}
    for entry in (n.strip() for n in names if str(n).strip()):
        path = Path(entry)
        path = path / "uap.pt" if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--candidates: {path}: no such file (the `uap` stage writes "
                             "uap.pt in its --output)")
        name = path.parent.name if path.name == "uap.pt" else path.stem
        while name in out:
            name += "'"
        out[name] = path
    if not out:
        raise UsageError("--candidates is needed: the UAP files (uap.pt) to choose among")
    return out


def flagged_at(found: dict, threshold: float) -> dict:
    """A scan's result (scan.json's fields) with its verdict at another threshold: the score
    and the most anomalous class do not depend on it (abd_fast.scan.model.verdict)."""
    backdoored = found["score"] > threshold
    return dict(found, threshold=threshold, backdoored=backdoored,
                suspected_target=found["most_anomalous_class"] if backdoored else None)


def check(cfg: dict):
    for key in UNKNOWN_TO_THE_SCAN:  # the choice never reads a target or a trigger
        cfg[key] = None
    for key, what in (("checkpoint", "the poisoned model"),
                      ("reference_model", "the clean reference model")):
        if cfg.get(key) is None:
            raise UsageError(f"--{key.replace('_', '-')} is needed: {what}'s weights")
        check_path(cfg, key, "file")
    check_path(cfg, "val_data", "data")
    check_path(cfg, "val_scan", "file")
    require_val_data(cfg, "the choice among the candidates")
    check_int(cfg, "val_images", 4)
    if cfg["criterion"] not in CRITERIA:
        raise UsageError(f"--criterion {cfg['criterion']!r}: one of {', '.join(CRITERIA)}")
    if cfg["val_scan"] is not None and cfg["criterion"] != "scan":
        raise UsageError("--val-scan is the scan's result for --criterion scan; give that "
                         "criterion or drop the flag")
    if cfg.get("scan_threshold") is not None:
        if cfg["criterion"] != "scan":
            raise UsageError("--scan-threshold is the scan's threshold for --criterion scan; "
                             "give that criterion or drop the flag")
        check_number(cfg, "scan_threshold", -math.inf, math.inf)
    check_scan_steps(cfg, cfg["criterion"] == "scan", "--criterion scan")
    cfg["candidates"] = [str(p) for p in candidate_files(cfg.get("candidates")).values()]
    cfg.update(architecture(cfg["checkpoint"], cfg))


def run(cfg: dict) -> int:
    from abd_fast.defenses.select import choose, score_uaps
    from abd_fast.defenses.uap import UAP
    from abd_fast.engine import atomic_write_text
    run = Run(cfg, weights_flag="--checkpoint")
    reference = load_reference(run, cfg["reference_model"])
    t0 = time.perf_counter()
    source, images, classnames = run.val_images(cfg["val_images"],
                                                "the choice among the candidates")
    files = candidate_files(cfg["candidates"])
    uaps = {}
    for name, path in files.items():
        uap = UAP.load(path, "--candidates")
        if uap.image_size != run.spec.size:
            raise UsageError(f"--candidates {path}: a UAP for {uap.image_size} px images, the "
                             f"model takes {run.spec.size} px")
        uaps[name] = uap
    scan, focus = None, None
    if cfg["criterion"] == "scan":
        from .scan import scan_val
        found, _, scan_classes = scan_val(run, reference, "--criterion scan's target search",
                                          saved=cfg["val_scan"])
        if scan_classes != classnames:
            raise UsageError(f"--val-data {source}: its class names changed between reads")
        if cfg["scan_threshold"] is not None:
            found = flagged_at(found, cfg["scan_threshold"])
        scan = {k: found[k] for k in ("backdoored", "score", "threshold", "suspected_target",
                                      "most_anomalous_class", "mode", "geometry")}
        focus = found["suspected_target"] if found["backdoored"] else None
    scores = score_uaps(uaps, run.model, reference, images, classnames,
                        tokenizer=run.tokenizer, mean=run.mean, std=run.std, focus=focus)
    best = choose(scores)
    for s in scores:
        u = uaps[s["name"]]
        s.update(file=str(files[s["name"]]), mode=u.mode, place=u.place, eps=u.eps,
                 area=u.area)
    result = {"chosen": best["name"], "chosen_file": str(files[best["name"]]),
              "score": best["score"], "top_class": best["top_class"],
              "criterion": CRITERIA[cfg["criterion"]],
              **({"scan": scan} if scan is not None else {}),
              "checkpoint": str(cfg["checkpoint"]), "reference_model": cfg["reference_model"],
              "val_data": str(source), "n_images": len(images),
              "seconds": round(time.perf_counter() - t0, 2), "candidates": scores}
    if run.info.is_main:
        out = Path(cfg["output"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[best["name"]], out / "uap.pt.tmp")
        (out / "uap.pt.tmp").replace(out / "uap.pt")
        atomic_write_text(json.dumps(result, indent=1) + "\n", out / SELECTION_FILE)
        # the chosen candidate's own evaluation (its `uap` run's eval.json), for the report
        chosen_eval = files[best["name"]].parent / "eval.json"
        if chosen_eval.is_file():
            ev = json.loads(chosen_eval.read_text())
            ev["selected_from"] = SELECTION_FILE
            atomic_write_text(json.dumps(ev, indent=1) + "\n", out / "eval.json")
        for s in sorted(scores, key=lambda s: -s["score"]):
            print(f"  {s['name']:<28} score {s['score']:6.2f}  top class {s['top_class']}",
                  flush=True)
        print(f"uap-select: {best['name']} (gain {best['score']:.2f} points on "
              f"{best['top_class']!r}) -> {out / 'uap.pt'}, {out / SELECTION_FILE}", flush=True)
    return 0
