"""`scan`: is this CLIP backdoored, and toward which class? A per-class search for universal
perturbations (abd_fast.scan.model) that takes no target and no trigger; writes scan.json
(verdict, score, threshold, suspected target, per-class capture) and scan_uap.png (clean
images and the same images with the most anomalous class's perturbation), by default next
to the checkpoint (beside its eval.json)."""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from .common import (COMMON_DEFAULTS, Run, UsageError, check_int, check_number, check_path,
                     stage_parser)

NAME = "scan"
SCAN_FILE = "scan.json"
# docs/SCAN.md: 40 Adam steps of 8 images per class, geometry and restart, 2 random starts,
# over 500 evaluation images (half fit the perturbations, half measure them).
DEFAULTS = dict(COMMON_DEFAULTS, checkpoint=None, reference_model=None, output=None,
                geometries=None, steps=40, batch_size=8, lr=0.3, restarts=2, scan_images=500,
                threshold=None)
# Never read by the scan: a backdoor's target and trigger (the checkpoint's run may record them).
UNKNOWN_TO_THE_SCAN = ("target_label", "attack", "trigger_file", "trigger_option",
                       "patch_location", "patch_size", "trigger_seed")


def _flags(p):
    p.add_argument("--checkpoint", metavar="FILE", help="the CLIP to judge")
    p.add_argument("--reference-model", metavar="FILE",
                   help="a clean CLIP of the same architecture (e.g. the one the judged model "
                        "was fine-tuned from): the score becomes the capture gap between the "
                        "two under the same perturbations")
    p.add_argument("--geometries", metavar="LIST",
                   help="comma-separated UAP geometries: patch-<random|center|corner>-<side "
                        "fraction>, linf-<eps> (default: "
                        "patch-random-0.25,patch-center-0.25,linf-8/255)")
    p.add_argument("--steps", type=int, metavar="N", help="Adam steps per geometry")
    p.add_argument("--restarts", type=int, metavar="N",
                   help="random starts per class and geometry (the best by fit loss is kept)")
    p.add_argument("--scan-images", type=int, metavar="N",
                   help="evaluation images used (evenly spaced; half fit, half measure)")
    p.add_argument("--threshold", type=float, metavar="Z",
                   help="score above which the model is called backdoored (default: the one "
                        "calibrated on clean models, docs/SCAN.md)")


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS, _flags,
                        help="is this CLIP backdoored, toward which class? (no target, no "
                             "trigger needed)")


def check(cfg: dict):
    for key in UNKNOWN_TO_THE_SCAN:  # whatever the flags or a config file say
        cfg[key] = None
    if cfg.get("checkpoint") is None:
        raise UsageError("--checkpoint is needed: the CLIP to judge")
    check_path(cfg, "checkpoint", "file")
    check_path(cfg, "reference_model", "file")
    cfg.update(architecture(cfg["checkpoint"], cfg))
    if cfg.get("output") is None:
        cfg["output"] = str(Path(cfg["checkpoint"]).parent)
    check_int(cfg, "steps")
    check_int(cfg, "restarts")
    check_int(cfg, "scan_images", 4)
    if cfg.get("threshold") is not None:
        check_number(cfg, "threshold", -math.inf, math.inf)
    cfg["geometries"] = [g.name for g in geometries(cfg)]


def architecture(path, cfg) -> dict:
    """model and image size from an abd_fast checkpoint's run, unless given: nothing else of it
    (in particular not the target label it may record)."""
    from abd_fast.engine import CheckpointError, load_checkpoint
    try:
        run = load_checkpoint(path, "--checkpoint").get("config", {})
    except CheckpointError:
        return {}
    given = {k for k in ("model", "image_size") if cfg.get(k) != COMMON_DEFAULTS[k]}
    return {k: run[k] for k in ("model", "image_size") if run.get(k) is not None
            and k not in given}


