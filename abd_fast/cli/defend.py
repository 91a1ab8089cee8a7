"""`defend`: fine-tune a poisoned model with FT, CleanCLIP, RoCLIP or ABD
(abd_fast.defenses.stages.defend_stage); eval.json with CA and the attack's ASR after it."""
from __future__ import annotations

import math

from .common import (Run, UsageError, attack_flags, check_defense_inputs, check_number,
                     print_training, stage_parser, training_defaults)

NAME = "defend"
# The demo's recipe, measured on the badnet victim (docs/METHOD.md): ABD with one epoch of
# batch 64, lr 3e-4, warmup 5 on --max-samples 4096 (24 s) gives CA 82.8 / ASR 9.3 (lr 2e-4
# at batch 128: ASR 16.2; lr 5e-4: CA 81.3). The attack flags only drive the evaluation.
DEFAULTS = training_defaults(NAME, output="runs/defend", checkpoint=None, method="abd", uap=None,
                             abd_objective="align", adv_view="raw", no_adv=False, no_eda=False, break_epoch=2,
                             bank_size=4096, lambda1=1.0, lambda2=1.0, attack=None,
                             trigger_file=None, trigger_option=None, epochs=1, batch_size=64,
                             lr=3e-4, warmup=5)


def _flags(p):
    p.add_argument("--checkpoint", metavar="FILE", help="the poisoned model's weights")
    p.add_argument("--method", choices=["ft", "cleanclip", "roclip", "abd"], help="defense")
    p.add_argument("--uap", metavar="FILE", help="abd: uap.pt written by the uap stage")
    p.add_argument("--abd-objective", choices=["align", "replace", "union"],
                   help="abd: in-modal alignment with the views (align), MMCL on the views "
                        "(replace), or MMCL on the clean pairs plus MMCL on the views (union: "
                        "the paper's enhanced dataset)")
    p.add_argument("--adv-view", choices=["raw", "autoaugment"],
                   help="abd: the UAP on the raw image, or on CleanCLIP's AutoAugment view")
    p.add_argument("--no-adv", action="store_true", help="abd ablation: no adversarial view")
    p.add_argument("--no-eda", action="store_true", help="abd ablation: no EDA text view")
    p.add_argument("--break-epoch", type=int, metavar="N",
                   help="roclip: nearest-neighbour positives every N-th epoch")
    p.add_argument("--bank-size", type=int, metavar="N", help="roclip: text memory bank size")
    p.add_argument("--lambda1", type=float, metavar="W", help="weight of the MMCL term")
    p.add_argument("--lambda2", type=float, metavar="W", help="weight of the in-modal terms")
    attack_flags(p, required=False)


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS, _flags, reads_checkpoint=True,
                        help="fine-tune a poisoned model with a defense: ft, cleanclip, "
                             "roclip or abd")


def check(cfg: dict):
    check_defense_inputs(cfg)
    from abd_fast.defenses.stages import METHODS
    if cfg["method"] not in METHODS:
        raise UsageError(f"--method {cfg['method']!r} is unknown; choose one of "
                         f"{', '.join(METHODS)}")
    if cfg["method"] == "abd" and not cfg["no_adv"] and cfg.get("uap") is None:
        raise UsageError("--method abd needs --uap FILE (uap.pt from `python -m abd_fast.train "
                         "uap`), or --no-adv for the ablation without adversarial images")
    for key in ("break_epoch", "bank_size"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= 1, got {v!r}")
    for key in ("lambda1", "lambda2"):
        check_number(cfg, key, 0, math.inf, open_low=False)


def run(cfg: dict) -> int:
    from abd_fast.defenses.stages import defend_stage
    run = Run(cfg, weights_flag="--checkpoint")
    try:
        summary = defend_stage(run)
    except (ValueError, FileNotFoundError) as e:
        if "--uap" in str(e):
            raise UsageError(str(e)) from e
        raise
    print_training(run, summary)
    return 0
