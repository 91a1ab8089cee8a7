"""The one-command job: `python -m abd_fast.train` (no arguments) or `... pipeline [flags]`.

    data -> clean CLIP (trained, or reused from the cache), its backdoor scan ->
    per attack: (badclip trigger ->) poisoned victim -> its floor (the clean CLIP under the
    victim's trigger), backdoor scans (the victim; its poisoned training pairs), ABD's UAP,
    the defenses (ft, cleanclip, abd; --full adds roclip) -> with --ablations or --full, on
    the first attack, ABD's Table II and III ->
    similarity analysis, embeddings ->
    OUTPUT/report.json, report.md, ca_asr.png, embedding.png, similarity.png

Every stage is a run of an existing command (`pretrain`, `poison`, `uap`, `defend`, ...)
called in-process with its flags (with --jobs N > 1: up to N at once, each in its own
process; abd_fast/cli/stages.py) into OUTPUT/<stage>/, which then holds that command's
checkpoint.pt and eval.json plus stage.json (the stage's flags and wall time); a finished
training stage's checkpoint.pt keeps its weights and config only (engine.strip_checkpoint:
a third of the size). A stage whose stage.json records the same flags and whose outputs
exist is skipped on a re-run, and an interrupted training stage resumes from its last
checkpoint (written every STAGE_CHECKPOINT_STEPS optimizer steps), so a killed pipeline
loses at most those steps.

--seeds K1,K2,...: the clean CLIP once (first seed, shared), everything after it per seed
into OUTPUT/seed<k>/, and OUTPUT/report.* as mean ± std over the seeds (_run_seeds).

Settings: each stage's defaults are its command's (DEFAULTS in abd_fast/cli/<command>.py);
the pipeline changes them only through DEMO_OVERRIDES (the embedded data's), PIPELINE_FLAGS
(the defenses' paper-shaped budget), QUICK_OVERRIDES (--quick, the CI smoke run), POISON
(the victims' poisoning settings) and a --config's stage-flags (e.g.
configs/paper/pipeline.yaml).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from . import badclip_trigger, defend, poison, pretrain, scan, scan_data, uap, uap_select
from .common import (UsageError, caption_data_flags, check_flag_values, check_int,
                     check_number, check_output, check_path, check_val_apart, loader_options,
                     own_settings, require_val_data, source_options, speed_flags)
from .stages import Stages, StageCancelled, StageError, WorkerPool, clock

NAME = "pipeline"
# The pipeline's departures from the uap/defend defaults (cli/uap.py, cli/defend.py: the
# demo's recipe, measured: docs/METHOD.md). Keys are commands or `command:variant`; values
# map flag names (without "--") to values. Before --quick and a config's stage-flags, which
# override them.
# On the embedded data only (none today; the defenses' budget follows the rule below).
DEMO_OVERRIDES = {}
# Always: every defense gets the paper-shaped budget of its victim's poisoning (defend
# --budget paper, abd_fast.defenses.budget): the same clean pairs, steps and lr for FT,
# CleanCLIP, RoCLIP and ABD, steps x lr = 3x the poisoning's, >= 2 epochs (RoCLIP's
# nearest-neighbour positives start in the second). A config's `defend: {budget: fixed}`
# restores its own --lr/--epochs/--max-samples.
# ABD's adversarial view goes on CleanCLIP's AutoAugment view (the paper calls it a data
# augmentation): chosen on the validation split, where it gave the lower ASR on all three
# victims of the default demo (docs/METHOD.md; one recipe for every attack).
PIPELINE_FLAGS = {"defend": {"budget": "paper"}, "defend:abd": {"adv-view": "autoaugment"}}
# How the victims are poisoned: 1% of the pairs (the paper: 0.3%), with the poison command's
# fine-tune (10 epochs, lr 1.5e-3; from weights abd_fast did not train, the paper's steps x lr)
# of the converged clean model. Measured on a validation
# split (docs/ATTACKS.md, seed 0): badnet 92.9%, blended 83.0%, badclip 98.3%. 5 epochs
# (half of every defense's steps too) missed the bars at seed 1 on validation.
POISON = {"poison-rate": 0.01}
# ABD's UAP per victim: the paper's (AdvCLIP corner patch, ABD's backdoor loss), three
# geometries that can meet a global or moving trigger, with the differential backdoor loss,
# and (ours) the random-place patch steered toward the class the scan suspects; `uap-select
# --criterion scan` chooses among them on the validation split without the target: the
# capture gain on the class the scan suspects there when it flags the victim, else the largest
# gain (docs/METHOD.md, "Choosing a UAP without the target"; both chosen on val). The paper's
# comes first: it wins ties.
UAP_CANDIDATES = ("corner:paper,random:differential,linf:differential,"
                  "patch+linf:differential,random:differential:steer")
UAP_CRITERION = "scan"
# --scan-threshold calibrate (docs/SCAN.md, "Calibration"): the reference-mode threshold from
# clean fine-tunes of the clean model (--calibration-finetunes of them, at seeds --seed + 1,
# + 2, ...), the victims' poisoning recipe without poisons, each scanned against the clean
# model on the validation split.
CALIBRATE = "calibrate"
CALIBRATION_FINETUNES = 2
CALIBRATION_RECIPE = ("batch_size", "epochs", "lr", "warmup", "max_samples")
# --quick: a CI smoke run on a small synthetic set; checks the mechanics, not the numbers.
QUICK_DATA = dict(n_train=512, n_eval_per_class=10, per_shard=256)
QUICK_OVERRIDES = {
    "common": {"batch-size": 64, "epochs": 1, "warmup": 2},
    "pretrain": {"epochs": 2},
    "badclip-trigger": {"steps": 5, "target-images": 16},
    "similarity_batches": 1,
    "scan": {"steps": 3, "scan-images": 60},
    "target-search": {"scan-steps": 3},  # the scan of `uap --steer scan`, `uap-select`
}
BADCLIP_STEPS = 200          # badclip-trigger's own default
SIMILARITY_BATCHES = 4       # x 250 caption pairs for the similarity analysis
EMBEDDING_IMAGES = 500       # eval images in embedding.png, evenly spaced over the eval set
VAL_COMMANDS = ("uap", "defend")  # the stages given --val-data (recipe choices are made there)
DEFAULT_ATTACKS = ("badnet", "blended", "badclip")
# The demo's defenses: Table I's issue-17 comparison. --full adds RoCLIP (it collapses at the
# shared budget on the embedded data, docs/METHOD.md) and ABD's ablations (Table II, III).
DEFAULT_DEFENSES = ("ft", "cleanclip", "abd")
FULL_DEFENSES = ("ft", "cleanclip", "roclip", "abd")
# --jobs when not given: 2 on the embedded data on a CPU with >= 2 torch threads (the tiny
# model leaves a core idle: the demo ran 1.25x faster, docs/PERFORMANCE.md), else 1. Not in
# --quick, whose tests run stages in-process.
AUTO_JOBS = 2
CACHE_VERSION = 5            # bump when pretrain's meaning or arithmetic changes: old cached models
                             # are ignored (3: math attention under bf16 on a CPU; 4: 1x1
                             # convolutions as matrix products on a CPU, models.PointwiseConv2d;
                             # 5: the token embedding's sparse gradient, engine.SparseRowAdamW)


def _flags(d: dict) -> list[str]:
    """{"epochs": 1, "no-eda": True} -> ["--epochs", "1", "--no-eda"]."""
    out = []
    for k, v in d.items():
        if v is True:
            out.append(f"--{k}")
        elif v not in (None, False):
            out += [f"--{k}", str(v)]
    return out


# ---- clean-model cache -----------------------------------------------------------------------

def clean_cache_key(pretrain_argv: list[str], data_version: str) -> str:
    """Hash of the pretrain flags (without --output) and the training data's version."""
    blob = json.dumps({"v": CACHE_VERSION, "argv": pretrain_argv, "data": data_version})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def clean_cache_dir() -> Path:
    from abd_fast.data.validate import cache_dir
    return cache_dir() / "clean-models"