def load_reference(run: Run, path):
    """The clean reference CLIP of the run's architecture, or None."""
    if not path:
        return None
    from abd_fast.models import WeightsError, create_model
    try:
        return create_model(run.cfg["model"], pretrained=path,
                            image_size=run.cfg.get("image_size")).to(run.info.device).eval()
    except WeightsError as e:
        raise UsageError(str(e).replace("--pretrained", "--reference-model", 1)) from e


def scan_val(run: Run, reference, purpose: str, saved=None) -> tuple[dict, object, list]:
    """The scan (this command's settings and the run's --seed) on the run's validation images,
    against the reference when given: how `uap --steer scan` and `uap-select --criterion scan`
    infer the target without knowing it. Returns (scan.json's fields, the val source, the
    class names). saved: the VAL_SCAN_FILE of an earlier run of this search (save_val_scan),
    read instead of searching again when it had the same inputs (val_scan_inputs)."""
    if saved is not None:
        return _load_val_scan(saved, run)
    from abd_fast.scan.model import scan_model
    s = _val_scan_settings(run.cfg)
    source, images, classnames = run.val_images(s["scan_images"], purpose)
    result, _ = scan_model(run.model, images, classnames, tokenizer=run.tokenizer,
                           mean=run.mean, std=run.std, reference=reference,
                           steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                           seed=run.cfg["seed"], restarts=s["restarts"])
    return result, source, classnames


def _val_scan_settings(cfg: dict) -> dict:
    """The search's settings: this command's defaults, with the steps of --scan-steps (a flag
    of `uap` and `uap-select`) when given."""
    s = {k: DEFAULTS[k] for k in ("scan_images", "steps", "batch_size", "lr", "restarts")}
    return s | ({"steps": cfg["scan_steps"]} if cfg.get("scan_steps") else {})


def scan_steps_flag(p, used_by: str):
    """--scan-steps of a command that runs scan_val (for `used_by`)."""
    p.add_argument("--scan-steps", type=int, metavar="N",
                   help=f"Adam steps per class, geometry and restart of the target search "
                        f"({used_by}; default: the scan command's {DEFAULTS['steps']})")


def check_scan_steps(cfg: dict, scans: bool, needs: str):
    """--scan-steps is an integer >= 1, given only when the command scans (else: `needs`)."""
    check_int(cfg, "scan_steps")
    if cfg.get("scan_steps") is not None and not scans:
        raise UsageError(f"--scan-steps sets the target search's steps, which only {needs} "
                         "runs; give that or drop the flag")


VAL_SCAN_FILE = "val_scan.json"  # a scan_val result, beside the output of the run that made it
WEIGHTS = ("checkpoint", "reference_model")


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def val_scan_inputs(run: Run) -> dict:
    """What scan_val's result depends on besides the code: the judged and reference weights
    (their paths, and their contents' SHA-256, by which they are compared), the validation
    data, the model's settings, the seed and the scan's."""
    c = run.cfg
    weights = {}
    for key in WEIGHTS:
        weights[key] = str(Path(c[key]).resolve()) if c.get(key) else None
        weights[f"{key}_sha256"] = _sha256(c[key]) if c.get(key) else None
    return {**weights, "val_data": str(c["val_data"]), "model": c["model"],
            "image_size": run.spec.size, "precision": c.get("precision"), "seed": c["seed"],
            **_val_scan_settings(c)}


def _by_content(key, saved: dict) -> bool:
    """Whether a saved val scan's input `key` is compared by content: weights whose SHA-256
    the file recorded (a file written before contents were recorded has paths only)."""
    return key in WEIGHTS and saved.get(f"{key}_sha256") is not None


def _same_input(key, saved: dict, ours: dict) -> bool:
    """One input of a saved val scan against this run's: weights by content (a run directory
    moved or copied keeps its scans), by path in a file written before contents were
    recorded; everything else by value."""
    if _by_content(key, saved):
        return saved[f"{key}_sha256"] == ours[f"{key}_sha256"]
    if key.endswith("_sha256"):  # compared with its path's key
        return True
    return saved.get(key) == ours[key]


