"""What the commands share: the common flags, config files, validation and the run set-up.

Settings of a training/eval command resolve as
    its DEFAULTS < the checkpoint's run (eval, uap, defend) < --config FILE < the flags given,
are checked before any work (`validate`: UsageError naming the flag and the fix), and a `Run`
then sets up the process group, seeds, model, tokenizer, normalization and data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path


class UsageError(ValueError):
    """A bad flag or config value: the message names the flag and the fix."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so config-file values get the
    same checks and messages that name the file."""

    def error(self, message):
        raise UsageError(message)


# ---- flags ---------------------------------------------------------------------------------

def common_parser() -> argparse.ArgumentParser:
    """Flags of every training/eval stage. No defaults here (SUPPRESS): a flag present in the
    namespace was given explicitly; defaults come from the command's DEFAULTS after the
    config file."""
    p = Parser(add_help=False, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("common flags")
    g.add_argument("--config", metavar="FILE", help="YAML file of flag values; flags override it")
    g.add_argument("--train-data", metavar="PATH",
                   help="caption data: CSV/TSV, WebDataset shards (brace pattern/.tar/dir); "
                        "default: the embedded synthetic dataset")
    g.add_argument("--eval-data", metavar="PATH",
                   help="evaluation data: ImageFolder or labels CSV; default: the synthetic "
                        "eval split when training on the synthetic data")
    g.add_argument("--val-data", metavar="PATH",
                   help="validation data for recipe choices (ImageFolder or labels CSV with "
                        "the classes of --eval-data; its own classnames.txt, else "
                        "--classnames); default: the synthetic val split when training on "
                        "the synthetic data, else none (choices that need it are unavailable)")
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
    speed_flags(g)
    g.add_argument("--recipe", metavar="NAME",
                   help="the recipe a config file follows (abd-paper: reports print the "
                        "paper's numbers beside ours)")
    g.add_argument("--checkpoint-every", type=int, metavar="STEPS",
                   help="steps between checkpoints (0: only at the end)")
    caption_data_flags(p)
    return p


def separator(value: str) -> str:
    """--csv-separator: a tab (`tab`, `\\t` or the character), a comma (`comma`, `,`) or any
    other single character."""
    s = {"tab": "\t", "\\t": "\t", "comma": ","}.get(str(value).lower(), str(value))
    if len(s) != 1:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one character; give tab, comma or the separator itself")
    return s


def caption_data_flags(p: argparse.ArgumentParser):
    """How to read the caption data (--train-data): open_clip's CSV flags and the non-RGB
    policy. Evaluation data (a labels CSV) is read by its header."""
    g = p.add_argument_group("caption data format (--train-data)")
    g.add_argument("--csv-img-key", metavar="COLUMN",
                   help="a CSV/TSV's image-path column (default: found from the header: "
                        "image, filepath, file, path or img)")
    g.add_argument("--csv-caption-key", metavar="COLUMN",
                   help="a CSV/TSV's caption column (default: found from the header: caption, "
                        "title or text)")
    g.add_argument("--csv-separator", type=separator, metavar="SEP",
                   help="a CSV/TSV's separator: tab, comma or one character (default: the one "
                        "that splits the header, tab first for .tsv)")
    g.add_argument("--non-rgb", choices=["convert", "skip"],
                   help="grayscale, palette, CMYK, RGBA, 16-bit images: convert to RGB, or "
                        "skip them as bad samples (default: convert)")


def source_options(cfg) -> dict:
    """open_source's keywords for the caption data, from the caption-data flags (a settings
    dict, or vars(args) of a tool)."""
    return {"image_key": cfg.get("csv_img_key"), "caption_key": cfg.get("csv_caption_key"),
            "delimiter": cfg.get("csv_separator")}


def loader_options(cfg) -> dict:
    """build_loader's keywords for the caption data: source_options and --non-rgb."""
    return {**source_options(cfg), "non_rgb": cfg.get("non_rgb") or "convert"}