CLEAN_FILES = ("checkpoint.pt", "eval.json")


def store_clean(stage_dir: Path, key: str, argv: list[str]):
    """Copies the clean stage's outputs into the cache, atomically (temp dir + rename)."""
    import tempfile
    final = clean_cache_dir() / key
    if (final / "eval.json").exists():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        for f in CLEAN_FILES:
            shutil.copy2(stage_dir / f, tmp / f)
        (tmp / "pretrain.json").write_text(json.dumps({"argv": argv}, indent=1) + "\n")
        os.rename(tmp, final)
    except OSError:
        if not (final / "eval.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- flags and settings ------------------------------------------------------------------------

def add_parser(subparsers):
    p = subparsers.add_parser(
        NAME, argument_default=argparse.SUPPRESS,
        help="the whole job: clean model -> victims -> UAP -> defenses -> ablations -> report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-data", metavar="PATH",
                   help="caption data (CSV/TSV or WebDataset shards); default: the embedded "
                        "synthetic dataset")
    p.add_argument("--eval-data", metavar="PATH",
                   help="ImageFolder or labels CSV (needed with --train-data)")
    p.add_argument("--val-data", metavar="PATH",
                   help="validation data for the uap/defend stages' recipe choices (ImageFolder "
                        "or labels CSV of the --eval-data classes); default: the synthetic val "
                        "split on the synthetic data, else none")
    p.add_argument("--classnames", metavar="FILE", help="class names of --eval-data")
    p.add_argument("--target-label", metavar="NAME",
                   help="the backdoor's target class (default on the synthetic data: star)")
    p.add_argument("--model", metavar="NAME", help="architecture (default abd-tiny-rn)")
    p.add_argument("--pretrained", metavar="FILE",
                   help="the clean model's weights; without it the clean model is trained on "
                        "--train-data first (and cached). Weights abd_fast did not train "
                        "(pretrained CLIP) are poisoned at the paper's steps x lr (poison --lr)")
    p.add_argument("--image-size", type=int, metavar="PX", help="image side (default: model's)")
    p.add_argument("--attacks", metavar="LIST",
                   help=f"comma list (default {','.join(DEFAULT_ATTACKS)})")
    p.add_argument("--defenses", metavar="LIST",
                   help=f"comma list (default {','.join(DEFAULT_DEFENSES)})")
    p.add_argument("--uap-candidates", metavar="LIST",
                   help="ABD's UAP chosen per victim among candidates "
                        "GEOMETRY[:LOSS[:steer]],... (geometries corner, random, linf, "
                        "patch+linf; losses paper, differential; steer: toward the class the "
                        "scan suspects) by `uap-select --criterion scan` on the validation "
                        "split, without the target; one candidate: that UAP alone (default "
                        f"{UAP_CANDIDATES})")
    p.add_argument("--scan-threshold", type=_threshold, metavar="Z|calibrate",
                   help="the reference-mode scan threshold: the victims' scans and the "
                        "validation scan behind ABD's UAP choice flag a model whose score "
                        "exceeds it (default: 2.7, calibrated on the embedded data's models). "
                        f"'{CALIBRATE}': calibrate it in the run, on your data: "
                        "clean fine-tunes of the clean model (the victims' poisoning without "
                        "poisons) scanned on the validation split, their largest score + 1 "
                        "(docs/SCAN.md)")
    p.add_argument("--calibration-finetunes", type=int, metavar="N",
                   help="with --scan-threshold calibrate: how many clean fine-tunes (default "
                        f"{CALIBRATION_FINETUNES}; each costs a poisoning; more give a safer "
                        "largest score)")
    p.add_argument("--ablations", action="store_true",
                   help="also run ABD's Table II and III (on the first attack)")
    p.add_argument("--no-ablations", action="store_true",
                   help="no Table II and III (the default; with --full: all but them)")
    p.add_argument("--full", action="store_true",
                   help=f"the paper's whole comparison: --defenses {','.join(FULL_DEFENSES)} "
                        "(unless --defenses is given) and --ablations (unless --no-ablations)")
    p.add_argument("--quick", action="store_true",
                   help="a small smoke run (CI): small data, 1-2 epochs, numbers not meaningful")
    p.add_argument("--seed", type=int, help="seed of every stage (default 0)")
    p.add_argument("--seeds", metavar="LIST",
                   help="comma list of seeds (e.g. 0,1,2): the clean model once (first seed, "
                        "shared), then victims, UAPs, defenses and ablations per seed into "
                        "OUTPUT/seed<k>/; report.md/json give Table I-III as mean ± std "
                        "(default: one run with --seed, the usual layout)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="run up to N independent stages at once (each attack's chain, the UAP "
                        "candidates, the defenses of a victim) in N worker processes with "
                        "1/N of the torch threads; the clean model first with all of them. On "
                        "small models this uses the cores better than one stage's threads "
                        "(docs/PERFORMANCE.md). Numbers differ from --jobs 1 by the threads' "
                        "rounding only (default: 2 on the embedded data on a CPU with >= 2 "
                        "threads, else 1: one stage at a time, in-process)")
    p.add_argument("--loader", choices=["torch", "dali"], help="decoding engine")
    p.add_argument("--workers", type=int, metavar="N", help="decoding workers per process")
    speed_flags(p)  # given: passed to every stage; else each stage's own default
    p.add_argument("--recipe", metavar="NAME",
                   help="recipe name for the report (abd-paper prints the paper's numbers)")
    p.add_argument("--output", metavar="DIR", help="run directory (default runs/demo; "
                   "runs/quick with --quick)")
    p.add_argument("--config", metavar="FILE", help="YAML of these flags; flags override it")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry: a re-run always skips completed stages")
    caption_data_flags(p)  # given to every stage
    return p


PIPELINE_DEFAULTS = dict(
    train_data=None, eval_data=None, val_data=None, classnames=None, target_label=None,
    model="abd-tiny-rn", pretrained=None, image_size=None, attacks=",".join(DEFAULT_ATTACKS),
    defenses=None, uap_candidates=UAP_CANDIDATES, scan_threshold=None,
    calibration_finetunes=None, ablations=False,
    no_ablations=False, full=False, quick=False, seed=0, seeds=None, jobs=None, loader=None,
    workers=None, precision=None, compile=None, recipe=None, output=None, config=None,
    resume=False, stage_flags=None, csv_img_key=None, csv_caption_key=None, csv_separator=None,
    non_rgb=None)
CAPTION_DATA_FLAGS = ("csv_img_key", "csv_caption_key", "csv_separator", "non_rgb")


def _threshold(value: str):
    """--scan-threshold's value: a number or 'calibrate'."""
    if value == CALIBRATE:
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or '{CALIBRATE}', got "
                                         f"{value!r}") from None


def _settings(args, parser) -> dict:
    """Flags given > --config > defaults, validated before any work (UsageError names the
    flag)."""
    cfg = own_settings(args, parser, PIPELINE_DEFAULTS, raw=("stage-flags",))
    cfg["stage_flags"] = parse_stage_flags(cfg["stage_flags"], f"--config {cfg['config']}")
    from abd_fast.attacks import ATTACKS
    from abd_fast.defenses.stages import METHODS
    if cfg["ablations"] and cfg["no_ablations"]:
        raise UsageError("give --ablations or --no-ablations, not both")
    cfg["ablations"] = (cfg["ablations"] or cfg["full"]) and not cfg["no_ablations"]
    if cfg["defenses"] is None:
        cfg["defenses"] = ",".join(FULL_DEFENSES if cfg["full"] else DEFAULT_DEFENSES)
    for key, known in (("attacks", ATTACKS), ("defenses", METHODS)):
        cfg[key] = _name_list(cfg, key, known)
    candidates = _uap_candidates(cfg)  # a bad list: said here
    if cfg["output"] is None:
        cfg["output"] = "runs/quick" if cfg["quick"] else "runs/demo"
    check_path(cfg, "train_data", "data")
    check_path(cfg, "eval_data", "data")
    check_path(cfg, "val_data", "data")
    check_val_apart(cfg)
    for key in ("classnames", "pretrained"):
        check_path(cfg, key, "file")
    if cfg["train_data"] is not None and cfg["eval_data"] is None:
        raise UsageError("--train-data needs --eval-data: an ImageFolder or labels CSV with the "
                         "classes, to measure clean accuracy and the attack success rate")
    if cfg["train_data"] is not None and cfg["target_label"] is None:
        raise UsageError("--target-label is needed with your own data: the class the backdoor "
                         "maps to (one of the --eval-data classes)")
    if "abd" in cfg["defenses"] and len(candidates) > 1:
        require_val_data(cfg, "the choice of ABD's UAP among --uap-candidates (or give "
                              "--uap-candidates corner:paper: the paper's UAP alone)")
    if cfg["scan_threshold"] == CALIBRATE:
        require_val_data(cfg, "--scan-threshold calibrate's scans of clean fine-tunes")
    elif cfg["scan_threshold"] is not None:
        check_number(cfg, "scan_threshold", -math.inf, math.inf)
    if cfg["calibration_finetunes"] is not None:
        if cfg["scan_threshold"] != CALIBRATE:
            raise UsageError("--calibration-finetunes is the number of clean fine-tunes of "
                             "--scan-threshold calibrate; give that too or drop the flag")
        check_int(cfg, "calibration_finetunes")
    for key in ("image_size", "workers"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or v < (1 if key == "image_size" else 0)):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= "
                             f"{1 if key == 'image_size' else 0}, got {v!r}")
    if cfg["jobs"] is None:
        cfg["jobs"] = auto_jobs(cfg)
    if not isinstance(cfg["jobs"], int) or cfg["jobs"] < 1:
        raise UsageError(f"--jobs must be an integer >= 1, got {cfg['jobs']!r}")
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {cfg['seed']!r}")
    cfg["seeds"] = _seed_list(cfg["seeds"])
    if cfg["seeds"] is not None and getattr(args, "seed", None) is not None:
        raise UsageError("give --seed (one run) or --seeds (several), not both")
    from abd_fast.models import available_models
    if cfg["model"] not in available_models():
        raise UsageError(f"--model {cfg['model']!r} is not a known architecture (abd-tiny-rn, "
                         "abd-tiny-vit, RN50, ViT-B-32, ...)")
    check_output(cfg)
    return cfg