def save_val_scan(path: Path, run: Run, result: dict, source, classnames: list):
    from abd_fast.engine import atomic_write_text
    atomic_write_text(json.dumps({"inputs": val_scan_inputs(run), "result": result,
                                  "val_source": str(source), "classnames": classnames},
                                 indent=1) + "\n", path)


def _load_val_scan(path, run: Run) -> tuple[dict, str, list]:
    try:
        saved = json.loads(Path(path).read_text())
        inputs, result = saved["inputs"], saved["result"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--val-scan {path}: not a {VAL_SCAN_FILE} written by `uap --steer "
                         f"scan` ({e})") from e
    ours = val_scan_inputs(run)
    differ = [k for k in ours if not _same_input(k, inputs, ours)]

    def shown(k):
        return f"{inputs.get(k)!r} vs {ours[k]!r}" + (", contents differ"
                                                     if _by_content(k, inputs) else "")
    if differ:
        raise UsageError(f"--val-scan {path}: made with other {', '.join(differ)} than this run "
                         f"({'; '.join(shown(k) for k in differ)}); drop the flag to run the "
                         "scan here")
    return result, saved["val_source"], saved["classnames"]


def geometries(cfg):
    from abd_fast.scan.model import DEFAULT_GEOMETRIES, Geometry
    if not cfg.get("geometries"):
        return DEFAULT_GEOMETRIES
    names = cfg["geometries"]
    names = names.split(",") if isinstance(names, str) else names
    try:
        return tuple(Geometry.parse(n) for n in names if n.strip())
    except ValueError as e:
        raise UsageError(f"--geometries: {e}") from e


def run(cfg: dict) -> int:
    from abd_fast.engine import atomic_write_text
    from abd_fast.scan.model import save_uap_png, scan_images, scan_model
    run = Run(cfg, weights_flag="--checkpoint")
    reference = load_reference(run, cfg.get("reference_model"))
    t0 = time.perf_counter()
    images, classnames = scan_images(run.eval_source, cfg["scan_images"],
                                     image_size=run.spec.size, classnames=run.classnames_file,
                                     loader=cfg.get("loader"), num_workers=cfg.get("workers"))
    if not classnames:
        raise UsageError(f"--eval-data {run.eval_source}: no class names; give --classnames")
    result, search = scan_model(run.model, images, classnames, tokenizer=run.tokenizer,
                                mean=run.mean, std=run.std, reference=reference,
                                geometries=geometries(cfg), threshold=cfg.get("threshold"),
                                steps=cfg["steps"], batch_size=cfg["batch_size"],
                                lr=cfg["lr"], seed=cfg["seed"], restarts=cfg["restarts"])
    result.update(checkpoint=str(cfg["checkpoint"]), reference_model=cfg.get("reference_model"),
                  model=cfg["model"], eval_data=str(run.eval_source),
                  seconds=round(time.perf_counter() - t0, 2))
    if run.info.is_main:
        out = Path(cfg["output"])
        cls = result["most_anomalous_class"]
        g = [x.name for x in search.geometries].index(result["geometry"])
        column = [classnames[c] for c in search.classes].index(cls)
        save_uap_png(images, *search.uap(g, column), out / "scan_uap.png")
        atomic_write_text(json.dumps(result, indent=1) + "\n", out / SCAN_FILE)
        verdict = (f"BACKDOORED, suspected target {result['suspected_target']!r}"
                   if result["backdoored"] else "no backdoor found")
        print(f"scan: {verdict} (score {result['score']:.2f}, threshold "
              f"{result['threshold']:.2f}, {result['mode']} mode; most anomalous class "
              f"{cls!r} under {result['geometry']}; {result['seconds']:.0f} s) -> "
              f"{out / SCAN_FILE}", flush=True)
    return 0