def open_caption_data(cfg, source=None):
    """The Manifest of the caption data (`source`, default --train-data) read with the
    caption-data flags; a table whose columns or separator cannot be told is a UsageError
    (its message lists the columns and names the flags)."""
    from abd_fast.data import open_source
    source = cfg.get("train_data") if source is None else source
    try:
        return open_source(source, **source_options(cfg))
    except ValueError as e:
        raise UsageError(f"--train-data: {e}") from e


def speed_flags(p):
    """--precision and --compile/--no-compile (abd_fast.precision, abd_fast.engine): their
    defaults are the measured-faster choice of each training loop."""
    from abd_fast.precision import PRECISIONS
    p.add_argument("--precision", choices=PRECISIONS,
                   help="training arithmetic: auto = bf16 autocast on a GPU or a CPU with "
                        "AMX/AVX512-BF16, else fp32; fp32 = no autocast (reproduces runs "
                        "before --precision existed, with --no-compile); fp16 = autocast + "
                        "GradScaler (for GPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training loop's model (compiled graphs are cached "
                        "in $ABD_FAST_CACHE/inductor and reused by later stages and runs)")


def attack_flags(p: argparse.ArgumentParser, required: bool):
    """--attack and the trigger's flags (poison needs them; eval, uap, defend take them for
    the ASR)."""
    p.add_argument("--attack", metavar="NAME",
                   help="badnet, blended, wanet, sig, label-consistent, badclip"
                        + ("" if required else " (enables ASR)"))
    p.add_argument("--trigger-file", metavar="FILE",
                   help="badclip: the optimized patch (PNG or tensor file)")
    p.add_argument("--patch-location", choices=["random", "corner", "middle", "four-corners"],
                   help="badnet/label-consistent patch location (default: random per sample)")
    p.add_argument("--patch-size", type=int, metavar="PX",
                   help="badnet/label-consistent patch side (default: 16 at 224 px, scaled)")
    p.add_argument("--trigger-seed", type=int, metavar="N",
                   help="seed of the trigger's random parts (blended pattern, noise patches, "
                        "WaNet grid, ...); default: the one the --checkpoint's victim was "
                        "poisoned with (a victim's trigger is its own, whatever --seed), else "
                        "--seed")
    p.add_argument("--trigger-option", action="append", metavar="KEY=VALUE",
                   help="other trigger options (patch_content=fixed, alpha=0.3, k=4, s=0.5, "
                        "delta=0.16, f=6, ...); repeat")


# Defaults every stage command starts from, below the config file and the flags; each
# command's DEFAULTS (cli/<command>.py) change some of them. The demo's values, chosen by
# measurement on 2 CPU cores (bench/train_step.py, docs/TRAINING.md): the tiny ResNet CLIP at
# 32 px reaches ~87% zero-shot top-1 on the synthetic data in 10 epochs (~3 min; 7 epochs
# give ~73-76%, and a poisoning fine-tune of such a model raises CA by ~9 points,
# docs/ATTACKS.md); the tiny ViT at the same cost stays under 40%.
COMMON_DEFAULTS = dict(config=None, train_data=None, eval_data=None, val_data=None,
                       classnames=None, trigger_seed=None,
                       target_label=None, model="abd-tiny-rn", pretrained=None,
                       image_size=None, batch_size=128, epochs=7, lr=2e-3, warmup=50, seed=0,
                       loader=None, workers=None, output=None, resume=None, compile=False,
                       precision="auto", checkpoint_every=0, recipe=None, max_samples=None,
                       csv_img_key=None, csv_caption_key=None, csv_separator=None, non_rgb=None)


def training_defaults(command: str, **changes) -> dict:
    """COMMON_DEFAULTS of a training command: its loop's compile default (measured:
    abd_fast.engine.default_compile) and the command's `changes`."""
    from abd_fast.engine import default_compile
    return dict(COMMON_DEFAULTS, compile=default_compile(command), **changes)


