"""Command line of abd_fast: python -m abd_fast.train COMMAND [flags].

Commands (no command: `pipeline` on the embedded demo data into runs/demo):
  pipeline   the whole job: clean model -> victims -> UAP -> defenses -> ablations -> report
  ablation   ABD's Table II (--table 2) or Table III (--table 3) on a victim
  pretrain   train a CLIP on caption data, from scratch or from --pretrained weights (the
             clean model); without --train-data, on the embedded synthetic dataset
  poison     fine-tune a CLIP on clean + poisoned caption data with MMCL (plant a backdoor)
  eval       zero-shot CA top-1/top-5, ASR and the clean/triggered embedding distance
  uap        train ABD's universal adversarial perturbation against a poisoned model
  defend     fine-tune a poisoned model with ft, cleanclip, roclip or abd
  selfcheck  check the fused ops against their PyTorch references

Every stage takes the common flags (--help of a command lists them) and --config FILE, a
YAML mapping of flag names to values (`batch-size: 64`); flags given on the command line
override the file. Runs under torchrun for DDP (gloo on CPU, nccl on GPU):
    torchrun --nproc_per_node 2 -m abd_fast.train poison ...
Stages write to --output: checkpoint.pt (resume with --resume), metrics.jsonl, eval.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Large CPU batches: transparent huge pages cut page-fault time of fresh tensors 4x.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network


class UsageError(ValueError):
    """A bad flag or config value: the message names the flag and the fix."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so config-file values get the
    same checks and messages that name the file."""

    def error(self, message):
        raise UsageError(message)


# ---- flags ---------------------------------------------------------------------------------

def _common_parser() -> argparse.ArgumentParser:
    """Flags of every training/eval stage. No defaults here (SUPPRESS): a flag present in the
    namespace was given explicitly; defaults come from STAGE_DEFAULTS after the config file."""
    p = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("common flags")
    g.add_argument("--config", metavar="FILE", help="YAML file of flag values; flags override it")
    g.add_argument("--train-data", metavar="PATH",
                   help="caption data: CSV, WebDataset shards (brace pattern/.tar/dir); default: "
                        "the embedded synthetic dataset")
    g.add_argument("--eval-data", metavar="PATH",
                   help="evaluation data: ImageFolder or labels CSV; default: the synthetic "
                        "eval split when training on the synthetic data")
    g.add_argument("--classnames", metavar="FILE", help="class names of --eval-data, one per line")
    g.add_argument("--target-label", metavar="NAME", help="the backdoor's target class")
    g.add_argument("--model", metavar="NAME", help="abd-tiny-vit, abd-tiny-rn, RN50, ViT-B-32, ...")
    g.add_argument("--pretrained", metavar="FILE",
                   help="initial weights (safetensors, weights-only torch file or an abd_fast "
                        "checkpoint.pt)")
    g.add_argument("--image-size", type=int, metavar="PX", help="image side (default: model's)")
    g.add_argument("--batch-size", type=int, metavar="N", help="per-process batch size")
    g.add_argument("--max-samples", type=int, metavar="N",
                   help="train on the N lowest sample ids of the training data only (the same "
                        "subset under both loaders; default: all)")
    g.add_argument("--epochs", type=int, metavar="N", help="passes over the training data")
    g.add_argument("--lr", type=float, metavar="LR", help="peak learning rate")
    g.add_argument("--warmup", type=int, metavar="STEPS", help="linear warmup steps")
    g.add_argument("--seed", type=int, help="seeds the model init, data order and triggers")
    g.add_argument("--loader", choices=["torch", "dali"],
                   help="decoding engine (default: dali with a GPU, else torch)")
    g.add_argument("--workers", type=int, metavar="N", help="decoding workers per process")
    g.add_argument("--output", metavar="DIR", help="output directory")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue from CKPT (default: OUTPUT/checkpoint.pt)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--recipe", metavar="NAME",
                   help="the recipe a config file follows (abd-paper: reports print the "
                        "paper's numbers beside ours)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="steps between checkpoints (0: only at the end)")
    return p


def _attack_flags(p: argparse.ArgumentParser, required: bool):
    p.add_argument("--attack", metavar="NAME",
                   help="badnet, blended, wanet, sig, label-consistent, badclip"
                        + ("" if required else " (enables ASR)"))
    p.add_argument("--trigger-file", metavar="FILE",
                   help="badclip: the optimized patch (PNG or tensor file)")
    p.add_argument("--patch-location", choices=["random", "corner", "middle", "four-corners"],
                   help="badnet/label-consistent patch location (default: random per sample)")
    p.add_argument("--patch-size", type=int, metavar="PX",
                   help="badnet/label-consistent patch side (default: 16 at 224 px, scaled)")
    p.add_argument("--trigger-option", action="append", metavar="KEY=VALUE",
                   help="other trigger options (patch_content=fixed, alpha=0.3, k=4, s=0.5, "
                        "delta=0.16, f=6, ...); repeat")


# Per-command defaults, below the config file and the flags. pretrain's are the demo's,
# chosen by measurement on 2 CPU cores (bench/train_step.py, docs/TRAINING.md): the tiny
# ResNet CLIP at 32 px reaches ~87% zero-shot top-1 on the synthetic data in 10 epochs
# (~3 min; 7 epochs give ~73-76%, and a poisoning fine-tune of such a model raises CA by
# ~9 points, docs/ATTACKS.md); the tiny ViT at the same cost stays under 40%.
COMMON_DEFAULTS = dict(config=None, train_data=None, eval_data=None, classnames=None,
                       target_label=None, model="abd-tiny-rn", pretrained=None,
                       image_size=None, batch_size=128, epochs=7, lr=2e-3, warmup=50, seed=0,
                       loader=None, workers=None, output=None, resume=None, compile=False,
                       checkpoint_every=0, recipe=None, max_samples=None)
STAGE_DEFAULTS = {
    "pretrain": dict(COMMON_DEFAULTS, output="runs/pretrain", epochs=10),
    "poison": dict(COMMON_DEFAULTS, output="runs/poison", attack=None, poison_count=None,
                   poison_rate=None, trigger_file=None, trigger_option=None, epochs=3,
                   lr=1e-3, warmup=50),  # demo: 10% poisons -> ASR 96-99% (docs/ATTACKS.md)
    "eval": dict(COMMON_DEFAULTS, checkpoint=None, attack=None, trigger_file=None,
                 trigger_option=None, batch_size=250, output=None),
    # The attack flags of uap/defend only drive the evaluation (ASR); by default they come
    # from the poisoned checkpoint's run. uap/defend defaults are the demo's, measured on the
    # badnet victim (CA 86.7, ASR 99.1; one seed each, docs/METHOD.md): one UAP epoch over
    # the 10,000 pairs (31 s) already sends 100% of non-target images to the target; ABD
    # with one epoch of batch 64, lr 3e-4, warmup 5 on --max-samples 4096 (24 s) gives
    # CA 82.8 / ASR 9.3 (lr 2e-4 at batch 128: ASR 16.2; lr 5e-4: CA 81.3).
    "uap": dict(COMMON_DEFAULTS, output="runs/uap", checkpoint=None, reference_model=None,
                mode="patch", patch_area=0.03, eps=0.03, no_backdoor_loss=False,
                backdoor_loss_sign=1.0, backdoor_loss_pairing="reference-query",
                lambda_bd=1.0, brightness=1.2, attack=None, trigger_file=None,
                trigger_option=None, epochs=1, batch_size=64, lr=2e-4, warmup=0),
    "defend": dict(COMMON_DEFAULTS, output="runs/defend", checkpoint=None, method="abd",
                   uap=None, abd_objective="align", no_adv=False, no_eda=False, break_epoch=2,
                   bank_size=4096, lambda1=1.0, lambda2=1.0, attack=None, trigger_file=None,
                   trigger_option=None, epochs=1, batch_size=64, lr=3e-4,
                   warmup=5),
}
PATH_FLAGS = ("train_data", "eval_data", "classnames", "pretrained", "checkpoint",
              "trigger_file", "reference_model", "uap")
CHECKPOINT_DEFAULTS = ("eval", "uap", "defend")  # commands that read the checkpoint's run


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m abd_fast.train", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)
    ap.stages = sub.choices  # command -> its parser (config files are checked by it)

    p = sub.add_parser("pretrain", parents=[_common_parser()],
                       argument_default=argparse.SUPPRESS,
                       help="train a CLIP on caption data (the clean model)")
    p.set_defaults(func=pretrain)

    p = sub.add_parser("poison", parents=[_common_parser()],
                       argument_default=argparse.SUPPRESS,
                       help="fine-tune on clean + poisoned data (MMCL): plant a backdoor")
    _attack_flags(p, required=True)
    p.add_argument("--poison-count", type=int, metavar="N", help="poisoned samples")
    p.add_argument("--poison-rate", type=float, metavar="R", help="poisoned fraction in (0, 1]")
    p.set_defaults(func=poison)

    p = sub.add_parser("eval", parents=[_common_parser()],
                       argument_default=argparse.SUPPRESS,
                       help="zero-shot CA/ASR of a checkpoint, writes eval.json")
    p.add_argument("--checkpoint", metavar="FILE", help="the weights to evaluate")
    _attack_flags(p, required=False)
    p.set_defaults(func=evaluate_command)

    p = sub.add_parser("uap", parents=[_common_parser()], argument_default=argparse.SUPPRESS,
                       help="train ABD's universal adversarial perturbation against a poisoned "
                            "model (AdvCLIP's GAN + the backdoor loss)")
    p.add_argument("--checkpoint", metavar="FILE", help="the poisoned model's weights")
    p.add_argument("--reference-model", metavar="FILE",
                   help="the clean model's weights, for the backdoor loss (default: the "
                        "poisoned model on the clean image stands in)")
    p.add_argument("--mode", choices=["patch", "linf"], help="UAP form")
    p.add_argument("--patch-area", type=float, metavar="F", help="patch area / image area")
    p.add_argument("--eps", type=float, metavar="E", help="L-inf budget (mode linf)")
    p.add_argument("--no-backdoor-loss", action="store_true",
                   help="plain AdvCLIP UAP, without ABD's backdoor loss (Table III)")
    p.add_argument("--backdoor-loss-sign", type=float, choices=[1.0, -1.0],
                   help="+1: pull the pairs together (the paper's text), -1: push apart")
    p.add_argument("--backdoor-loss-pairing", choices=["reference-query", "adversarial-query"],
                   help="which features are the InfoNCE queries (docs/METHOD.md)")
    p.add_argument("--lambda-bd", type=float, metavar="W", help="weight of the backdoor loss")
    p.add_argument("--brightness", type=float, metavar="F",
                   help="brightness factor of the reference view (ABD Fig. 1)")
    _attack_flags(p, required=False)
    p.set_defaults(func=uap_command)

    p = sub.add_parser("defend", parents=[_common_parser()], argument_default=argparse.SUPPRESS,
                       help="fine-tune a poisoned model with a defense: ft, cleanclip, roclip "
                            "or abd")
    p.add_argument("--checkpoint", metavar="FILE", help="the poisoned model's weights")
    p.add_argument("--method", choices=["ft", "cleanclip", "roclip", "abd"], help="defense")
    p.add_argument("--uap", metavar="FILE", help="abd: uap.pt written by the uap stage")
    p.add_argument("--abd-objective", choices=["align", "replace"],
                   help="abd: in-modal alignment with the views, or MMCL on the views")
    p.add_argument("--no-adv", action="store_true", help="abd ablation: no adversarial view")
    p.add_argument("--no-eda", action="store_true", help="abd ablation: no EDA text view")
    p.add_argument("--break-epoch", type=int, metavar="N",
                   help="roclip: nearest-neighbour positives every N-th epoch")
    p.add_argument("--bank-size", type=int, metavar="N", help="roclip: text memory bank size")
    p.add_argument("--lambda1", type=float, metavar="W", help="weight of the MMCL term")
    p.add_argument("--lambda2", type=float, metavar="W", help="weight of the in-modal terms")
    _attack_flags(p, required=False)
    p.set_defaults(func=defend_command)

    for name, parser in ap.stages.items():  # show each command's defaults in its --help
        for action in parser._actions:
            default = STAGE_DEFAULTS[name].get(action.dest)
            if default not in (None, False) and action.help:
                action.help += f" (default: {default})"

    p = sub.add_parser("selfcheck", help="check the fused ops against their references")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=selfcheck)
    from abd_fast.attacks.cli import add_commands  # show-triggers, export-poison, badclip-trigger
    add_commands(sub, _common_parser())
    from abd_fast.pipeline import add_commands as add_pipeline_commands  # pipeline, ablation
    add_pipeline_commands(sub, _common_parser())
    return ap


# ---- config: defaults < checkpoint (eval) < YAML < flags -----------------------------------

def _yaml_values(path: str, parser: argparse.ArgumentParser, raw=()) -> dict:
    """{dest: value} of a YAML config, each value checked by the flag's own parser; keys in
    `raw` (not flags, e.g. the pipeline's `stage-flags` mapping) are returned unchecked."""
    data = _yaml_mapping(path)
    out = {k.replace("-", "_"): data.pop(k) for k in raw if k in data}
    return {**check_flag_values(data, parser, f"--config {path}"), **out}


def _yaml_mapping(path: str) -> dict:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror}); give an existing YAML "
                         "file") from e
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values "
                         "(e.g. `batch-size: 64`)")
    return data


