"""`defend`: fine-tune a poisoned model with FT, CleanCLIP, RoCLIP or ABD
(abd_fast.defenses.stages.defend_stage); eval.json with CA and the attack's ASR after it."""
from __future__ import annotations

import math

from .common import (Run, UsageError, attack_flags, check_defense_inputs, check_int,
                     check_number, open_caption_data, print_training, stage_parser,
                     training_defaults)

NAME = "defend"
# The demo's recipe, measured on the badnet victim (docs/METHOD.md): ABD with one epoch of
# batch 64, lr 3e-4, warmup 5 on --max-samples 4096 (24 s) gives CA 82.8 / ASR 9.3 (lr 2e-4
# at batch 128: ASR 16.2; lr 5e-4: CA 81.3). The attack flags only drive the evaluation.
# --budget fixed (default) trains with these flags; --budget paper sets the batch, lr, pairs
# and (unless given) the epochs from the victim's poisoning (abd_fast.defenses.budget).
FIXED_EPOCHS = 1
DEFAULTS = training_defaults(NAME, output="runs/defend", checkpoint=None, method="abd", uap=None,
                             budget="fixed", budget_ratio=3.0, budget_steps=None,
                             abd_objective="align", adv_view="raw", no_adv=False, no_eda=False,
                             break_epoch=2, bank_size=4096, lambda1=1.0, lambda2=1.0, attack=None,
                             trigger_file=None, trigger_option=None, epochs=None, batch_size=64,
                             lr=3e-4, warmup=5)


def _flags(p):
    p.add_argument("--checkpoint", metavar="FILE", help="the poisoned model's weights")
    p.add_argument("--method", choices=["ft", "cleanclip", "roclip", "abd"], help="defense")
    p.add_argument("--uap", metavar="FILE", help="abd: uap.pt written by the uap stage")
    p.add_argument("--abd-objective", choices=["align", "replace", "union"],
                   help="abd: in-modal alignment with the views (align), MMCL on the views "
                        "(replace), or MMCL on the clean pairs plus MMCL on the views (union: "
                        "the paper's enhanced dataset)")
    p.add_argument("--no-adv", action="store_true", help="abd ablation: no adversarial view")
    p.add_argument("--no-eda", action="store_true", help="abd ablation: no EDA text view")
    p.add_argument("--break-epoch", type=int, metavar="N",
                   help="roclip: nearest-neighbour positives every N-th epoch")
    p.add_argument("--bank-size", type=int, metavar="N", help="roclip: text memory bank size")
    p.add_argument("--lambda1", type=float, metavar="W", help="weight of the MMCL term")
    p.add_argument("--lambda2", type=float, metavar="W", help="weight of the in-modal terms")
    budget_and_view_flags(p)
    attack_flags(p, required=False)


def budget_and_view_flags(p):
    """--adv-view and the budget flags (also `ablation`'s, for its defend rows)."""
    p.add_argument("--adv-view", choices=["raw", "autoaugment"],
                   help="abd: the UAP on the raw image, or on CleanCLIP's AutoAugment view")
    p.add_argument("--budget", choices=["fixed", "paper"],
                   help="fixed: --max-samples/--epochs/--batch-size/--lr as given (--epochs "
                        f"default {FIXED_EPOCHS}); paper: the ABD paper's shape from the "
                        "victim's recorded poisoning: batch 64, its steps, steps x lr = "
                        "--budget-ratio x its steps x lr, pairs = steps x 64 / --epochs "
                        "(default: its epochs, at least 2); overrides --batch-size, --lr, "
                        "--max-samples")
    p.add_argument("--budget-ratio", type=float, metavar="R",
                   help="--budget paper: the defense's steps x lr over the poisoning's")
    p.add_argument("--budget-steps", type=int, metavar="N",
                   help="--budget paper: N optimizer steps instead of the poisoning's (the lr "
                        "is scaled to keep steps x lr)")


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
    check_number(cfg, "budget_ratio", 0, math.inf)
    check_int(cfg, "budget_steps")
    if cfg["budget"] == "fixed":
        if cfg.get("budget_steps") is not None:
            raise UsageError("--budget-steps applies to --budget paper; with --budget fixed "
                             "give --epochs and --max-samples")
        if cfg.get("epochs") is None:
            cfg["epochs"] = FIXED_EPOCHS
        return
    if cfg["budget"] != "paper":
        raise UsageError(f"--budget must be fixed or paper, got {cfg['budget']!r}")
    from abd_fast.defenses.budget import poisoning_record
    weights = cfg.get("checkpoint") or cfg.get("pretrained")
    if poisoning_record(weights) is None:
        raise UsageError(f"--budget paper reads the poisoning's steps and lr from the victim's "
                         f"checkpoint, and {weights} has no such record (it is not a `poison` "
                         "run's checkpoint.pt); use --budget fixed with --epochs, --lr and "
                         "--max-samples")


def apply_budget(cfg: dict, run) -> dict:
    """Sets the paper budget's batch, lr, epochs and pairs in cfg (--budget paper) and returns
    the budget's record for eval.json (abd_fast.defenses.budget.budget_record)."""
    from abd_fast.defenses.budget import budget_record, paper_budget, poisoning_record
    poisoning = poisoning_record(cfg.get("checkpoint") or cfg.get("pretrained"))
    world = run.info.world_size
    available = len(open_caption_data(cfg, cfg.get("train_data") or run.synthetic.shards))
    if cfg["budget"] == "paper":
        b = paper_budget(poisoning, epochs=cfg.get("epochs"), ratio=cfg["budget_ratio"],
                         steps=cfg.get("budget_steps"), world_size=world)
        if b["pairs"] > available:
            raise UsageError(f"--budget paper: {b['steps']} steps of batch {b['batch_size']} in "
                             f"{b['epochs']} epochs need {b['pairs']} clean pairs, the training "
                             f"data has {available}; raise --epochs (or lower --budget-steps)")
        cfg.update(batch_size=b["batch_size"], lr=b["lr"], epochs=b["epochs"],
                   max_samples=b["pairs"])
    pairs = min(available, cfg.get("max_samples") or available)
    steps = cfg["epochs"] * (pairs // world // cfg["batch_size"])
    return budget_record(cfg["budget"], pairs=pairs, steps=steps, lr=cfg["lr"],
                         batch_size=cfg["batch_size"] * world, epochs=cfg["epochs"],
                         poisoning=poisoning)


def run(cfg: dict) -> int:
    from abd_fast.defenses.stages import defend_stage
    run = Run(cfg, weights_flag="--checkpoint")
    budget = apply_budget(cfg, run)
    try:
        summary = defend_stage(run, budget=budget)
    except (ValueError, FileNotFoundError) as e:
        if "--uap" in str(e):
            raise UsageError(str(e)) from e
        raise
    print_training(run, summary)
    return 0