def stage_parser(subparsers, name: str, defaults: dict, own_flags=None, *, help: str,
                 reads_checkpoint: bool = False) -> argparse.ArgumentParser:
    """The subparser of a stage command: the common flags, then `own_flags(parser)`'s; each
    flag's help shows its default. The parser keeps `defaults` and `reads_checkpoint` (the
    command's defaults include the settings of the --checkpoint's run) for resolve_config."""
    p = subparsers.add_parser(name, parents=[common_parser()], argument_default=argparse.SUPPRESS,
                              help=help)
    if own_flags is not None:
        own_flags(p)
    for action in p._actions:
        default = defaults.get(action.dest)
        if default not in (None, False) and action.help:
            action.help += f" (default: {default})"
    p.stage_defaults, p.reads_checkpoint = defaults, reads_checkpoint
    return p


# ---- config: defaults < checkpoint (eval) < YAML < flags -----------------------------------

def yaml_values(path: str, parser: argparse.ArgumentParser, raw=()) -> dict:
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
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
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
    """The run's settings: command defaults < checkpoint config (eval) < --config < flags.
    parser: the command's (stage_parser)."""
    given = {k: v for k, v in vars(args).items() if k != "command"}
    cfg = dict(parser.stage_defaults)
    config_file = given.get("config")
    from_file = yaml_values(config_file, parser) if config_file else {}
    if parser.reads_checkpoint:
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
    out = {k: run[k] for k in keys if run.get(k) is not None}
    if trigger_seed_of(run) is not None:
        out["trigger_seed"] = trigger_seed_of(run)
    return out


def trigger_seed_of(run: dict) -> int | None:
    """The trigger seed a run's config records (`trigger_seed`; checkpoints from before it was
    recorded: the seed of a run that names an attack), None if it names no attack."""
    if run.get("trigger_seed") is not None:
        return run["trigger_seed"]
    return run.get("seed") if run.get("attack") else None


def own_settings(args, parser, defaults: dict, raw=()) -> dict:
    """defaults < --config FILE < the flags given, for the commands that resolve their own
    settings (pipeline, ablation); raw: non-flag config keys (yaml_values)."""
    given = {k: v for k, v in vars(args).items() if k != "command"}
    cfg = dict(defaults)
    if given.get("config"):
        cfg.update(yaml_values(given["config"], parser, raw=raw))
    cfg.update(given)
    return cfg


# ---- validation before any work -----------------------------------------------------------

def check_path(cfg, key, kind="any"):
    """cfg[key] (a path flag) exists: kind "file", "data" (a brace pattern's every shard) or
    "any"."""
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


def check_output(cfg):
    """--output is a directory this process can write to (created if missing)."""
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


def check_int(cfg, key, minimum=1):
    """cfg[key], when set, is an integer >= minimum."""
    v = cfg.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < minimum):
        raise UsageError(f"--{key.replace('_', '-')} must be an integer >= {minimum}, "
                         f"got {v!r}")


def check_number(cfg, key, low, high, open_low=True):
    """cfg[key] is a finite number in (low, high] (open_low) or [low, high]."""
    v = cfg.get(key)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > low if open_low else v >= low) and v <= high
    if not ok:
        flag = f"--{key.replace('_', '-')}"
        if math.isinf(low) and math.isinf(high):
            raise UsageError(f"{flag} must be a finite number, got {v!r}")
        raise UsageError(f"{flag} must be in {'(' if open_low else '['}{low}, {high}], "
                         f"got {v!r}")


def validate(cfg: dict, command_checks=None):
    """Checks every setting before any work; raises UsageError naming the flag and the fix.
    command_checks(cfg): the command's own checks, after the common settings."""
    _check_training_numbers(cfg)
    check_path(cfg, "train_data", "data")
    check_path(cfg, "eval_data", "data")
    check_path(cfg, "val_data", "data")
    check_val_apart(cfg)
    for key in ("classnames", "pretrained", "checkpoint", "trigger_file"):
        check_path(cfg, key, "file")
    from abd_fast.models import available_models, tiny_models
    if cfg["model"] not in available_models():
        raise UsageError(f"--model {cfg['model']!r} is not a known architecture: the tiny "
                         f"configs {', '.join(tiny_models())} or an open_clip model "
                         "(RN50, ViT-B-32, ...)")
    if command_checks is not None:
        command_checks(cfg)
    if cfg.get("attack") is not None:
        _check_attack(cfg)
    if cfg.get("resume") is not None:
        _check_resume(cfg)
    check_output(cfg)