def check_flag_values(data: dict, parser: argparse.ArgumentParser, where: str) -> dict:
    """{dest: value} of a {flag name: value} mapping, each value checked by the flag's own
    parser; errors start with `where` (e.g. the config file)."""
    flags = {o: a for a in parser._actions for o in a.option_strings}
    out = {}
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = flags.get(flag)
        if action is None or flag in ("--config", "--help"):
            known = sorted(f[2:] for f in flags if f.startswith("--") and f not in
                           ("--config", "--help"))
            raise UsageError(f"{where}: unknown key {key!r}; keys are flag names: "
                             f"{', '.join(known)}")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key} must be true or false, got {value!r}")
            out[action.dest] = value
            continue
        values = value if isinstance(value, list) and action.nargs is None and isinstance(
            action, argparse._AppendAction) else [value]
        argv = []
        for v in values:
            argv += [flag, str(v)]
        try:
            ns = parser.parse_args(argv)
        except UsageError as e:
            raise UsageError(f"{where}: {key}: {e}") from e
        out[action.dest] = getattr(ns, action.dest)
    return out


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The run's settings: command defaults < checkpoint config (eval) < --config < flags."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    cfg = dict(STAGE_DEFAULTS[args.command])
    config_file = given.get("config")
    from_file = _yaml_values(config_file, parser) if config_file else {}
    if args.command in CHECKPOINT_DEFAULTS:
        ckpt = given.get("checkpoint", from_file.get("checkpoint"))
        cfg.update(_checkpoint_config(ckpt))
    cfg.update(from_file)
    cfg.update(given)
    cfg["command"] = args.command
    return cfg


