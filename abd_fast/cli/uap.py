"""`uap`: train ABD's universal adversarial perturbation against a poisoned model (AdvCLIP's
GAN + the backdoor loss; abd_fast.defenses.stages.uap_stage); writes uap.pt and eval.json
(with --steer scan also val_scan.json, the scan's result, which `uap-select --val-scan` reads)."""
from __future__ import annotations

import math
from pathlib import Path

from abd_fast.defenses.uap import MODES, PLACES

from .common import (Run, UsageError, attack_flags, check_defense_inputs, check_number,
                     check_path, print_training, require_val_data, stage_parser,
                     training_defaults)
from .scan import check_scan_steps, scan_steps_flag

NAME = "uap"
# The attack flags of uap/defend only drive the evaluation (ASR); by default they come from
# the poisoned checkpoint's run. The defaults are the demo's, measured on the badnet victim
# (CA 86.7, ASR 99.1; one seed each, docs/METHOD.md): one UAP epoch over the 10,000 pairs
# (31 s) already sends 100% of non-target images to the target.
# --bd-loss: the backdoor loss's sign and weight when not given (BD_DEFAULTS); the
# differential loss's were probed on the demo's 10%-poison victims (issue 17: L-inf on the
# blended victim 52.9% of non-target images to the target, the paper's loss 35.4%).
BD_DEFAULTS = {"paper": {"backdoor_loss_sign": 1.0, "lambda_bd": 1.0},
               "differential": {"backdoor_loss_sign": -1.0, "lambda_bd": 10.0}}
DEFAULTS = training_defaults(NAME, output="runs/uap", checkpoint=None, reference_model=None,
                             mode="patch", patch_place="corner", patch_area=0.03, eps=0.03,
                             no_backdoor_loss=False, bd_loss="paper", backdoor_loss_sign=None,
                             backdoor_loss_pairing="reference-query", lambda_bd=None,
                             steer="none", lambda_steer=1.0, scan_steps=None,
                             brightness=1.2,
                             attack=None, trigger_file=None, trigger_option=None, epochs=1,
                             batch_size=64, lr=2e-4, warmup=0)


def _flags(p):
    p.add_argument("--checkpoint", metavar="FILE", help="the poisoned model's weights")
    p.add_argument("--reference-model", metavar="FILE",
                   help="the clean model's weights, for the backdoor loss (default: the "
                        "poisoned model on the clean image stands in)")
    p.add_argument("--mode", choices=list(MODES),
                   help="UAP form: a patch, an L-inf perturbation at --eps, or both")
    p.add_argument("--patch-place", choices=list(PLACES),
                   help="where the patch goes (patch modes): AdvCLIP's bottom-right corner, or "
                        "a random place per image (new each training step)")
    p.add_argument("--patch-area", type=float, metavar="F", help="patch area / image area")
    p.add_argument("--eps", type=float, metavar="E", help="L-inf budget (mode linf)")
    p.add_argument("--no-backdoor-loss", action="store_true",
                   help="plain AdvCLIP UAP, without ABD's backdoor loss (Table III)")
    p.add_argument("--bd-loss", choices=list(BD_DEFAULTS),
                   help="paper: ABD Eq. 2, the reference encoder on the brightened clean image "
                        "vs the poisoned encoder on the adversarial image; differential: both "
                        "encoders on the same adversarial image (needs --reference-model; "
                        "default sign -1, lambda 10: push the poisoned encoder's view away "
                        "from the reference's, docs/METHOD.md)")
    p.add_argument("--backdoor-loss-sign", type=float, choices=[1.0, -1.0],
                   help="+1: pull the pairs together (the paper's text), -1: push apart "
                        "(default: +1 for --bd-loss paper, -1 for differential)")
    p.add_argument("--backdoor-loss-pairing", choices=["reference-query", "adversarial-query"],
                   help="which features are the InfoNCE queries (docs/METHOD.md)")
    p.add_argument("--lambda-bd", type=float, metavar="W",
                   help="weight of the backdoor loss (default: 1 for --bd-loss paper, 10 for "
                        "differential)")
    p.add_argument("--brightness", type=float, metavar="F",
                   help="brightness factor of the reference view (ABD Fig. 1)")
    p.add_argument("--steer", choices=["none", "scan"],
                   help="OUR EXTENSION, not the paper's: scan = infer the suspected target "
                        "without knowing it (the `scan` command's per-class search on the "
                        "validation images, against --reference-model when given) and add a "
                        "term steering the UAP toward it (docs/METHOD.md)")
    p.add_argument("--lambda-steer", type=float, metavar="W",
                   help="weight of the steering term (--steer scan)")
    scan_steps_flag(p, "--steer scan")
    attack_flags(p, required=False)


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS, _flags, reads_checkpoint=True,
                        help="train ABD's universal adversarial perturbation against a "
                             "poisoned model (AdvCLIP's GAN + the backdoor loss)")