def require_val_data(cfg: dict, purpose: str):
    """Before any work: user data (--train-data) without --val-data has no validation split
    for the choice `purpose` names (the embedded data has its own)."""
    if cfg.get("val_data") is None and cfg.get("train_data") is not None:
        raise UsageError(f"--val-data is needed: {purpose} is made on validation images (an "
                         "ImageFolder or labels CSV of the evaluation classes, apart from "
                         "--eval-data; never the evaluation split)")


def check_val_apart(cfg: dict):
    """--val-data is neither --eval-data nor --train-data: choices made on it must not see the
    split the results are reported on, nor the training pairs."""
    val = cfg.get("val_data")
    if val is None:
        return
    for key in ("eval_data", "train_data"):
        other = cfg.get(key)
        if other is not None and os.path.realpath(str(other)) == os.path.realpath(str(val)):
            raise UsageError(f"--val-data {val} is the --{key.replace('_', '-')}: recipe "
                             "choices need a validation split of their own; give a separate "
                             "ImageFolder or labels CSV (e.g. held-out images of the same "
                             "classes)")


def _check_training_numbers(cfg: dict):
    for key in ("batch_size", "epochs", "image_size"):
        check_int(cfg, key)
    n = cfg.get("max_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < cfg["batch_size"]):
        raise UsageError(f"--max-samples must be an integer >= --batch-size "
                         f"({cfg['batch_size']}): training takes whole batches; got {n!r}")
    for key in ("warmup", "workers", "checkpoint_every"):
        check_int(cfg, key, 0)
    lr = cfg.get("lr")
    # (poison's default lr, None, depends on the weights and the data: cli/poison.py)
    if (lr is not None or cfg.get("command") != "poison") and (
            not isinstance(lr, (int, float)) or isinstance(lr, bool)
            or not (math.isfinite(lr) and lr > 0)):
        raise UsageError(f"--lr must be a positive finite number, got {lr!r}")
    if not isinstance(cfg.get("seed"), int) or cfg["seed"] < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {cfg.get('seed')!r}")


def _check_attack(cfg: dict):
    from abd_fast.attacks import ATTACKS
    if cfg["attack"] not in ATTACKS:
        raise UsageError(f"--attack {cfg['attack']!r} is unknown; choose one of "
                         f"{', '.join(ATTACKS)}")
    if cfg.get("target_label") is None:
        raise UsageError("--attack needs --target-label (the backdoor's target class)")
    trigger_options(cfg)  # parses them


def _check_resume(cfg: dict):
    if cfg["command"] == "eval":
        raise UsageError("--resume applies to training stages, not eval")
    if cfg["resume"] == "auto":
        cfg["resume"] = str(Path(cfg["output"]) / "checkpoint.pt")
    if not Path(cfg["resume"]).is_file():
        raise UsageError(f"--resume: no checkpoint at {cfg['resume']}; give the "
                         "checkpoint.pt of an interrupted run (or drop --resume)")


def check_defense_inputs(cfg: dict):
    """uap / defend: the poisoned model's weights, and their other input files."""
    if cfg.get("checkpoint") is None and cfg.get("pretrained") is None:
        raise UsageError("--checkpoint is needed: the poisoned model's weights")
    for key in ("reference_model", "uap"):
        check_path(cfg, key, "file")


def trigger_options(cfg) -> dict:
    """make_trigger's options from the flags: --trigger-option KEY=VALUE pairs (numbers
    parsed), --patch-location, --patch-size and --trigger-file."""
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


# ---- the run set-up ------------------------------------------------------------------------

class Run:
    """What every stage sets up after validation: process group, seeds, model, tokenizer,
    image normalization, data; and the steps stages share (loaders, trigger, MMCL, training
    through the engine, evaluation)."""

    def __init__(self, cfg: dict, weights_flag: str = "--pretrained"):
        from abd_fast.engine import init_distributed, seed_everything
        self.cfg = cfg
        self.info = init_distributed()
        if cfg.get("attack") is not None and cfg.get("trigger_seed") is None:
            cfg["trigger_seed"] = cfg["seed"]  # recorded in the config of what this run writes
        seed_everything(cfg["seed"])
        self._load_model(weights_flag)
        self._find_data()

    def _load_model(self, weights_flag: str):
        """The CLIP from --checkpoint or --pretrained (a WeightsError names `weights_flag`),
        its tokenizer and image normalization."""
        import torch

        from abd_fast.models import WeightsError, create_model, get_tokenizer, image_spec
        from abd_fast.precision import trim_text
        cfg = self.cfg
        weights = cfg.get("checkpoint") or cfg.get("pretrained")
        try:
            self.model = create_model(cfg["model"], pretrained=weights,
                                      image_size=cfg.get("image_size"))
        except WeightsError as e:
            raise UsageError(str(e).replace("--pretrained", weights_flag, 1)) from e
        self.model.to(self.info.device)
        # Token batches cut after their longest caption where that is exact for the model
        # (models.trim_tokens) and the precision allows it (precision.trim_text); not for a
        # compiled loop, which would compile again for each new width.
        self.tokenizer = get_tokenizer(cfg["model"], trim=self.model.short_text
                                       and trim_text(cfg.get("precision"))
                                       and not cfg.get("compile"))
        self.spec = image_spec(self.model)
        self.mean = torch.tensor(self.spec.mean, device=self.info.device)
        self.std = torch.tensor(self.spec.std, device=self.info.device)

    def _find_data(self):
        """The embedded synthetic dataset where no training (or, for eval, evaluation) data is
        given; the evaluation data and its class names."""
        cfg = self.cfg
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
        # Validation data (recipe choices): --val-data, else the synthetic val split when
        # training on the synthetic data; never the evaluation split.
        self.val_source = cfg.get("val_data")
        if self.val_source is None and cfg.get("train_data") is None:
            self.val_source = self.synthetic.val_dir

    def train_loader(self):
        from abd_fast.data import build_loader
        source = open_caption_data(self.cfg, self.cfg.get("train_data") or self.synthetic.shards)
        n = self.cfg.get("max_samples")
        if n is not None and n < len(source):  # a subset: the same samples in both engines
            import numpy as np
            source = source.subset(np.sort(np.argsort(source.ids, kind="stable")[:n]),
                                   f"first{n}")
        return build_loader(source, train=True, batch_size=self.cfg["batch_size"],
                            image_size=self.spec.size, loader=self.cfg.get("loader"),
                            seed=self.cfg["seed"], rank=self.info.rank,
                            world_size=self.info.world_size, num_workers=self.cfg.get("workers"),
                            **loader_options(self.cfg))

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

    def val_images(self, n: int, purpose: str):
        """(source, uint8 images [<= n, 3, S, S], class names) of the validation data, for the
        choice `purpose` names (n images evenly spaced over its listing; labels not kept).
        Raises UsageError when there is none (user data without --val-data)."""
        if self.val_source is None:
            raise UsageError(f"--val-data is needed: {purpose} is made on validation images "
                             "(an ImageFolder or labels CSV of the evaluation classes, apart "
                             "from --eval-data; never the evaluation split)")
        from abd_fast.scan.model import scan_images
        source = Path(self.val_source)
        own = (source if source.is_dir() else source.parent) / "classnames.txt"
        images, classnames = scan_images(
            source, n, image_size=self.spec.size, loader=self.cfg.get("loader"),
            num_workers=self.cfg.get("workers"),
            classnames=None if own.exists() else self.cfg.get("classnames"))
        if not classnames:
            raise UsageError(f"--val-data {source}: no class names; put a classnames.txt "
                             "beside it or give --classnames")
        return source, images, classnames

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
                                seed=self.cfg["trigger_seed"], **trigger_options(self.cfg))
        except ValueError as e:
            raise UsageError(f"--attack {self.cfg['attack']}: {e}") from e

    def mmcl(self, poison=None):
        """MMCL = the CLIP loss on (image, caption) pairs, the poisoned ones through the view:
        loss_fn(model, batch, epoch) for the Trainer."""
        from abd_fast.attacks import training_pairs
        from abd_fast.engine import contrastive_loss
        from abd_fast.precision import image_dtype
        loss, device, tok = contrastive_loss(self.info), self.info.device, self.tokenizer
        mean, std = self.mean, self.std

        def loss_fn(model, batch, epoch):
            dtype = image_dtype(device)  # autocast's: the tower takes the batch without a cast
            x, captions = training_pairs(poison, batch.images.to(device, non_blocking=True),
                                         batch.ids, batch.captions, mean=mean, std=std,
                                         out_dtype=dtype)
            image_features, text_features, scale = model(x, tok(captions).to(device))
            return loss(image_features, text_features, scale)
        return loss_fn

    def fit(self, loss_fn, loader, desc: str, module=None, **trainer_kw) -> dict:
        """Trains `module` (default: the CLIP) with loss_fn through the engine's Trainer;
        trainer_kw: its other options (optimizer, schedule, extra; compile, default
        --compile)."""
        from abd_fast.engine import Trainer
        cfg = self.cfg
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items()
                  if k != "resume"}
        trainer = Trainer(self.model if module is None else module, loader, loss_fn,
                          lr=cfg["lr"], epochs=cfg["epochs"], warmup=cfg["warmup"],
                          output_dir=cfg["output"], seed=cfg["seed"],
                          checkpoint_every=cfg["checkpoint_every"],
                          precision=cfg["precision"], resume=cfg.get("resume"), config=config,
                          dist_info=self.info,
                          desc=desc, **{"compile": cfg["compile"], **trainer_kw})
        return trainer.fit()

    def evaluate(self, loader, trigger=None, **notes) -> dict | None:
        """Zero-shot CA (+ ASR and distance with a trigger) on the eval data; rank 0 writes
        OUTPUT/eval.json (with `notes`, extra fields of the stage) and prints the summary."""
        if loader is None:
            return None
        from abd_fast.attacks import Trigger  # (uap's eval passes its UAP: no trigger seed)
        from abd_fast.evaluate import EVAL_FILE, evaluate, summary_line
        target = self.target_index(loader.classnames) if trigger is not None else None
        t0 = time.perf_counter()
        result = evaluate(self.model, loader, classnames=loader.classnames, trigger=trigger,
                          target_index=target, mean=self.mean, std=self.std,
                          device=self.info.device, tokenizer=self.tokenizer)
        result.update(attack=self.cfg.get("attack") if trigger is not None else None,
                      trigger_seed=trigger.seed if isinstance(trigger, Trigger) else None,
                      target_label=self.cfg.get("target_label") if trigger is not None else None,
                      model=self.cfg["model"], image_size=self.spec.size,
                      eval_data=str(self.eval_source), seconds=time.perf_counter() - t0,
                      **notes)
        if self.info.is_main:
            from abd_fast.engine import atomic_write_text
            path = Path(self.cfg["output"]) / EVAL_FILE
            atomic_write_text(json.dumps(result, indent=1) + "\n", path)
            print(f"{summary_line(result)} -> {path}", flush=True)
        return result


def print_training(run: Run, summary: dict):
    """The training summary line of a stage (rank 0)."""
    if run.info.is_main:
        if summary.get("loss") is None:  # resumed from the final checkpoint: nothing to train
            print(f"no steps left to train at step {summary['step']} -> "
                  f"{summary['checkpoint']}", flush=True)
            return
        print(f"trained {summary['step']} steps, final loss {summary['loss']:.4f}, "
              f"{summary['images_per_s']:.0f} images/s, {summary['seconds']:.0f} s -> "
              f"{summary['checkpoint']}", flush=True)


# ---- the attack tools (show-triggers, export-poison, badclip-trigger) ----------------------

def tool_image_size(args) -> int:
    """--image-size, else the --model's."""
    if getattr(args, "image_size", None):
        return int(args.image_size)
    if getattr(args, "model", None):
        from abd_fast.models import create_model, image_spec
        return image_spec(create_model(args.model)).size
    raise SystemExit("give --image-size (or --model, whose image size is used)")


def tool_output(args) -> Path:
    """--output, created."""
    if not getattr(args, "output", None):
        raise SystemExit("give --output DIR")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    return out


def to_uint8(x):
    """float [B,3,H,W] in [0,1] -> uint8 HWC numpy arrays."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