def _checkpoint_config(path) -> dict:
    """Settings the run that wrote an abd_fast checkpoint used and eval should reuse (model,
    image size, the attack's trigger and seed); {} for plain weight files."""
    if not path or not Path(path).is_file():
        return {}
    from abd_fast.engine import CheckpointError, load_checkpoint
    try:
        run = load_checkpoint(path, "--checkpoint").get("config", {})
    except CheckpointError:
        return {}
    keys = ("model", "image_size", "attack", "target_label", "seed", "trigger_file",
            "trigger_option", "patch_location", "patch_size")
    return {k: run[k] for k in keys if run.get(k) is not None}


# ---- validation before any work -----------------------------------------------------------

def _check_path(cfg, key, kind="any"):
    value = cfg.get(key)
    if value is None:
        return
    flag = "--" + key.replace("_", "-")
    s = str(value)
    if kind == "data" and "{" in s and "}" in s:  # a brace pattern: every shard must exist
        from abd_fast.data.sources import expand_braces
        missing = [p for p in expand_braces(s) if not os.path.isfile(p)]
        if missing:
            raise UsageError(f"{flag} {s}: shard {missing[0]} does not exist"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                             + "; check the pattern")
        return
    p = Path(s)
    if not p.exists():
        raise UsageError(f"{flag} {s}: no such file or directory; check the path")
    if kind == "file" and not p.is_file():
        raise UsageError(f"{flag} {s}: is a directory, expected a file")


