"""A defense's training budget (clean pairs, optimizer steps, learning rate), stated against
the poisoning that planted the backdoor (issue 17):

    fixed  the flags as given: --max-samples, --epochs, --batch-size, --lr (as before)
    paper  the ABD paper's shape. The paper poisons with 500K pairs, batch 128, 10 epochs at
           lr 1e-6 (~39K steps) and defends with 250K clean pairs, batch 64, 10 epochs at lr
           3e-6: the same steps at 3x the lr, steps x lr = 3x the poisoning's. So: batch 64,
           steps = the poisoning's optimizer steps (or --budget-steps), lr such that
           steps x lr = ratio x the poisoning's (ratio = --budget-ratio, default 3; with the
           poisoning's steps lr = ratio x its lr), pairs = steps x 64 / epochs (epochs: --epochs,
           default the poisoning's, at least 2 for RoCLIP's nearest-neighbour epoch).

"steps x lr" uses each run's peak lr (both follow the engine's warmup + cosine schedule). The
poisoning's steps, lr, batch and epochs are read from the victim's checkpoint (a `poison`
run's record). Every defense of a victim with the same rule and epochs gets the same pairs,
steps and lr.
"""
from __future__ import annotations

import math

PAPER_BATCH = 64      # the paper's defense batch
PAPER_RATIO = 3.0     # the paper's steps x lr, defense over poisoning (3e-6 vs 1e-6, same steps)
RULES = ("fixed", "paper")
MIN_EPOCHS = 2        # default epochs >= 2: RoCLIP's nearest-neighbour positives need a 2nd


def poisoning_record(checkpoint) -> dict | None:
    """The poisoning's budget from a victim's checkpoint (abd_fast, written by `poison`):
    {"steps", "lr", "batch_size" (all ranks), "epochs", "pairs" (per epoch), "steps_x_lr"};
    None for other weight files or runs."""
    from abd_fast.engine import CheckpointError, load_checkpoint
    if checkpoint is None:
        return None
    try:
        ckpt = load_checkpoint(checkpoint, "--checkpoint")
    except CheckpointError:
        return None
    cfg = ckpt.get("config") or {}
    if cfg.get("command") != "poison" or not ckpt.get("step") or not cfg.get("lr"):
        return None
    world = int(ckpt.get("world_size") or 1)
    batch = int(cfg["batch_size"]) * world
    steps, lr = int(ckpt["step"]), float(cfg["lr"])
    return {"steps": steps, "lr": lr, "batch_size": batch, "epochs": int(cfg["epochs"]),
            "pairs": int(ckpt.get("steps_per_epoch") or 0) * batch,
            "steps_x_lr": steps * lr}


def paper_budget(poisoning: dict, *, epochs: int | None = None, ratio: float = PAPER_RATIO,
                 steps: int | None = None, world_size: int = 1) -> dict:
    """The paper-shaped budget for a poisoning record: {"batch_size" (per process), "epochs"
    (default: the poisoning's, at least MIN_EPOCHS), "pairs", "steps", "lr"}. The steps are
    `steps` (default: the poisoning's) rounded up to a whole number per epoch; lr makes
    steps x lr exactly ratio x the poisoning's. Under DDP the batch is per process and the
    pairs count every rank's."""
    if not ratio > 0:
        raise ValueError(f"--budget-ratio must be > 0, got {ratio!r}")
    epochs = max(MIN_EPOCHS, poisoning["epochs"]) if epochs is None else int(epochs)
    wanted = poisoning["steps"] if steps is None else int(steps)
    if epochs < 1 or wanted < 1:
        raise ValueError(f"a paper budget needs epochs >= 1 and steps >= 1, got {epochs} and "
                         f"{wanted}")
    per_epoch = math.ceil(wanted / epochs)
    total = per_epoch * epochs
    return {"batch_size": PAPER_BATCH, "epochs": epochs,
            "pairs": per_epoch * PAPER_BATCH * world_size, "steps": total,
            "lr": ratio * poisoning["steps_x_lr"] / total}


def budget_record(rule: str, *, pairs: int, steps: int, lr: float, batch_size: int,
                  epochs: int, poisoning: dict | None) -> dict:
    """What eval.json and the report state about a defense's budget: its pairs, steps, lr,
    steps x lr and the ratio of that to the poisoning's (None when the poisoning is unknown)."""
    out = {"rule": rule, "pairs": int(pairs), "steps": int(steps), "lr": float(lr),
           "batch_size": int(batch_size), "epochs": int(epochs), "steps_x_lr": steps * lr,
           "poisoning": poisoning, "ratio": None}
    if poisoning:
        out["ratio"] = steps * lr / poisoning["steps_x_lr"]
    return out