def check(cfg: dict):
    check_defense_inputs(cfg)
    for key, value in BD_DEFAULTS[cfg["bd_loss"]].items():
        if cfg.get(key) is None:
            cfg[key] = value
    if (cfg["bd_loss"] == "differential" and not cfg["no_backdoor_loss"]
            and not cfg.get("reference_model")):
        raise UsageError("--bd-loss differential compares the poisoned and the clean encoders "
                         "on the same adversarial image: give --reference-model (the clean "
                         "model's weights)")
    check_number(cfg, "patch_area", 0, 1)
    check_number(cfg, "eps", 0, 1)
    check_number(cfg, "lambda_bd", 0, math.inf, open_low=False)
    check_number(cfg, "lambda_steer", 0, math.inf, open_low=False)
    check_path(cfg, "val_data", "data")
    if cfg["steer"] == "scan":
        require_val_data(cfg, "--steer scan's target search")
    check_scan_steps(cfg, cfg["steer"] == "scan", "--steer scan")
    check_number(cfg, "brightness", 0, 10)
    if cfg["mode"] == "patch" and cfg["patch_area"] >= 1:
        raise UsageError("--patch-area must be below 1 (0.03: 3% of the image)")


def run(cfg: dict) -> int:
    from abd_fast.defenses.stages import uap_stage
    from abd_fast.models import WeightsError, create_model
    run = Run(cfg, weights_flag="--checkpoint")
    reference = None
    if cfg.get("reference_model"):
        try:
            reference = create_model(cfg["model"], pretrained=cfg["reference_model"],
                                     image_size=cfg.get("image_size"))
        except WeightsError as e:
            raise UsageError(str(e).replace("--pretrained", "--reference-model", 1)) from e
    steer = scan_target(cfg, run, reference) if cfg["steer"] == "scan" else None
    summary = uap_stage(run, reference, steer)
    print_training(run, summary)
    return 0


def scan_target(cfg: dict, run: Run, reference) -> tuple:
    """--steer scan: the scan's per-class search on the validation images (cli.scan.scan_val),
    against the reference when given; never reads the target or trigger. Returns (the
    poisoned model's zero-shot classifier of the val classes, the index of the most anomalous
    class, notes for eval.json)."""
    from abd_fast.evaluate import zero_shot_classifier

    from .scan import VAL_SCAN_FILE, save_val_scan, scan_val
    device = run.info.device
    result, source, classnames = scan_val(
        run, None if reference is None else reference.to(device), "--steer scan's target search")
    if run.info.is_main:  # for `uap-select --val-scan`, which makes the same search
        Path(cfg["output"]).mkdir(parents=True, exist_ok=True)
        save_val_scan(Path(cfg["output"]) / VAL_SCAN_FILE, run, result, source, classnames)
    cls = result["most_anomalous_class"]
    notes = {k: result[k] for k in ("backdoored", "score", "threshold", "mode", "geometry")}
    notes.update(toward=cls, val_data=str(source), lambda_steer=cfg["lambda_steer"])
    print(f"steer: toward {cls!r} (scan score {result['score']:.2f}, threshold "
          f"{result['threshold']:.2f}, {result['mode']} mode)", flush=True)
    classifier = zero_shot_classifier(run.model, run.tokenizer, classnames, device=device)
    return classifier, classnames.index(cls), notes