def _check_output(cfg):
    out = cfg.get("output")
    if out is None:
        raise UsageError("--output is needed: the directory for results")
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"--output {out}: exists and is not a directory; give a directory")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output {out}: cannot write there ({e.strerror or e}); choose a "
                         "writable directory") from e


def validate(cfg: dict):
    """Checks every setting before any work; raises UsageError naming the flag and the fix."""
    def positive_int(key, minimum=1):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= {minimum}, "
                             f"got {v!r}")
    for key in ("batch_size", "epochs", "image_size"):
        positive_int(key)
    n = cfg.get("max_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < cfg["batch_size"]):
        raise UsageError(f"--max-samples must be an integer >= --batch-size "
                         f"({cfg['batch_size']}): training takes whole batches; got {n!r}")
    for key in ("warmup", "workers", "checkpoint_every"):
        positive_int(key, 0)
    lr = cfg.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (math.isfinite(lr)
                                                                         and lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {lr!r}")
    if not isinstance(cfg.get("seed"), int) or cfg["seed"] < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {cfg.get('seed')!r}")
    _check_path(cfg, "train_data", "data")
    _check_path(cfg, "eval_data", "data")
    for key in ("classnames", "pretrained", "checkpoint", "trigger_file"):
        _check_path(cfg, key, "file")
    from abd_fast.models import available_models, tiny_models
    if cfg["model"] not in available_models():
        raise UsageError(f"--model {cfg['model']!r} is not a known architecture: the tiny "
                         f"configs {', '.join(tiny_models())} or an open_clip model "
                         "(RN50, ViT-B-32, ...)")
    command = cfg["command"]
    if command == "poison":
        if cfg.get("attack") is None:
            raise UsageError("--attack is needed: badnet, blended, wanet, sig, "
                             "label-consistent or badclip")
        if cfg.get("target_label") is None:
            raise UsageError("--target-label is needed: the class the backdoor maps to "
                             "(e.g. star on the synthetic data, banana on ImageNet)")
        if (cfg.get("poison_count") is None) == (cfg.get("poison_rate") is None):
            raise UsageError("give exactly one of --poison-count N and --poison-rate R")
        positive_int("poison_count")
        rate = cfg.get("poison_rate")
        if rate is not None and not (isinstance(rate, (int, float)) and 0 < rate <= 1):
            raise UsageError(f"--poison-rate must be in (0, 1], got {rate!r}")
    if command in ("uap", "defend"):
        _validate_defense(cfg)
    if command == "eval":
        if cfg.get("checkpoint") is None and cfg.get("pretrained") is None:
            raise UsageError("--checkpoint is needed: the weights to evaluate")
        if cfg.get("output") is None:
            ckpt = cfg.get("checkpoint") or cfg["pretrained"]
            cfg["output"] = str(Path(ckpt).parent)
    if cfg.get("attack") is not None:
        from abd_fast.attacks import ATTACKS
        if cfg["attack"] not in ATTACKS:
            raise UsageError(f"--attack {cfg['attack']!r} is unknown; choose one of "
                             f"{', '.join(ATTACKS)}")
        if cfg.get("target_label") is None:
            raise UsageError("--attack needs --target-label (the backdoor's target class)")
        _trigger_options(cfg)  # parses them
    if cfg.get("resume") is not None:
        if cfg["command"] == "eval":
            raise UsageError("--resume applies to training stages, not eval")
        if cfg["resume"] == "auto":
            cfg["resume"] = str(Path(cfg["output"]) / "checkpoint.pt")
        if not Path(cfg["resume"]).is_file():
            raise UsageError(f"--resume: no checkpoint at {cfg['resume']}; give the "
                             "checkpoint.pt of an interrupted run (or drop --resume)")
    _check_output(cfg)


def _validate_defense(cfg: dict):
    """uap / defend settings (validate's part for the defense stages)."""
    if cfg.get("checkpoint") is None and cfg.get("pretrained") is None:
        raise UsageError("--checkpoint is needed: the poisoned model's weights")
    for key in ("reference_model", "uap"):
        _check_path(cfg, key, "file")

    def number(key, low, high, open_low=True):
        v = cfg.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
            (v > low if open_low else v >= low) and v <= high
        if not ok:
            raise UsageError(f"--{key.replace('_', '-')} must be in "
                             f"{'(' if open_low else '['}{low}, {high}], got {v!r}")
    if cfg["command"] == "uap":
        number("patch_area", 0, 1)
        number("eps", 0, 1)
        number("lambda_bd", 0, math.inf, open_low=False)
        number("brightness", 0, 10)
        if cfg["mode"] == "patch" and cfg["patch_area"] >= 1:
            raise UsageError("--patch-area must be below 1 (0.03: 3% of the image)")
        return
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
        number(key, 0, math.inf, open_low=False)


def _trigger_options(cfg) -> dict:
    """--trigger-option KEY=VALUE pairs (numbers parsed) plus --trigger-file."""
    out = {}
    for item in cfg.get("trigger_option") or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise UsageError(f"--trigger-option {item!r}: expected KEY=VALUE (e.g. alpha=0.3)")
        for conv in (int, float):
            try:
                value = conv(value)
                break
            except ValueError:
                pass
        out[key.strip()] = value
    if cfg.get("patch_location") is not None:
        out["location"] = cfg["patch_location"]
    if cfg.get("patch_size") is not None:
        out["patch_size"] = cfg["patch_size"]
    if cfg.get("trigger_file") is not None:
        out["patch_file" if cfg["attack"] == "badclip" else
            ("pattern" if cfg["attack"] == "blended" else "patch_content")] = cfg["trigger_file"]
    return out


# ---- stages ----------------------------------------------------------------------------------

class _Run:
    """What every stage sets up after validation: process group, seeds, model, tokenizer,
    image normalization, data."""

    def __init__(self, cfg: dict, weights_flag: str = "--pretrained"):
        import torch

        from abd_fast.engine import init_distributed, seed_everything
        from abd_fast.models import WeightsError, create_model, get_tokenizer, image_spec
        self.cfg = cfg
        self.info = init_distributed()
        seed_everything(cfg["seed"])
        weights = cfg.get("checkpoint") or cfg.get("pretrained")
        try:
            self.model = create_model(cfg["model"], pretrained=weights,
                                      image_size=cfg.get("image_size"))
        except WeightsError as e:
            raise UsageError(str(e).replace("--pretrained", weights_flag, 1)) from e
        self.model.to(self.info.device)
        self.tokenizer = get_tokenizer(cfg["model"])
        self.spec = image_spec(self.model)
        self.mean = torch.tensor(self.spec.mean, device=self.info.device)
        self.std = torch.tensor(self.spec.std, device=self.info.device)
        self.synthetic = None
        if cfg.get("train_data") is None or (cfg["command"] == "eval"
                                             and cfg.get("eval_data") is None):
            from abd_fast.data.synthetic import ensure_dataset
            self.synthetic = ensure_dataset(seed=0)
        self.eval_source = cfg.get("eval_data")
        self.classnames_file = cfg.get("classnames")
        if self.eval_source is None and self.synthetic is not None:
            self.eval_source = self.synthetic.eval_dir
            self.classnames_file = self.classnames_file or self.synthetic.eval_dir / \
                "classnames.txt"

    def train_loader(self):
        from abd_fast.data import build_loader
        source = self.cfg.get("train_data") or self.synthetic.shards
        n = self.cfg.get("max_samples")
        if n is not None:  # a subset of the manifest, so both engines read the same samples
            import numpy as np

            from abd_fast.attacks.cli import _subset
            from abd_fast.data.sources import open_source
            manifest = open_source(source)
            if n < len(manifest):
                source = _subset(manifest, np.sort(np.argsort(manifest.ids, kind="stable")[:n]),
                                 f"first{n}")
        return build_loader(source, train=True, batch_size=self.cfg["batch_size"],
                            image_size=self.spec.size, loader=self.cfg.get("loader"),
                            seed=self.cfg["seed"], rank=self.info.rank,
                            world_size=self.info.world_size, num_workers=self.cfg.get("workers"))

    def eval_loader(self):
        if self.eval_source is None:
            return None
        from abd_fast.data import build_loader
        loader = build_loader(self.eval_source, train=False, batch_size=250
                              if self.cfg["command"] != "eval" else self.cfg["batch_size"],
                              image_size=self.spec.size, loader=self.cfg.get("loader"),
                              rank=self.info.rank, world_size=self.info.world_size,
                              num_workers=self.cfg.get("workers"),
                              classnames=self.classnames_file)
        if not loader.classnames:
            raise UsageError(f"--eval-data {self.eval_source}: no class names; give --classnames")
        return loader

    def target_index(self, classnames) -> int | None:
        target = self.cfg.get("target_label")
        if target is None:
            return None
        if target not in classnames:
            raise UsageError(f"--target-label {target!r} is not among the {len(classnames)} "
                             f"classes of the evaluation data ({', '.join(classnames[:12])}"
                             f"{', ...' if len(classnames) > 12 else ''})")
        return classnames.index(target)

    def trigger(self):
        if self.cfg.get("attack") is None:
            return None
        from abd_fast.attacks import make_trigger
        try:
            return make_trigger(self.cfg["attack"], image_size=self.spec.size,
                                seed=self.cfg["seed"], **_trigger_options(self.cfg))
        except ValueError as e:
            raise UsageError(f"--attack {self.cfg['attack']}: {e}") from e

    def mmcl(self, poison=None):
        """MMCL = the CLIP loss on (image, caption) pairs, the poisoned ones through the view:
        loss_fn(model, batch, epoch) for the Trainer."""
        from abd_fast.engine import contrastive_loss
        from abd_fast.ops import normalize_images
        loss, device, tok = contrastive_loss(self.info), self.info.device, self.tokenizer
        mean, std = self.mean, self.std

        def loss_fn(model, batch, epoch):
            images = batch.images.to(device, non_blocking=True)
            captions = batch.captions
            if poison is not None:
                captions = poison.captions(batch.ids, captions)
                x = poison.images(images, batch.ids, mean=mean, std=std)
            else:
                x = normalize_images(images, mean, std)
            image_features, text_features, scale = model(x, tok(captions).to(device))
            return loss(image_features, text_features, scale)
        return loss_fn

    def fit(self, loss_fn, loader, desc: str, module=None, **trainer_kw) -> dict:
        """Trains `module` (default: the CLIP) with loss_fn through the engine's Trainer;
        trainer_kw: its other options (optimizer, schedule, extra)."""
        from abd_fast.engine import Trainer
        cfg = self.cfg
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()
                  if k != "resume"}
        trainer = Trainer(self.model if module is None else module, loader, loss_fn,
                          lr=cfg["lr"], epochs=cfg["epochs"], warmup=cfg["warmup"],
                          output_dir=cfg["output"], seed=cfg["seed"],
                          checkpoint_every=cfg["checkpoint_every"], compile=cfg["compile"],
                          resume=cfg.get("resume"), config=config, dist_info=self.info,
                          desc=desc, **trainer_kw)
        return trainer.fit()

    def evaluate(self, loader, trigger=None, **notes) -> dict | None:
        """Zero-shot CA (+ ASR and distance with a trigger) on the eval data; rank 0 writes
        OUTPUT/eval.json (with `notes`, extra fields of the stage) and prints the summary."""
        if loader is None:
            return None
        from abd_fast.evaluate import evaluate, summary_line
        target = self.target_index(loader.classnames) if trigger is not None else None
        t0 = time.perf_counter()
        result = evaluate(self.model, loader, classnames=loader.classnames, trigger=trigger,
                          target_index=target, mean=self.mean, std=self.std,
                          device=self.info.device, tokenizer=self.tokenizer)
        result.update(attack=self.cfg.get("attack") if trigger is not None else None,
                      target_label=self.cfg.get("target_label") if trigger is not None else None,
                      model=self.cfg["model"], image_size=self.spec.size,
                      eval_data=str(self.eval_source), seconds=time.perf_counter() - t0,
                      **notes)
        if self.info.is_main:
            from abd_fast.engine import atomic_write_text
            path = Path(self.cfg["output"]) / "eval.json"
            atomic_write_text(json.dumps(result, indent=1) + "\n", path)
            print(f"{summary_line(result)} -> {path}", flush=True)
        return result


def _print_training(run: _Run, summary: dict):
    if run.info.is_main:
        if summary.get("loss") is None:  # resumed from the final checkpoint: nothing to train
            print(f"no steps left to train at step {summary['step']} -> "
                  f"{summary['checkpoint']}", flush=True)
            return
        print(f"trained {summary['step']} steps, final loss {summary['loss']:.4f}, "
              f"{summary['images_per_s']:.0f} images/s, {summary['seconds']:.0f} s -> "
              f"{summary['checkpoint']}", flush=True)


def pretrain(cfg: dict) -> int:
    run = _Run(cfg)
    train, evaluation = run.train_loader(), run.eval_loader()
    summary = run.fit(run.mmcl(), train, "pretrain")
    _print_training(run, summary)
    run.evaluate(evaluation)
    return 0


def poison(cfg: dict) -> int:
    from abd_fast.attacks import PoisonView
    run = _Run(cfg)
    train, evaluation = run.train_loader(), run.eval_loader()
    if evaluation is not None:
        run.target_index(evaluation.classnames)  # the target must be a class: before training
    trigger = run.trigger()
    try:
        view = PoisonView(train.manifest, trigger, target=cfg["target_label"], seed=cfg["seed"],
                          count=cfg.get("poison_count"), rate=cfg.get("poison_rate"))
    except ValueError as e:
        raise UsageError(str(e)) from e
    if run.info.is_main:
        print(f"poisoning: {view}", flush=True)
    summary = run.fit(run.mmcl(view), train, f"poison {cfg['attack']}")
    _print_training(run, summary)
    run.evaluate(evaluation, trigger)
    return 0


def uap_command(cfg: dict) -> int:
    from abd_fast.defenses.stages import uap_stage
    from abd_fast.models import WeightsError, create_model
    run = _Run(cfg, weights_flag="--checkpoint")
    reference = None
    if cfg.get("reference_model"):
        try:
            reference = create_model(cfg["model"], pretrained=cfg["reference_model"],
                                     image_size=cfg.get("image_size"))
        except WeightsError as e:
            raise UsageError(str(e).replace("--pretrained", "--reference-model", 1)) from e
    summary = uap_stage(run, reference)
    _print_training(run, summary)
    return 0


def defend_command(cfg: dict) -> int:
    from abd_fast.defenses.stages import defend_stage
    run = _Run(cfg, weights_flag="--checkpoint")
    try:
        summary = defend_stage(run)
    except (ValueError, FileNotFoundError) as e:
        if "--uap" in str(e):
            raise UsageError(str(e)) from e
        raise
    _print_training(run, summary)
    return 0


def evaluate_command(cfg: dict) -> int:
    run = _Run(cfg, weights_flag="--checkpoint")
    loader = run.eval_loader()
    trigger = run.trigger()
    if trigger is not None:
        run.target_index(loader.classnames)
    run.evaluate(loader, trigger)
    return 0


def selfcheck(args) -> int:
    import torch
    import torch.nn.functional as F

    from abd_fast.ops import apply_perturbation, apply_trigger, clip_loss, info_nce, reference
    torch.manual_seed(args.seed)
    B, C, H, W, N, D = 16, 3, 64, 64, 256, 128
    images = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8)
    mean, std = torch.tensor([0.48, 0.46, 0.41]), torch.tensor([0.27, 0.26, 0.28])
    patch = torch.rand(C, 8, 8)
    ys, xs = torch.randint(0, H - 8, (B,)), torch.randint(0, W - 8, (B,))
    delta = (torch.rand(C, H, W) - 0.5) * 0.1
    q, k = F.normalize(torch.randn(N, D), dim=-1), F.normalize(torch.randn(N, D), dim=-1)
    s = torch.tensor(50.0)
    checks = [
        ("apply_trigger patch", lambda: apply_trigger(images, "patch", patch=patch, ys=ys, xs=xs,
                                                      mean=mean, std=std),
         lambda: reference.image_op(images, "patch", patch, torch.stack([ys, xs], 1),
                                    mean=mean, std=std)),
        ("apply_perturbation linf", lambda: apply_perturbation(images, delta, mode="linf",
                                                               mean=mean, std=std),
         lambda: reference.image_op(images, "add", delta, eps=0.03, mean=mean, std=std)),
        ("clip_loss", lambda: clip_loss(q, k, s), lambda: reference.clip_loss(q, k, s)),
        ("info_nce", lambda: info_nce(q, k, s), lambda: reference.info_nce(q, k, s)),
    ]
    worst = 0.0
    for name, ours, ref in checks:
        t0 = time.perf_counter()
        out = ours()
        dt = (time.perf_counter() - t0) * 1e3
        err = (out - ref()).abs().max().item()
        worst = max(worst, err)
        print(f"{name:26s} max |ours - reference| = {err:.2e}   ({dt:.1f} ms)")
    ok = worst < 1e-4
    print("fused ops agree with the references" if ok else "MISMATCH against the references")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0].startswith("--") and argv[0] != "--help":
        argv = ["pipeline", *argv]  # flags without a command: the pipeline's (README)
    try:
        args = ap.parse_args(argv)
        if args.command is None:  # the README's main command: the whole demo
            args = ap.parse_args(["pipeline"])
        if getattr(args, "own_config", False):  # pipeline, ablation: resolve their settings
            return args.func(args)
        if args.command not in STAGE_DEFAULTS:  # selfcheck and the attack tools
            for key, value in COMMON_DEFAULTS.items():
                if not hasattr(args, key):
                    setattr(args, key, value)
            return args.func(args)
        cfg = resolve_config(args, ap.stages[args.command])
        validate(cfg)
        try:
            return args.func(cfg)
        finally:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from abd_fast.data import BadDataError
        from abd_fast.engine import CheckpointError, CheckpointWriteError, NonFiniteLossError
        if isinstance(e, (NonFiniteLossError, CheckpointError, CheckpointWriteError, BadDataError,
                          FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    # Run the module's importable copy: the pipeline imports abd_fast.train, and its
    # UsageError must be the class main() catches (not __main__'s twin).
    from abd_fast.train import main as _main
    sys.exit(_main())
