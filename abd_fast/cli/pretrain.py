"""`pretrain`: train a CLIP on caption data (the clean model), from scratch or from
--pretrained weights; without --train-data, on the embedded synthetic dataset."""
from __future__ import annotations

from .common import Run, print_training, stage_parser, training_defaults

NAME = "pretrain"
# The demo's clean model: 20 epochs, trained to convergence so that poisoning it is not also
# extra training (10 epochs: a 1% poisoning fine-tune raised CA 86.7 -> 96-97; 20 epochs: val
# CA 98.1%, and a poisoning fine-tune leaves it at 98.1-98.3; docs/ATTACKS.md).
DEFAULTS = training_defaults(NAME, output="runs/pretrain", epochs=20)


def add_parser(subparsers):
    return stage_parser(subparsers, NAME, DEFAULTS,
                        help="train a CLIP on caption data (the clean model)")


def check(cfg: dict):
    """Nothing beyond the common settings."""


def run(cfg: dict) -> int:
    run = Run(cfg)
    train, evaluation = run.train_loader(), run.eval_loader()
    summary = run.fit(run.mmcl(), train, "pretrain")
    print_training(run, summary)
    run.evaluate(evaluation)
    return 0