def auto_jobs(cfg) -> int:
    """--jobs when not given (AUTO_JOBS: the embedded demo on a CPU, not --quick)."""
    import torch
    demo = cfg["train_data"] is None and cfg["pretrained"] is None and not cfg["quick"]
    on_cpu = not torch.cuda.is_available()
    return AUTO_JOBS if demo and on_cpu and torch.get_num_threads() >= AUTO_JOBS else 1


def _seed_list(value) -> list[int] | None:
    """--seeds: a comma list of distinct non-negative integers (None: not given)."""
    if value is None:
        return None
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    if not items or not all(s.isdigit() for s in items) or len(set(map(int, items))) != \
            len(items):
        raise UsageError(f"--seeds {value!r}: expected distinct non-negative integers, "
                         "comma-separated (e.g. 0,1,2)")
    return [int(s) for s in items]


def _name_list(cfg, key: str, known) -> list[str]:
    """--attacks / --defenses: a comma list of known names, each once."""
    items = [s.strip() for s in str(cfg[key]).split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if bad or not items:
        raise UsageError(f"--{key} {cfg[key]!r}: " + (f"unknown {key[:-1]} {bad[0]!r}; " if
                                                      bad else "empty; ")
                         + f"choose from {', '.join(known)} (comma-separated)")
    if len(set(items)) != len(items):
        raise UsageError(f"--{key} {cfg[key]!r}: names a {key[:-1]} twice")
    return items


# Per-command flags a --config may add (`stage-flags:`, e.g. the paper's recipe in
# configs/paper/pipeline.yaml): `defend: {...}` for every defense, then `defend:abd: {...}`
# for one method (likewise `poison:<attack>`); appended last, so they override the demo's
# settings. The pipeline wires models, attacks and outputs between stages: those stay its own.
STAGE_COMMANDS = {m.NAME: m for m in (pretrain, badclip_trigger, poison, scan, scan_data, uap,
                                      defend)}
VARIANTS = {"poison": ("badnet", "blended", "wanet", "sig", "label-consistent", "badclip"),
            "defend": ("ft", "cleanclip", "roclip", "abd")}  # `defend:abd` etc. come last
PIPELINE_OWNED = ("output", "config", "resume", "checkpoint", "pretrained", "reference-model",
                  "attack", "trigger-file", "method", "uap", "target-label", "model",
                  "no-backdoor-loss", "no-adv", "no-eda",
                  "scan-steps")  # uap's and uap-select's target search: the same in both


def parse_stage_flags(value, where: str) -> dict:
    """{command: {flag: value}} of a config's `stage-flags`, each flag checked by the
    command's own parser."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: stage-flags must map a command ({', '.join(STAGE_COMMANDS)}) "
                         "to its flags, e.g. `defend: {lr: 3.0e-6, epochs: 10}`")
    out = {}
    for cmd, flags in value.items():
        base, _, variant = str(cmd).partition(":")
        if base not in STAGE_COMMANDS or (variant and variant not in VARIANTS.get(base, ())):
            raise UsageError(f"{where}: stage-flags: unknown key {cmd!r}; keys are "
                             f"{', '.join(STAGE_COMMANDS)}, poison:<attack> "
                             f"({', '.join(VARIANTS['poison'])}) and defend:<method> "
                             f"({', '.join(VARIANTS['defend'])})")
        if not isinstance(flags, dict):
            raise UsageError(f"{where}: stage-flags: {cmd}: expected a mapping of flag names to "
                             "values")
        flags = {str(k).replace("_", "-"): v for k, v in flags.items()}
        owned = [k for k in flags if k in PIPELINE_OWNED]
        if owned:
            raise UsageError(f"{where}: stage-flags: {cmd}: {owned[0]} is set by the pipeline "
                             "(it wires the stages together); use the pipeline's own flag if "
                             "it has one")
        check_flag_values(flags, _command_parser(base), f"{where}: stage-flags: {cmd}")
        out[cmd] = flags
    return out


def _command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one stage command, as the dispatcher builds it."""
    from .common import Parser
    return STAGE_COMMANDS[name].add_parser(Parser().add_subparsers(parser_class=Parser))


def _data(cfg) -> dict:
    """Paths of the training/eval data, class names and a version string of the training
    data (the clean-model cache key)."""
    if cfg["train_data"] is None:
        from abd_fast.data import synthetic
        kw = QUICK_DATA if cfg["quick"] else {}
        ds = synthetic.ensure_dataset(seed=0, **kw)
        data = dict(train=ds.shards, eval=str(ds.eval_dir),
                    val=str(cfg["val_data"] or ds.val_dir),
                    classnames=str(ds.eval_dir / "classnames.txt"),
                    names=list(ds.classnames), target=cfg["target_label"] or ds.target,
                    version=f"synthetic-v{synthetic.VERSION}-0-{json.dumps(kw, sort_keys=True)}")
    else:
        from abd_fast.data import BadDataError, open_source
        try:
            ev = open_source(cfg["eval_data"], classnames=cfg["classnames"])
            train = open_source(cfg["train_data"], **source_options(cfg))
        except (BadDataError, ValueError, OSError) as e:
            raise UsageError(f"--train-data/--eval-data: {e}") from e
        if not ev.classnames:
            raise UsageError(f"--eval-data {cfg['eval_data']}: no class names; give "
                             "--classnames FILE (one name per line, in label order)")
        if train.captions is None:
            raise UsageError(f"--train-data {cfg['train_data']}: no captions found; give "
                             "image-caption pairs (a CSV/TSV with image and caption columns "
                             "or WebDataset .jpg/.txt shards)")
        data = dict(train=str(cfg["train_data"]), eval=str(cfg["eval_data"]),
                    val=None if cfg["val_data"] is None else str(cfg["val_data"]),
                    classnames=cfg["classnames"], names=list(ev.classnames),
                    target=cfg["target_label"], version=train.fingerprint)
    if data["target"] not in data["names"]:
        names = data["names"]
        raise UsageError(f"--target-label {data['target']!r} is not a class of the evaluation "
                         f"data ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    return data


# ---- the pipeline ----------------------------------------------------------------------------

def run(args, parser, run_command) -> int:
    cfg = _settings(args, parser)
    data = _data(cfg)
    try:
        run_pipeline(cfg, data, run_command)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


# A stage's cost over its victim's poisoning's (the full-size demo at --jobs 2,
# bench/results/demo_trimmed.json: a defense takes the poisoning's steps; CleanCLIP and ABD
# encode two views): the ETA's weights and the order of stages run side by side.
RELATIVE_COST = {"ft": 0.6, "cleanclip": 1.05, "abd": 1.05, "roclip": 1.4, "ablation": 1.05,
                 "uap": 0.18, "uap-steer": 0.38, "uap-select": 0.06, "scan": 0.2,
                 "scan-data": 0.15, "floor": 0.01, "badclip-trigger": 0.2}


def plan_stages(cfg) -> dict:
    """Stage names in run order with a rough relative cost (pretrain epoch = 1)."""
    from abd_fast.defenses.ablation import UAP_DIRS, planned_rows
    q = cfg["quick"]
    poisoning = 1 if q else poison.DEFAULTS["epochs"]

    def cost(kind):
        return RELATIVE_COST[kind] * poisoning
    plan = {"clean": 0.2 if cfg["pretrained"] else (2 if q else pretrain.DEFAULTS["epochs"])}
    if "badclip" in cfg["attacks"]:
        plan["badclip-trigger"] = cost("badclip-trigger")
    for a in cfg["attacks"]:
        plan[f"poison-{a}"] = poisoning
    for a in cfg["attacks"]:
        plan[f"floor-{a}"] = cost("floor")
    plan["scan-clean"] = cost("scan")
    for k in calibration_seeds(cfg):
        plan[f"calib-ft{k}"], plan[f"calib-scan{k}"] = poisoning, cost("scan")
    for a in cfg["attacks"]:
        plan[f"scan-{a}"], plan[f"scan-data-{a}"] = cost("scan"), cost("scan-data")
    for a in cfg["attacks"]:
        if "abd" in cfg["defenses"]:
            candidates = _uap_candidates(cfg)
            if len(candidates) > 1:
                plan |= {f"uap-{a}-{name}":
                         cost("uap-steer" if uap_select.steered(flags) else "uap")
                         for name, flags in candidates.items()}
            plan[f"uap-{a}"] = cost("uap-select" if len(candidates) > 1 else "uap")
        for d in cfg["defenses"]:
            plan[f"{a}-{d}"] = cost(d)
    if cfg["ablations"]:
        a = cfg["attacks"][0]
        for name in planned_rows(known=_known_rows(cfg, a),
                                 uap_bd_given="abd" in cfg["defenses"]):
            plan[f"ablation-{a}-{name}"] = cost(
                "uap" if name in UAP_DIRS.values() else "ablation")
    plan["report"] = 1
    return plan


def calibration_seeds(cfg) -> range:
    """The offsets over --seed of --scan-threshold calibrate's fine-tunes (none without it)."""
    if cfg.get("scan_threshold") != CALIBRATE:
        return range(0)
    return range(1, (cfg.get("calibration_finetunes") or CALIBRATION_FINETUNES) + 1)


def stage_priority(cfg, plan: dict) -> dict:
    """{stage: its cost plus the costliest chain of planned stages waiting for it}: with
    --jobs, a free slot goes to the waiting stage with the most work behind it (BadCLIP's
    victim, once its trigger exists, before any scan; ABD's UAP candidates before a baseline)."""
    after = {"badclip-trigger": ["poison-badclip"]}
    ablations = [n for n in plan if n.startswith("ablation-")]
    for a in cfg["attacks"]:
        candidates = [n for n in plan if n.startswith(f"uap-{a}-")]
        defenses = [f"{a}-{d}" for d in cfg["defenses"]]
        after[f"poison-{a}"] = [f"floor-{a}", f"scan-{a}", *candidates, f"uap-{a}", *defenses]
        after[f"scan-{a}"] = [f"scan-data-{a}"]
        after |= dict.fromkeys(candidates, [f"uap-{a}"])
        after[f"uap-{a}"] = [f"{a}-abd"]
        if a == cfg["attacks"][0]:  # its ablations start after its defenses
            after |= {n: after.get(n, []) + ablations for n in (f"uap-{a}", *defenses)}
    for k in calibration_seeds(cfg):
        after[f"poison-{cfg['attacks'][0]}"].append(f"calib-ft{k}")  # its victim's recipe
        after[f"calib-ft{k}"] = [f"calib-scan{k}"]
        after[f"calib-scan{k}"] = [n for a in cfg["attacks"] for n in (f"scan-{a}", f"uap-{a}")]
    out = {}

    def level(name):
        if name not in out:
            out[name] = plan.get(name, 0) + max(
                (level(n) for n in after.get(name, ()) if n in plan), default=0)
        return out[name]
    return {name: level(name) for name in plan}


def _uap_candidates(cfg) -> dict:
    """{name: uap flags} of --uap-candidates."""
    return uap_select.candidate_specs(cfg["uap_candidates"])


def _known_rows(cfg, attack) -> set:
    """Ablation rows the attack's main defense runs already give (Table II ft / i_adv_t_eda,
    Table III uap_bd)."""
    out = set()
    sf = cfg["stage_flags"]  # the table's rows all run with ABD's recipe
    if "ft" in cfg["defenses"] and sf.get("defend:ft", {}) == sf.get("defend:abd", {}):
        out.add("ft")
    if "abd" in cfg["defenses"]:
        out |= {"i_adv_t_eda", "uap_bd_file", "uap_bd"}
    return out


class _StageFlags:
    """The flags the pipeline gives its stages: the data, model and seed every stage shares
    (`common`; `victim` adds the target and --quick's), and a stage's own settings
    (DEMO_OVERRIDES, PIPELINE_FLAGS) < --quick < the config's stage-flags (`of`)."""

    def __init__(self, cfg, data):
        self.cfg, self.quick = cfg, cfg["quick"]
        common = ["--train-data", data["train"], "--eval-data", data["eval"], "--model",
                  cfg["model"], "--seed", cfg["seed"]]
        if data["classnames"]:
            common += ["--classnames", data["classnames"]]
        for key in ("image_size", "loader", "workers", "precision", *CAPTION_DATA_FLAGS):
            if cfg[key] is not None:
                common += [f"--{key.replace('_', '-')}", cfg[key]]
        if cfg["compile"] is not None:
            common.append("--compile" if cfg["compile"] else "--no-compile")
        self.common = common
        self.q = _flags(QUICK_OVERRIDES["common"]) if self.quick else []
        self.victim = common + ["--target-label", data["target"]] + self.q
        self.demo = DEMO_OVERRIDES if cfg["train_data"] is None else {}
        # The validation data goes to the stages that make recipe choices only (VAL_COMMANDS),
        # so the other stages' flags (and the clean-model cache key) stay as they were.
        self.val = ["--val-data", data["val"]] if data["val"] else []
        self.threshold = _ScanThreshold(cfg["scan_threshold"])

    def extra(self, key) -> list:
        """The config's stage-flags of a command or a `command:variant`."""
        return _flags(self.cfg["stage_flags"].get(key, {}))

    def of(self, *keys) -> list:
        """The pipeline's flags of a stage: its own settings < --quick < the config's."""
        own = [f for k in keys
               for f in _flags({**self.demo.get(k, {}), **PIPELINE_FLAGS.get(k, {})})]
        val = self.val if keys[0].partition(":")[0] in VAL_COMMANDS else []
        return val + own + self.q + [f for k in keys for f in self.extra(k)]


class _ScanThreshold:
    """The reference-mode threshold given to the victims' scans and uap-select: none (the
    scan's own, so that a run without --scan-threshold keeps its stages' flags), its number,
    or with `calibrate` the one _calibrate_scan sets; until then those stages wait."""
    FLAG = {"scan": "--threshold", "uap-select": "--scan-threshold"}

    def __init__(self, value):
        self.value, self.ready = value, threading.Event()
        if value != CALIBRATE:
            self.ready.set()

    def set(self, value: float):
        self.value = value
        self.ready.set()

    def flags(self, command: str, st: Stages) -> list:
        while not self.ready.wait(0.5):
            if st.failed:
                raise StageCancelled("no scan threshold: its calibration did not finish")
        return [] if self.value is None else [self.FLAG[command], self.value]


def stage_threads(jobs: int) -> int:
    """Torch threads of each stage run side by side with --jobs (this process's over jobs)."""
    import torch
    return max(1, torch.get_num_threads() // jobs)


def _stages(cfg, root: Path, plan: dict, run_command) -> Stages:
    """The stage runner: --jobs stages at once, in --jobs workers of stage_threads."""
    spawn = WorkerPool(stage_threads(cfg["jobs"]), cfg["jobs"]) if cfg["jobs"] > 1 else None
    return Stages(root, plan, run_command, jobs=cfg["jobs"], spawn=spawn,
                  priority=stage_priority(cfg, plan))


def run_pipeline(cfg: dict, data: dict, run_command) -> dict:
    """Runs the plan's stages (skipping those done before) and writes the report.
    run_command(argv) -> exit status runs one command in-process. With --seeds: _run_seeds."""
    if cfg.get("seeds"):
        return _run_seeds(cfg, data, run_command)
    out = Path(cfg["output"])
    t_start = time.perf_counter()
    flags = _StageFlags(cfg, data)
    plan = plan_stages(cfg)
    print(f"pipeline: {len(plan)} stages into {out} (attacks {', '.join(cfg['attacks'])}; "
          f"defenses {', '.join(cfg['defenses'])}; target {data['target']!r}"
          + ("; --quick" if cfg["quick"] else "") + ")", flush=True)
    st = _stages(cfg, out, plan, run_command)
    notes = []
    try:
        clean = _clean_model(st, cfg, data, flags, notes)
        return _after_clean(st, cfg, data, flags, clean, out / "clean", notes, t_start)
    finally:
        st.close()


def _run_seeds(cfg: dict, data: dict, run_command) -> dict:
    """--seeds K1,K2,...: one clean model (trained with the first seed, shared), then per
    seed k everything after it (badclip trigger, victims, floors, scans, UAPs, defenses,
    ablations, analysis) with --seed k into OUTPUT/seed<k>/ (a full report each), and
    OUTPUT/report.json/.md with Table I-III as mean ± std over the seeds."""
    from abd_fast.report import aggregate_seeds, write_report
    out, seeds = Path(cfg["output"]), cfg["seeds"]
    t_start = time.perf_counter()
    first = dict(cfg, seed=seeds[0])
    plan = plan_stages(first)
    print(f"pipeline: seeds {', '.join(map(str, seeds))}, {len(plan) - 1} stages each after "
          f"one shared clean model, into {out}/seed<k> (attacks {', '.join(cfg['attacks'])}; "
          f"defenses {', '.join(cfg['defenses'])}; target {data['target']!r}"
          + ("; --quick" if cfg["quick"] else "") + ")", flush=True)
    st0 = _stages(cfg, out, {"clean": plan["clean"]}, run_command)
    notes = []
    clean = _clean_model(st0, first, data, _StageFlags(first, data), notes)
    notes.append(f"The clean model is shared by every seed: trained (or evaluated, "
                 f"--pretrained) once with seed {seeds[0]} in {out / 'clean'}; each seed's "
                 "badclip trigger, victims, UAPs, defenses and ablations are its own.")
    reports = {}
    for k in seeds:
        cfg_k = dict(cfg, seed=k, output=str(out / f"seed{k}"))
        plan_k = {n: c for n, c in plan_stages(cfg_k).items() if n != "clean"}
        st = _stages(cfg, out / f"seed{k}", plan_k, run_command)
        print(f"pipeline: seed {k} -> {out / f'seed{k}'}", flush=True)
        try:
            reports[k] = _after_clean(st, cfg_k, data, _StageFlags(cfg_k, data), clean,
                                      out / "clean", list(notes), time.perf_counter())
        finally:
            st.close()
    timing = {**st0.timing, **{f"seed{k}/{n}": t for k, r in reports.items()
                               for n, t in r["timing"].items()}}
    wall = time.perf_counter() - t_start
    report = aggregate_seeds(reports, timing=timing, settings={"seed": None},
                             notes=[*notes, f"This invocation took {wall:.0f} s."])
    paths = write_report(report, out)
    print(f"report (mean ± std over seeds {', '.join(map(str, seeds))}): {paths['md']} and "
          f"{paths['json']} | {clock(wall)} in this invocation", flush=True)
    return report


def _after_clean(st: Stages, cfg, data, flags: _StageFlags, clean: str, clean_dir: Path,
                 notes: list, t_start: float) -> dict:
    """Every stage after the clean model (weights `clean`, its eval.json in clean_dir), into
    st's root = cfg["output"], and that directory's report. Each attack's stages form a chain
    (its victim first, then what needs it; the first attack's ablations after its defenses);
    the chains and the clean model's scan are independent (run side by side with --jobs)."""
    from abd_fast.evaluate import read_eval
    out = Path(cfg["output"])
    results = {"clean": read_eval(clean_dir), "attacks": dict.fromkeys(cfg["attacks"])}
    scans = {"clean": None, **dict.fromkeys(cfg["attacks"])}
    victims, uaps, tables = {}, {}, {"table2": None, "table3": None}
    calibration = {}

    def scan_clean():
        scans["clean"] = _scan(st, flags, "scan-clean", clean)

    def chain(a):
        patch = _badclip_trigger(st, cfg, data, flags, clean) if a == "badclip" else None
        victims[a] = _victim(st, cfg, flags, clean, a, patch)
        results["attacks"][a] = {"victim": read_eval(out / f"poison-{a}"),
                                 **dict.fromkeys(cfg["defenses"])}

        def scan_victim():
            scans[a] = _scan_victim(st, flags, clean, a, victims[a])

        def defense(m):
            if m == "abd":
                uaps[a] = _abd_uap(st, cfg, flags, clean, a, victims[a])
            results["attacks"][a][m] = _defend(st, flags, a, m, victims[a], uaps.get(a))
        calibrate = [lambda: calibration.update(_calibrate_scan(st, cfg, data, flags, clean,
                                                                victims[a]))] \
            if a == cfg["attacks"][0] and cfg["scan_threshold"] == CALIBRATE else []
        st.parallel(lambda work: work(), [
            *calibrate, lambda: _floor(st, data, flags, clean, a, victims[a]), scan_victim,
            *(lambda m=m: defense(m) for m in _uap_first(cfg["defenses"]))])
        if a == cfg["attacks"][0]:
            tables.update(_ablations(st, cfg, flags, clean, victims, uaps, results))
    st.parallel(lambda work: work(), [scan_clean, *(lambda a=a: chain(a) for a in cfg["attacks"])])
    analysis = {}
    st.run("report", ["analysis"], outputs=(), force=True,
           fn=lambda d: analysis.update(_analyse(cfg, data, out, victims, uaps)))
    wall = time.perf_counter() - t_start
    report = _report(cfg, data, st, results, tables, analysis.get("similarity"), uaps, notes,
                     wall=wall, demo=flags.demo)
    report["scan"] = scans
    if calibration:
        report["settings"]["scan_calibration"] = calibration
    from abd_fast.report import weak_model_warnings, write_report
    paths = write_report(report, out, embeddings=analysis.get("embeddings"))
    print(f"report: {paths['md']} and {paths['json']}; plots: "
          + ", ".join(str(p) for k, p in paths.items() if k not in ("md", "json") and p)
          + f" | {clock(wall)} in this invocation", flush=True)
    for warning in weak_model_warnings(report):  # report.md opens with them too
        print(f"WARNING: {warning}", flush=True)
    return report


def _uap_first(defenses) -> list:
    """The defenses with abd (whose UAP stages come first) leading: the longest chain starts
    first when stages run side by side."""
    return sorted(defenses, key=lambda m: m != "abd")


def _clean_model(st: Stages, cfg, data, flags: _StageFlags, notes: list) -> str:
    """Stage 1, the clean model: --pretrained evaluated, else trained (or reused from the
    cache of clean models trained with the same settings and data). Returns its weights."""
    out = Path(cfg["output"])
    if cfg["pretrained"]:
        st.run("clean", ["eval", *flags.common, "--checkpoint", cfg["pretrained"]], alone=True)
        return cfg["pretrained"]
    argv = ["pretrain", *flags.common, *flags.q,
            *(_flags(QUICK_OVERRIDES["pretrain"]) if flags.quick else []),
            *flags.extra("pretrain")]
    key = clean_cache_key(argv, data["version"])
    cached = clean_cache_dir() / key

    def from_cache(d):
        for f in CLEAN_FILES:
            shutil.copy2(cached / f, d / f)
        print(f"  reusing the clean model trained before with the same settings and data: "
              f"{cached}", flush=True)
    if not st.done("clean", argv, CLEAN_FILES) and (cached / "eval.json").exists():
        st.plan["clean"] = 0  # a copy: its seconds say nothing about the ETA's rate
        st.run("clean", argv, CLEAN_FILES, fn=from_cache, alone=True)
        notes.append(f"The clean model was reused from the cache ({cached}); it was trained "
                     "by an earlier run with the same pretrain settings and data.")
    else:
        st.run("clean", argv, CLEAN_FILES, alone=True)
        store_clean(out / "clean", key, argv)
    return str(out / "clean" / "checkpoint.pt")


def _badclip_trigger(st: Stages, cfg, data, flags: _StageFlags, clean: str) -> str | None:
    """Stage 2a: BadCLIP's patch, optimized against the clean model (when badclip is run)."""
    if "badclip" not in cfg["attacks"]:
        return None
    steps = QUICK_OVERRIDES["badclip-trigger"] if flags.quick else {"steps": BADCLIP_STEPS}
    d = st.run("badclip-trigger", ["badclip-trigger", *flags.common, "--target-label",
                                   data["target"], "--pretrained", clean, *_flags(steps),
                                   *flags.extra("badclip-trigger")],
               outputs=("badclip_patch.png",))
    return str(d / "badclip_patch.png")


def _victim(st: Stages, cfg, flags: _StageFlags, clean: str, a: str, patch) -> str:
    """Stage 2b: the poisoned model of attack `a`; returns its checkpoint."""
    trig = ["--trigger-file", patch] if a == "badclip" else []
    # A config's own poison count or rate replaces POISON's (the stage takes exactly one).
    own = {**cfg["stage_flags"].get("poison", {}), **cfg["stage_flags"].get(f"poison:{a}", {})}
    poison_flags = [] if {"poison-count", "poison-rate"} & set(own) else _flags(POISON)
    d = st.run(f"poison-{a}", ["poison", *flags.victim, "--pretrained", clean, "--attack", a,
                               *poison_flags, *trig, *flags.extra("poison"),
                               *flags.extra(f"poison:{a}")])
    return str(d / "checkpoint.pt")


def victim_trigger_flags(checkpoint) -> list:
    """The flags that rebuild a victim's trigger (attack, trigger seed and options) from its
    checkpoint's config, for another model's eval."""
    from abd_fast.engine import load_checkpoint

    from .common import trigger_seed_of
    run = load_checkpoint(checkpoint, "--checkpoint")["config"]
    out = ["--attack", run["attack"], "--trigger-seed", trigger_seed_of(run)]
    for key in ("trigger_file", "patch_location", "patch_size"):
        if run.get(key) is not None:
            out += [f"--{key.replace('_', '-')}", run[key]]
    for option in run.get("trigger_option") or []:
        out += ["--trigger-option", option]
    return out


def _floor(st: Stages, data, flags: _StageFlags, clean: str, a: str, victim: str):
    """Stage 2b': the clean model under the victim's own trigger (floor-<attack>/eval.json):
    the ASR a model without the backdoor has."""
    st.run(f"floor-{a}", ["eval", *flags.common, "--checkpoint", clean, "--target-label",
                          data["target"], *victim_trigger_flags(victim)])


def _scan(st: Stages, flags: _StageFlags, name: str, checkpoint: str, *extra) -> dict:
    """Stage 2c, a backdoor scan (docs/SCAN.md), told neither the target nor the trigger:
    its scan.json (report.json's "scan")."""
    quick = _flags(QUICK_OVERRIDES["scan"]) if flags.quick else []
    d = st.run(name, ["scan", *flags.common, "--checkpoint", checkpoint, *extra, *quick,
                      *flags.extra("scan")], outputs=(scan.SCAN_FILE,))
    return json.loads((d / scan.SCAN_FILE).read_text())


def _calibrate_scan(st: Stages, cfg, data, flags: _StageFlags, clean: str, victim: str) -> dict:
    """--scan-threshold calibrate (docs/SCAN.md, "Calibration"): clean fine-tunes of the clean
    model with the victim's poisoning recipe and no poisons (calibration_seeds over --seed),
    each scanned against the clean model on the validation split; the victims' scans and
    uap-select get their largest score + CALIBRATION_MARGIN. Returns what the report records."""
    from abd_fast.engine import load_checkpoint
    from abd_fast.scan.model import CALIBRATION_MARGIN, calibrated_threshold
    poisoning = load_checkpoint(victim, "--checkpoint")["config"]
    recipe = {k.replace("_", "-"): poisoning[k] for k in CALIBRATION_RECIPE
              if poisoning.get(k) is not None}

    def finetune_and_scan(k):
        common = list(flags.common)
        common[common.index("--seed") + 1] = cfg["seed"] + k
        d = st.run(f"calib-ft{k}", ["pretrain", *common, "--pretrained", clean, *_flags(recipe)])
        return _scan(st, flags, f"calib-scan{k}", str(d / "checkpoint.pt"), "--reference-model",
                     clean, "--eval-data", data["val"])["score"]
    seeds = calibration_seeds(cfg)
    scores = dict(zip((f"calib-ft{k}" for k in seeds), st.parallel(finetune_and_scan, seeds)))
    threshold = round(calibrated_threshold(scores.values()), 4)
    flags.threshold.set(threshold)
    print(f"  scan threshold calibrated: {threshold} (clean fine-tunes' reference scores on "
          f"the validation split {', '.join(f'{v:.2f}' for v in scores.values())} + "
          f"{CALIBRATION_MARGIN:g})", flush=True)
    return {"threshold": threshold, "margin": CALIBRATION_MARGIN, "scores": scores,
            "recipe": recipe, "split": data["val"]}


def _scan_victim(st: Stages, flags: _StageFlags, clean: str, a: str, victim: str) -> dict:
    """The victim scanned with the clean model as reference, and its training pairs as it
    was poisoned, measured against its poisoned ids: {"model", "data"}."""
    model = _scan(st, flags, f"scan-{a}", victim, "--reference-model", clean,
                  *flags.threshold.flags("scan", st))
    d = st.run(f"scan-data-{a}", ["scan-data", *flags.common, "--checkpoint", victim,
                                  "--reference-model", clean, "--poisoned-by", victim,
                                  *flags.extra("scan-data")],
               outputs=(scan_data.SUMMARY_FILE,))
    measured = json.loads((d / scan_data.SUMMARY_FILE).read_text())
    return {"model": model, "data": {k: measured[k] for k in (
        "auroc", "precision_at_poison_count", "poison_count", "score")}}


def _abd_uap(st: Stages, cfg, flags: _StageFlags, clean: str, a: str, victim: str) -> str:
    """Stage 3a: ABD's UAP for the victim: the one candidate, or uap-select's choice among
    the candidates (trained side by side with --jobs). Returns its uap.pt."""
    candidates = _uap_candidates(cfg)

    search = _flags(QUICK_OVERRIDES["target-search"]) if flags.quick else []

    def uap(name, extra):
        val_scan = [scan.VAL_SCAN_FILE] if uap_select.steered(extra) else []
        return st.run(name, ["uap", *flags.victim, "--checkpoint", victim, "--reference-model",
                             clean, *flags.of("uap"), *extra, *(search if val_scan else [])],
                      outputs=("uap.pt", "eval.json", *val_scan))
    if len(candidates) == 1:
        return str(uap(f"uap-{a}", *candidates.values()) / "uap.pt")
    dirs = st.parallel(lambda item: str(uap(f"uap-{a}-{item[0]}", item[1])), candidates.items())
    scanned = [Path(d) / scan.VAL_SCAN_FILE for d, extra in zip(dirs, candidates.values())
               if uap_select.steered(extra) and UAP_CRITERION == "scan"]
    d = st.run(f"uap-{a}", ["uap-select", *flags.common, *flags.val, "--checkpoint", victim,
                            "--reference-model", clean, "--candidates", ",".join(dirs),
                            "--criterion", UAP_CRITERION,
                            *(search if UAP_CRITERION == "scan" else []),
                            *(["--val-scan", scanned[0]] if scanned else []),
                            *(flags.threshold.flags("uap-select", st)
                              if UAP_CRITERION == "scan" else [])],
               outputs=("uap.pt", "selection.json", "eval.json"))
    return str(d / "uap.pt")


def _defend(st: Stages, flags: _StageFlags, a: str, m: str, victim: str, uap) -> dict:
    """Stage 3b: defense m on the victim (abd with its UAP); its evaluation results."""
    from abd_fast.evaluate import read_eval
    uap_flag = ["--uap", uap] if m == "abd" else []
    return read_eval(st.run(f"{a}-{m}", ["defend", *flags.victim, "--checkpoint", victim,
                                         "--method", m, *uap_flag,
                                         *flags.of("defend", f"defend:{m}")]))


def _ablations(st: Stages, cfg, flags: _StageFlags, clean: str, victims, uaps, results) -> dict:
    """Stage 4: ABD's Table II and III on the first attack, reusing the runs above."""
    from abd_fast.defenses.ablation import run_tables
    if not cfg["ablations"]:
        return {"table2": None, "table3": None}
    a = cfg["attacks"][0]
    known = {m: results["attacks"][a][{"ft": "ft", "i_adv_t_eda": "abd"}[m]]
             for m in ("ft", "i_adv_t_eda") if m in _known_rows(cfg, a)}
    if "abd" in cfg["defenses"]:
        known["uap_bd"] = results["attacks"][a]["abd"]
    return run_tables(st, attack=a, checkpoint=victims[a], reference_model=clean,
                      common=flags.victim, uap_bd=uaps.get(a), known=known,
                      uap_flags=[*flags.of("uap"), *_chosen_geometry(cfg, a)],
                      defend_flags=flags.of("defend", "defend:abd"), prefix=f"ablation-{a}-")


def _selection(out: Path, attack) -> dict | None:
    """uap-select's record for `attack` (None without a choice), "chosen" as the candidate's
    name (the `uap-<attack>-` stage prefix removed)."""
    sel = out / f"uap-{attack}" / uap_select.SELECTION_FILE
    if not sel.exists():
        return None
    s = json.loads(sel.read_text())
    return dict(s, chosen=s["chosen"].removeprefix(f"uap-{attack}-"))


def _uap_floor(out: Path, attack) -> dict:
    """The UAP-alone floor: the chosen UAP's own eval.json, with the candidate uap-select
    chose ("chosen", its val score and top class) when there was a choice."""
    from abd_fast.evaluate import read_eval
    r = read_eval(out / f"uap-{attack}")
    s = _selection(out, attack)
    if s is not None:
        r["chosen"] = {"name": s["chosen"], "score": s["score"], "top_class": s["top_class"]}
    return r


def _chosen_geometry(cfg, attack) -> list:
    """The `uap` geometry flags of ABD's UAP for `attack` (the candidate uap-select chose):
    Table III's UAP without L_bd has the same geometry (not its loss or steering)."""
    if "abd" not in cfg["defenses"]:
        return []
    candidates = _uap_candidates(cfg)
    flags = (next(iter(candidates.values())) if len(candidates) == 1
             else candidates[_selection(Path(cfg["output"]), attack)["chosen"]])
    return flags[:flags.index("--bd-loss")]


def _speed_settings(cfg) -> dict:
    """The precision the training stages ran in (resolved here: auto depends on the machine)
    and whether each training loop was compiled (--compile/--no-compile, else its default).
    A config's stage-flags may override either for one command."""
    import torch

    from abd_fast.engine import LOOPS, default_compile
    from abd_fast.precision import resolve_precision
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"precision": resolve_precision(cfg["precision"], device),
            "compile": {k: default_compile(k) if cfg["compile"] is None else cfg["compile"]
                        for k in LOOPS}}


def _analyse(cfg, data, out: Path, victims, uaps) -> dict:
    """Stage 5: similarity analysis (ABD Fig. 2) on the first attack's victim with its UAP,
    and the clean/triggered image embeddings of the victim, FT and ABD for embedding.png."""
    import torch

    from abd_fast.attacks import make_trigger
    from abd_fast.data import build_loader
    from abd_fast.defenses.uap import UAP
    from abd_fast.engine import load_checkpoint
    from abd_fast.evaluate import clean_and_triggered_features, similarity_analysis
    from abd_fast.models import create_model, get_tokenizer, image_spec

    from .common import trigger_options, trigger_seed_of
    a = cfg["attacks"][0]
    run_cfg = load_checkpoint(victims[a], "--checkpoint")["config"]
    models = {"victim": victims[a]}
    for m in ("ft", "abd"):
        if m in cfg["defenses"]:
            models[m] = str(out / f"{a}-{m}" / "checkpoint.pt")

    def load(path):
        return create_model(cfg["model"], pretrained=path, image_size=cfg["image_size"]).eval()
    victim = load(victims[a])
    spec = image_spec(victim)
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    trigger = make_trigger(a, image_size=spec.size, seed=trigger_seed_of(run_cfg),
                           **trigger_options(run_cfg))
    tok = get_tokenizer(cfg["model"])
    n_batches = QUICK_OVERRIDES["similarity_batches"] if cfg["quick"] else SIMILARITY_BATCHES
    captions = build_loader(data["train"], train=False, batch_size=250, image_size=spec.size,
                            loader=cfg["loader"], num_workers=cfg["workers"],
                            **loader_options(cfg))
    sim = similarity_analysis(victim, captions, target=data["target"], trigger=trigger,
                              uap=UAP.load(uaps[a]) if a in uaps else None, mean=mean, std=std,
                              tokenizer=tok, max_batches=n_batches)
    sim["attack"] = a
    if sim["adversarial_own_caption"] is None:  # no UAP (abd not run): no Fig. 2
        sim = None
    evaluation = build_loader(data["eval"], train=False, batch_size=250, image_size=spec.size,
                              loader=cfg["loader"], num_workers=cfg["workers"],
                              classnames=data["classnames"])
    embeddings = {}
    labels = {"victim": f"victim ({a})", "ft": f"FT ({a})", "abd": f"ABD ({a})"}
    for name, path in models.items():
        model = victim if name == "victim" else load(path)
        # every eval image (the listing is sorted by class), evenly spaced ones drawn
        clean, trig = clean_and_triggered_features(model, evaluation, trigger, mean=mean, std=std)
        keep = torch.linspace(0, len(clean) - 1, min(EMBEDDING_IMAGES, len(clean))).long()
        embeddings[labels[name]] = (clean[keep], trig[keep])
    return {"similarity": sim, "embeddings": embeddings}


def _report(cfg, data, st: Stages, results, tables, similarity, uaps, notes, *, wall: float,
            demo: dict) -> dict:
    """report.json's content: the results, the stages' timing, the settings and the notes
    that say how to read them."""
    from abd_fast.evaluate import read_eval
    out, target, quick = Path(cfg["output"]), data["target"], cfg["quick"]
    if st.skipped:
        notes.append(f"{len(st.skipped)} stage(s) completed by an earlier run with the same "
                     f"settings were reused: {', '.join(st.skipped)}; timing shows their "
                     "original seconds.")
    first = cfg["attacks"][0]
    uap_eval = read_eval(out / f"uap-{first}") if first in uaps else {}
    if uap_eval.get("reference_model", "").startswith("none"):
        notes.append("No reference model: the poisoned encoder on the clean image stood in for "
                     "the backdoor loss.")
    notes += [
        "ASR: share of non-target-class evaluation images classified as the target "
        f"({target!r}) once triggered; target-class images excluded.",
        f"Victims: {POISON} poisoned pairs, poison-stage defaults otherwise; defenses: "
        f"uap/defend stage defaults with the pipeline's flags {PIPELINE_FLAGS}"
        + (f" and the embedded data's {DEMO_OVERRIDES}." if demo else "."),
    ]
    if data["val"] is None:
        notes.append("No validation data (--val-data): the uap/defend stages could make no "
                     "recipe choice on held-out data; give --val-data for them.")
    if cfg["train_data"] is not None and cfg["scan_threshold"] is None:
        from abd_fast.scan.model import THRESHOLDS
        notes.append(f"The scans' reference-mode threshold ({THRESHOLDS['reference']}) was "
                     "calibrated on the embedded data's tiny models; on your data, "
                     "--scan-threshold calibrate calibrates it on clean fine-tunes of your "
                     "clean model (docs/SCAN.md).")
    if cfg["stage_flags"]:
        notes.append(f"Per-stage flags of the config (last, so they override the above): "
                     f"{cfg['stage_flags']}.")
    if quick:
        notes.append("--quick: a smoke run on a small synthetic set with 1-2 epochs per stage; "
                     "its numbers are not meaningful.")
    if cfg["jobs"] > 1:
        notes.append(f"--jobs {cfg['jobs']}: up to {cfg['jobs']} stages ran at once, each in "
                     f"its own process with {stage_threads(cfg['jobs'])} torch thread(s) (the "
                     "clean model alone, with all); each stage's seconds are its own, so their "
                     "total exceeds the wall time.")
    if st.skipped or cfg["jobs"] > 1:
        notes.append(f"This invocation took {wall:.0f} s.")
    floors = {a: {"clean": read_eval(out / f"floor-{a}"),
                  **({"uap": _uap_floor(out, a)} if a in uaps else {})}
              for a in cfg["attacks"]}
    return {
        "clean": results["clean"], "attacks": results["attacks"], "floors": floors,
        "ablations": tables, "similarity": similarity,
        "timing": dict(st.timing),  # report.md adds their sum as the total
        "settings": {"recipe": cfg["recipe"], "model": cfg["model"],
                     "image_size": results["clean"].get("image_size"),
                     "train_data": data["train"], "eval_data": data["eval"],
                     "val_data": data["val"],
                     "target_label": target, "attacks": cfg["attacks"],
                     "defenses": cfg["defenses"], "seed": cfg["seed"], "quick": quick,
                     "pretrained": cfg["pretrained"], "poison": POISON,
                     "demo_overrides": demo, "pipeline_flags": PIPELINE_FLAGS,
                     "stage_flags": cfg["stage_flags"], "scan_threshold": cfg["scan_threshold"],
                     **_speed_settings(cfg),
                     "jobs": cfg["jobs"],
                     "stage_threads": stage_threads(cfg["jobs"]) if cfg["jobs"] > 1 else None,
                     **({"quick_overrides": QUICK_OVERRIDES} if quick else {})},
        "notes": notes,
    }
