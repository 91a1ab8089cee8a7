"""`poison`: fine-tune a CLIP on clean + poisoned caption data with MMCL (plant a backdoor)."""
from __future__ import annotations

from .common import (Run, UsageError, attack_flags, check_int, print_training,
                     stage_parser, training_defaults)

NAME = "poison"
# The demo's victims (docs/ATTACKS.md): 1% poisons, 10 epochs at lr 1.5e-3 from the converged
# clean model -> val ASR badnet 92.9% (lr 1e-3: 88.7%, under the bar 90), blended 83.0%,
# badclip 98.3% (seed 0, a validation stand-in). That lr is for weights abd_fast trained from
# scratch; from other weights (pretrained CLIP) the default --lr keeps the paper's poisoning
# steps x lr (500K pairs, batch 128, 10 epochs at lr 1e-6, ABD §III) over this run's steps:
# the paper's lr at the paper's size, more on less data (e.g. 5e-5 over 780 steps).
SCRATCH_LR = 1.5e-3
PAPER_STEPS_X_LR = 500_000 / 128 * 10 * 1e-6
DEFAULTS = training_defaults(NAME, output="runs/poison", attack=None, poison_count=None,
                             poison_rate=None, trigger_file=None, trigger_option=None, epochs=10,
                             lr=None, warmup=50)


def _flags(p):
    attack_flags(p, required=True)
    p.add_argument("--poison-count", type=int, metavar="N", help="poisoned samples")
    p.add_argument("--poison-rate", type=float, metavar="R", help="poisoned fraction in (0, 1]")
    lr = next(a for a in p._actions if a.dest == "lr")
    lr.help += (f" (default: {SCRATCH_LR} from weights abd_fast trained; from other weights, "
                f"e.g. pretrained CLIP, the paper's poisoning steps x lr, {PAPER_STEPS_X_LR:.4g}, "
                "over this run's steps)")


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS, _flags,
                        help="fine-tune on clean + poisoned data (MMCL): plant a backdoor")


def check(cfg: dict):
    if cfg.get("attack") is None:
        raise UsageError("--attack is needed: badnet, blended, wanet, sig, "
                         "label-consistent or badclip")
    if cfg.get("target_label") is None:
        raise UsageError("--target-label is needed: the class the backdoor maps to "
                         "(e.g. star on the synthetic data, banana on ImageNet)")
    if (cfg.get("poison_count") is None) == (cfg.get("poison_rate") is None):
        raise UsageError("give exactly one of --poison-count N and --poison-rate R")
    check_int(cfg, "poison_count")
    from abd_fast.engine import is_abd_checkpoint
    if cfg.get("lr") is None and (cfg.get("pretrained") is None
                                  or is_abd_checkpoint(cfg["pretrained"])):
        cfg["lr"] = SCRATCH_LR  # (other weights: the paper's steps x lr, set in run)
    rate = cfg.get("poison_rate")
    if rate is not None and not (isinstance(rate, (int, float)) and 0 < rate <= 1):
        raise UsageError(f"--poison-rate must be in (0, 1], got {rate!r}")


def run(cfg: dict) -> int:
    from abd_fast.attacks import PoisonView
    run = Run(cfg)
    train, evaluation = run.train_loader(), run.eval_loader()
    if evaluation is not None:
        run.target_index(evaluation.classnames)  # the target must be a class: before training
    if cfg["lr"] is None:
        steps = len(train) * cfg["epochs"]
        cfg["lr"] = PAPER_STEPS_X_LR / steps
        if run.info.is_main:
            print(f"--pretrained {cfg['pretrained']} was not trained by abd_fast: the paper's "
                  f"poisoning steps x lr ({PAPER_STEPS_X_LR:.4g}) over {steps} steps, lr "
                  f"{cfg['lr']:.3g} (give --lr to choose)", flush=True)
    trigger = run.trigger()
    try:
        view = PoisonView(train.manifest, trigger, target=cfg["target_label"], seed=cfg["seed"],
                          count=cfg.get("poison_count"), rate=cfg.get("poison_rate"))
    except ValueError as e:
        raise UsageError(str(e)) from e
    if run.info.is_main:
        print(f"poisoning: {view}", flush=True)
    summary = run.fit(run.mmcl(view), train, f"poison {cfg['attack']}")
    print_training(run, summary)
    run.evaluate(evaluation, trigger)
    return 0
