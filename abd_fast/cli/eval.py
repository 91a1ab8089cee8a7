"""`eval`: zero-shot CA top-1/top-5, ASR and the clean/triggered embedding distance of a
checkpoint; writes eval.json (by default next to the checkpoint). The model, image size and
the attack's trigger default to the checkpoint's run."""
from __future__ import annotations

from pathlib import Path

from .common import COMMON_DEFAULTS, Run, UsageError, attack_flags, stage_parser

NAME = "eval"
DEFAULTS = dict(COMMON_DEFAULTS, checkpoint=None, attack=None, trigger_file=None,
                trigger_option=None, batch_size=250, output=None)


def _flags(p):
    p.add_argument("--checkpoint", metavar="FILE", help="the weights to evaluate")
    attack_flags(p, required=False)


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS, _flags, reads_checkpoint=True,
                        help="zero-shot CA/ASR of a checkpoint, writes eval.json")


def check(cfg: dict):
    if cfg.get("checkpoint") is None and cfg.get("pretrained") is None:
        raise UsageError("--checkpoint is needed: the weights to evaluate")
    if cfg.get("output") is None:
        ckpt = cfg.get("checkpoint") or cfg["pretrained"]
        cfg["output"] = str(Path(ckpt).parent)


def run(cfg: dict) -> int:
    run = Run(cfg, weights_flag="--checkpoint")
    loader = run.eval_loader()
    trigger = run.trigger()
    if trigger is not None:
        run.target_index(loader.classnames)
    run.evaluate(loader, trigger)
    return 0
