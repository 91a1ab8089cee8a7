"""The one-command job: `python -m abd_fast.train` (no arguments) or `... pipeline [flags]`.

    data -> clean CLIP (trained, or reused from the cache) -> badclip trigger -> poisoned
    victims (one per attack) -> UAP per victim -> defenses on each victim -> ablations
    (ABD Table II and III on the first attack) -> similarity analysis, embeddings ->
    OUTPUT/report.json, report.md, ca_asr.png, embedding.png, similarity.png

Every stage is a run of an existing command (`pretrain`, `poison`, `uap`, `defend`, ...)
called in-process with its flags into OUTPUT/<stage>/, which then holds that command's
checkpoint.pt and eval.json plus stage.json (the stage's flags and wall time); a finished
training stage's checkpoint.pt keeps its weights and config only (engine.strip_checkpoint:
a third of the size). A stage whose stage.json records the same flags and whose outputs
exist is skipped on a re-run, and an interrupted training stage resumes from its last
checkpoint (written every STAGE_CHECKPOINT_STEPS optimizer steps), so a killed pipeline
loses at most those steps.

Settings: each stage's defaults are its command's (abd_fast.train.STAGE_DEFAULTS); the
pipeline changes them only through DEMO_OVERRIDES (the embedded data's defense budget),
PIPELINE_FLAGS, QUICK_OVERRIDES (--quick, the CI smoke run), POISON (the victims'
poisoning settings) and a --config's stage-flags (e.g. configs/paper/pipeline.yaml).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

# The pipeline's departures from the uap/defend defaults of abd_fast.train.STAGE_DEFAULTS
# (which are the demo's recipe, measured: docs/METHOD.md). Keys are commands or
# `command:variant`; values map flag names (without "--") to values. Before --quick and a
# config's stage-flags, which override them.
# On the embedded data only: defenses fine-tune on the first 4,096 pairs (the recipe's
# measured budget, ~24 s per defense), so the whole demo fits in ~15 minutes on 2 CPU cores.
DEMO_OVERRIDES = {"defend": {"max-samples": 4096}}
# Always: RoCLIP's nearest-neighbour positives start in epoch --break-epoch (2), so it needs
# two epochs to be RoCLIP at all.
PIPELINE_FLAGS = {"defend:roclip": {"epochs": 2}}
# How the victims are poisoned (docs/ATTACKS.md: 10% poisons give ASR >= 96% on the demo data).
POISON = {"poison-rate": 0.1}
# --quick: a CI smoke run on a small synthetic set; checks the mechanics, not the numbers.
QUICK_DATA = dict(n_train=512, n_eval_per_class=10, per_shard=256)
QUICK_OVERRIDES = {
    "common": {"batch-size": 64, "epochs": 1, "warmup": 2},
    "pretrain": {"epochs": 2},
    "badclip-trigger": {"steps": 5, "target-images": 16},
    "similarity_batches": 1,
}
BADCLIP_STEPS = 200          # badclip-trigger's own default
SIMILARITY_BATCHES = 4       # x 250 caption pairs for the similarity analysis
EMBEDDING_IMAGES = 500       # eval images in embedding.png, evenly spaced over the eval set
DEFAULT_ATTACKS = ("badnet", "blended", "badclip")
DEFAULT_DEFENSES = ("ft", "cleanclip", "roclip", "abd")
CACHE_VERSION = 1            # bump when pretrain's meaning changes: old cached models are ignored


def _flags(d: dict) -> list[str]:
    """{"epochs": 1, "no-eda": True} -> ["--epochs", "1", "--no-eda"]."""
    out = []
    for k, v in d.items():
        if v is True:
            out.append(f"--{k}")
        elif v not in (None, False):
            out += [f"--{k}", str(v)]
    return out


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


# ---- stages ------------------------------------------------------------------------------------

# Training stages checkpoint this often unless their flags say otherwise (≈ 22 s of the demo's
# stages on 2 CPU cores; 0.3 s per checkpoint of the tiny model with its optimizer state,
# 145 MB; 48 MB once the stage has finished and its checkpoint is stripped). Not part of a
# stage's identity: a resumed run is bit-identical.
STAGE_CHECKPOINT_STEPS = 100
TRAINING_COMMANDS = ("pretrain", "poison", "uap", "defend")


class StageError(RuntimeError):
    """A stage's command failed; the message names the stage and its directory."""


class Stages:
    """Runs named stages into root/<name>/ and skips those already done with the same flags.

    plan: {stage name: estimated cost} (any unit) for the progress line's ETA, which scales
    the measured seconds per cost unit of the stages run so far."""

    def __init__(self, root: Path, plan: dict, log=print):
        self.root, self.plan, self.log = Path(root), dict(plan), log
        self.k, self.t0 = 0, time.perf_counter()
        self.work_s = self.work_cost = 0.0
        self.timing, self.skipped = {}, []

    def _line(self, name, status, current: bool = False):
        """`[stage k/N] name: status | elapsed m:ss | ETA m:ss` (current: the stage is
        still to run, so its cost counts in the ETA)."""
        elapsed = time.perf_counter() - self.t0
        left = sum(c for n, c in list(self.plan.items())[self.k - current:])
        eta = ("ETA 0:00" if not left else f"ETA {_fmt_s(left * self.work_s / self.work_cost)}"
               if self.work_cost else "ETA ?")
        self.log(f"[stage {self.k}/{len(self.plan)}] {name}: {status} | elapsed "
                 f"{_fmt_s(elapsed)} | {eta}", flush=True)

    def done(self, name, argv, outputs) -> bool:
        """True when root/name completed with these flags and its outputs exist."""
        argv = [str(a) for a in argv]
        d = self.root / name
        try:
            meta = json.loads((d / "stage.json").read_text())
        except (OSError, ValueError):
            return False
        return meta.get("argv") == argv and meta.get("complete") and all(
            (d / o).exists() for o in outputs)

    def run(self, name: str, argv: list[str], outputs=("eval.json",), fn=None,
            force: bool = False) -> Path:
        """Runs `python -m abd_fast.train *argv --output root/name` in-process (or fn(dir)
        when given), unless done before with the same argv (and not force). Returns the
        stage's directory."""
        from abd_fast.engine import atomic_write_text, strip_checkpoint
        argv = [str(a) for a in argv]
        d = self.root / name
        training = argv[0] in TRAINING_COMMANDS
        self.k += 1
        if not force and self.done(name, argv, outputs):
            meta = json.loads((d / "stage.json").read_text())
            self.timing[name] = meta["seconds"]
            self.skipped.append(name)
            self.plan[name] = 0
            self._line(name, f"done before ({meta['seconds']:.0f} s then), skipped")
            return d
        self._line(name, "running", current=True)
        resume = []
        try:  # interrupted with the same flags: continue from its checkpoint
            meta = json.loads((d / "stage.json").read_text())
            if (meta.get("argv") == argv and not meta.get("complete")
                    and (d / "checkpoint.pt").is_file()):
                resume = ["--resume"]
                self.log(f"  resuming {name} from {d / 'checkpoint.pt'}", flush=True)
        except (OSError, ValueError):
            pass
        if not resume and d.exists():  # another configuration's leftovers
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps({"argv": argv, "complete": False}) + "\n", d / "stage.json")
        t0 = time.perf_counter()
        if fn is not None:
            fn(d)
        else:
            from abd_fast.train import main
            every = (["--checkpoint-every", str(STAGE_CHECKPOINT_STEPS)]
                     if training and "--checkpoint-every" not in argv else [])
            cmd = [*argv, *every, "--output", str(d), *resume]
            self.log(f"  python -m abd_fast.train {' '.join(cmd)}", flush=True)
            code = main(cmd)
            if code != 0:
                raise StageError(f"stage {name} failed (exit status {code}); its output is in "
                                 f"{d}; fix the cause and re-run: completed stages are kept")
        missing = [o for o in outputs if not (d / o).exists()]
        if missing:
            raise StageError(f"stage {name} wrote no {', '.join(missing)} in {d}")
        seconds = time.perf_counter() - t0
        atomic_write_text(json.dumps({"argv": argv, "complete": True, "seconds": seconds})
                          + "\n", d / "stage.json")
        if training and (d / "checkpoint.pt").is_file():
            try:  # after "complete": a kill never leaves an unresumable checkpoint
                strip_checkpoint(d / "checkpoint.pt")
            except OSError as e:  # only disk space is lost: the full checkpoint is intact
                self.log(f"  kept {name}'s full checkpoint (stripping it failed: {e})",
                         flush=True)
        self.timing[name] = seconds
        self.work_s += seconds
        self.work_cost += self.plan.get(name, 0)
        self._line(name, f"finished in {seconds:.0f} s")
        return d


def read_eval(d: Path) -> dict:
    return json.loads((Path(d) / "eval.json").read_text())


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


# ---- settings and validation ---------------------------------------------------------------------

def add_commands(subparsers, common_parent):
    """`pipeline` and `ablation` subcommands of abd_fast.train."""
    p = subparsers.add_parser(
        "pipeline", argument_default=argparse.SUPPRESS,
        help="the whole job: clean model -> victims -> UAP -> defenses -> ablations -> report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-data", metavar="PATH",
                   help="caption data (CSV or WebDataset shards); default: the embedded "
                        "synthetic dataset")
    p.add_argument("--eval-data", metavar="PATH",
                   help="ImageFolder or labels CSV (needed with --train-data)")
    p.add_argument("--classnames", metavar="FILE", help="class names of --eval-data")
    p.add_argument("--target-label", metavar="NAME",
                   help="the backdoor's target class (default on the synthetic data: star)")
    p.add_argument("--model", metavar="NAME", help="architecture (default abd-tiny-rn)")
    p.add_argument("--pretrained", metavar="FILE",
                   help="the clean model's weights; without it the clean model is trained on "
                        "--train-data first (and cached)")
    p.add_argument("--image-size", type=int, metavar="PX", help="image side (default: model's)")
    p.add_argument("--attacks", metavar="LIST",
                   help=f"comma list (default {','.join(DEFAULT_ATTACKS)})")
    p.add_argument("--defenses", metavar="LIST",
                   help=f"comma list (default {','.join(DEFAULT_DEFENSES)})")
    p.add_argument("--no-ablations", action="store_true",
                   help="skip ABD's Table II and III (run on the first attack)")
    p.add_argument("--quick", action="store_true",
                   help="a small smoke run (CI): small data, 1-2 epochs, numbers not meaningful")
    p.add_argument("--seed", type=int, help="seed of every stage (default 0)")
    p.add_argument("--loader", choices=["torch", "dali"], help="decoding engine")
    p.add_argument("--workers", type=int, metavar="N", help="decoding workers per process")
    p.add_argument("--recipe", metavar="NAME",
                   help="recipe name for the report (abd-paper prints the paper's numbers)")
    p.add_argument("--output", metavar="DIR", help="run directory (default runs/demo; "
                   "runs/quick with --quick)")
    p.add_argument("--config", metavar="FILE", help="YAML of these flags; flags override it")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry: a re-run always skips completed stages")
    p.set_defaults(func=pipeline_command, own_config=True, _parser=p)
    from abd_fast.defenses.ablation import add_command
    add_command(subparsers, common_parent)
    return p


PIPELINE_DEFAULTS = dict(
    train_data=None, eval_data=None, classnames=None, target_label=None, model="abd-tiny-rn",
    pretrained=None, image_size=None, attacks=",".join(DEFAULT_ATTACKS),
    defenses=",".join(DEFAULT_DEFENSES), no_ablations=False, quick=False, seed=0, loader=None,
    workers=None, recipe=None, output=None, config=None, resume=False, stage_flags=None)


def own_settings(args, defaults: dict, raw=()) -> dict:
    """defaults < --config FILE < the flags given, for the commands that resolve their own
    settings (pipeline, ablation: `own_config`); raw: non-flag config keys (_yaml_values)."""
    from abd_fast.train import _yaml_values
    given = {k: v for k, v in vars(args).items()
             if k not in ("func", "command", "own_config") and not k.startswith("_")}
    cfg = dict(defaults)
    if given.get("config"):
        cfg.update(_yaml_values(given["config"], args._parser, raw=raw))
    cfg.update(given)
    return cfg


def _settings(args) -> dict:
    """Flags given > --config > defaults, validated before any work (UsageError names the
    flag)."""
    from abd_fast.train import UsageError, _check_output, _check_path
    cfg = own_settings(args, PIPELINE_DEFAULTS, raw=("stage-flags",))
    cfg["stage_flags"] = _stage_flags(cfg["stage_flags"], f"--config {cfg['config']}")
    from abd_fast.attacks import ATTACKS
    from abd_fast.defenses.stages import METHODS
    for key, known in (("attacks", ATTACKS), ("defenses", METHODS)):
        items = [s.strip() for s in str(cfg[key]).split(",") if s.strip()]
        bad = [s for s in items if s not in known]
        if bad or not items:
            raise UsageError(f"--{key} {cfg[key]!r}: " + (f"unknown {key[:-1]} {bad[0]!r}; " if
                                                          bad else "empty; ")
                             + f"choose from {', '.join(known)} (comma-separated)")
        if len(set(items)) != len(items):
            raise UsageError(f"--{key} {cfg[key]!r}: names a {key[:-1]} twice")
        cfg[key] = items
    if cfg["output"] is None:
        cfg["output"] = "runs/quick" if cfg["quick"] else "runs/demo"
    _check_path(cfg, "train_data", "data")
    _check_path(cfg, "eval_data", "data")
    for key in ("classnames", "pretrained"):
        _check_path(cfg, key, "file")
    if cfg["train_data"] is not None and cfg["eval_data"] is None:
        raise UsageError("--train-data needs --eval-data: an ImageFolder or labels CSV with the "
                         "classes, to measure clean accuracy and the attack success rate")
    if cfg["train_data"] is not None and cfg["target_label"] is None:
        raise UsageError("--target-label is needed with your own data: the class the backdoor "
                         "maps to (one of the --eval-data classes)")
    for key in ("image_size", "workers"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or v < (1 if key == "image_size" else 0)):
            raise UsageError(f"--{key.replace('_', '-')} must be an integer >= "
                             f"{1 if key == 'image_size' else 0}, got {v!r}")
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {cfg['seed']!r}")
    from abd_fast.models import available_models
    if cfg["model"] not in available_models():
        raise UsageError(f"--model {cfg['model']!r} is not a known architecture (abd-tiny-rn, "
                         "abd-tiny-vit, RN50, ViT-B-32, ...)")
    _check_output(cfg)
    return cfg


# Per-command flags a --config may add (`stage-flags:`, e.g. the paper's recipe in
# configs/paper/pipeline.yaml): `defend: {...}` for every defense, then `defend:abd: {...}`
# for one method (likewise `poison:<attack>`); appended last, so they override the demo's
# settings. The pipeline wires models, attacks and outputs between stages: those stay its own.
STAGE_COMMANDS = ("pretrain", "badclip-trigger", "poison", "uap", "defend")
VARIANTS = {"poison": ("badnet", "blended", "wanet", "sig", "label-consistent", "badclip"),
            "defend": ("ft", "cleanclip", "roclip", "abd")}  # `defend:abd` etc. come last
PIPELINE_OWNED = ("output", "config", "resume", "checkpoint", "pretrained", "reference-model",
                  "attack", "trigger-file", "method", "uap", "target-label", "model",
                  "no-backdoor-loss", "no-adv", "no-eda")


def _stage_flags(value, where: str) -> dict:
    """{command: {flag: value}} of a config's `stage-flags`, each flag checked by the
    command's own parser."""
    from abd_fast.train import UsageError, build_parser, check_flag_values
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: stage-flags must map a command ({', '.join(STAGE_COMMANDS)}) "
                         "to its flags, e.g. `defend: {lr: 3.0e-6, epochs: 10}`")
    parsers = build_parser().stages
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
        check_flag_values(flags, parsers[base], f"{where}: stage-flags: {cmd}")
        out[cmd] = flags
    return out


def _data(cfg) -> dict:
    """Paths of the training/eval data, class names and a version string of the training
    data (the clean-model cache key)."""
    from abd_fast.train import UsageError
    if cfg["train_data"] is None:
        from abd_fast.data import synthetic
        kw = QUICK_DATA if cfg["quick"] else {}
        ds = synthetic.ensure_dataset(seed=0, **kw)
        data = dict(train=ds.shards, eval=str(ds.eval_dir),
                    classnames=str(ds.eval_dir / "classnames.txt"),
                    names=list(ds.classnames), target=cfg["target_label"] or ds.target,
                    version=f"synthetic-v{synthetic.VERSION}-0-{json.dumps(kw, sort_keys=True)}")
    else:
        from abd_fast.data import BadDataError, open_source
        try:
            ev = open_source(cfg["eval_data"], classnames=cfg["classnames"])
            train = open_source(cfg["train_data"])
        except (BadDataError, ValueError, OSError) as e:
            raise UsageError(f"--train-data/--eval-data: {e}") from e
        if not ev.classnames:
            raise UsageError(f"--eval-data {cfg['eval_data']}: no class names; give "
                             "--classnames FILE (one name per line, in label order)")
        if train.captions is None:
            raise UsageError(f"--train-data {cfg['train_data']}: no captions found; give "
                             "image-caption pairs (CSV with image,caption columns or "
                             "WebDataset .jpg/.txt shards)")
        data = dict(train=str(cfg["train_data"]), eval=str(cfg["eval_data"]),
                    classnames=cfg["classnames"], names=list(ev.classnames),
                    target=cfg["target_label"], version=train.fingerprint)
    if data["target"] not in data["names"]:
        names = data["names"]
        raise UsageError(f"--target-label {data['target']!r} is not a class of the evaluation "
                         f"data ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    return data


# ---- the pipeline ----------------------------------------------------------------------------

def pipeline_command(args) -> int:
    cfg = _settings(args)
    data = _data(cfg)
    try:
        run_pipeline(cfg, data)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _plan(cfg) -> dict:
    """Stage names in run order with a rough relative cost (pretrain epoch = 1)."""
    q = cfg["quick"]
    plan = {"clean": 0.2 if cfg["pretrained"] else (2 if q else 10)}
    if "badclip" in cfg["attacks"]:
        plan["badclip-trigger"] = 1
    for a in cfg["attacks"]:
        plan[f"poison-{a}"] = 3
    for a in cfg["attacks"]:
        if "abd" in cfg["defenses"]:
            plan[f"uap-{a}"] = 2
        for d in cfg["defenses"]:
            plan[f"{a}-{d}"] = 2
    if not cfg["no_ablations"]:
        from abd_fast.defenses.ablation import planned_rows
        a = cfg["attacks"][0]
        for name in planned_rows(known=_known_rows(cfg, a),
                                 uap_bd_given="abd" in cfg["defenses"]):
            plan[f"ablation-{a}-{name}"] = 2
    plan["report"] = 1
    return plan


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


def run_pipeline(cfg: dict, data: dict) -> dict:
    from abd_fast.defenses.ablation import run_tables
    out = Path(cfg["output"])
    t_start = time.perf_counter()
    quick = cfg["quick"]
    common = ["--train-data", data["train"], "--eval-data", data["eval"], "--model",
              cfg["model"], "--seed", cfg["seed"]]
    if data["classnames"]:
        common += ["--classnames", data["classnames"]]
    for key in ("image_size", "loader", "workers"):
        if cfg[key] is not None:
            common += [f"--{key.replace('_', '-')}", cfg[key]]
    q = _flags(QUICK_OVERRIDES["common"]) if quick else []

    def extra(key):  # the config's stage-flags of a command or a `command:variant`
        return _flags(cfg["stage_flags"].get(key, {}))
    demo = DEMO_OVERRIDES if cfg["train_data"] is None else {}

    def flags(*keys):
        """The pipeline's flags of a stage: its own settings < --quick < the config's."""
        own = [f for k in keys for f in _flags({**demo.get(k, {}), **PIPELINE_FLAGS.get(k, {})})]
        return own + q + [f for k in keys for f in extra(k)]
    target = data["target"]
    plan = _plan(cfg)
    print(f"pipeline: {len(plan)} stages into {out} (attacks {', '.join(cfg['attacks'])}; "
          f"defenses {', '.join(cfg['defenses'])}; target {target!r}"
          + ("; --quick" if quick else "") + ")", flush=True)
    st = Stages(out, plan)
    notes = []

    # 1. the clean model
    if cfg["pretrained"]:
        st.run("clean", ["eval", *common, "--checkpoint", cfg["pretrained"]])
        clean_ckpt = cfg["pretrained"]
    else:
        argv = ["pretrain", *common, *q,
                *(_flags(QUICK_OVERRIDES["pretrain"]) if quick else []), *extra("pretrain")]
        key = clean_cache_key(argv, data["version"])
        cached = clean_cache_dir() / key

        def from_cache(d):
            for f in CLEAN_FILES:
                shutil.copy2(cached / f, d / f)
            print(f"  reusing the clean model trained before with the same settings and data: "
                  f"{cached}", flush=True)
        if not st.done("clean", argv, CLEAN_FILES) and (cached / "eval.json").exists():
            st.run("clean", argv, CLEAN_FILES, fn=from_cache)
            notes.append(f"The clean model was reused from the cache ({cached}); it was trained "
                         "by an earlier run with the same pretrain settings and data.")
        else:
            st.run("clean", argv, CLEAN_FILES)
            store_clean(out / "clean", key, argv)
        clean_ckpt = str(out / "clean" / "checkpoint.pt")

    # 2. the victims
    stage_flags = common + ["--target-label", target] + q
    patch = None
    if "badclip" in cfg["attacks"]:
        steps = QUICK_OVERRIDES["badclip-trigger"] if quick else {"steps": BADCLIP_STEPS}
        d = st.run("badclip-trigger", ["badclip-trigger", *common, "--target-label", target,
                                       "--pretrained", clean_ckpt, *_flags(steps),
                                       *extra("badclip-trigger")],
                   outputs=("badclip_patch.png",))
        patch = str(d / "badclip_patch.png")
    victims = {}
    # A config's own poison count or rate replaces POISON's (the stage takes exactly one).
    for a in cfg["attacks"]:
        trig = ["--trigger-file", patch] if a == "badclip" else []
        own = {**cfg["stage_flags"].get("poison", {}), **cfg["stage_flags"].get(f"poison:{a}", {})}
        poison_flags = [] if {"poison-count", "poison-rate"} & set(own) else _flags(POISON)
        d = st.run(f"poison-{a}", ["poison", *stage_flags, "--pretrained", clean_ckpt,
                                   "--attack", a, *poison_flags, *trig, *extra("poison"),
                                   *extra(f"poison:{a}")])
        victims[a] = str(d / "checkpoint.pt")

    # 3. UAP and defenses per victim
    uap_flags = flags("uap")
    results = {"clean": read_eval(out / "clean"), "attacks": {}}
    uaps = {}
    for a in cfg["attacks"]:
        results["attacks"][a] = {"victim": read_eval(out / f"poison-{a}")}
        if "abd" in cfg["defenses"]:
            d = st.run(f"uap-{a}", ["uap", *stage_flags, "--checkpoint", victims[a],
                                    "--reference-model", clean_ckpt, *uap_flags],
                       outputs=("uap.pt", "eval.json"))
            uaps[a] = str(d / "uap.pt")
        for m in cfg["defenses"]:
            uap_flag = ["--uap", uaps[a]] if m == "abd" else []
            d = st.run(f"{a}-{m}", ["defend", *stage_flags, "--checkpoint", victims[a],
                                    "--method", m, *uap_flag, *flags("defend", f"defend:{m}")])
            results["attacks"][a][m] = read_eval(d)

    # 4. ablations on the first attack, reusing the runs above
    tables = {"table2": None, "table3": None}
    if not cfg["no_ablations"]:
        a = cfg["attacks"][0]
        known = {m: results["attacks"][a][{"ft": "ft", "i_adv_t_eda": "abd"}[m]]
                 for m in ("ft", "i_adv_t_eda") if m in _known_rows(cfg, a)}
        if "abd" in cfg["defenses"]:
            known["uap_bd"] = results["attacks"][a]["abd"]
        tables = run_tables(st, attack=a, checkpoint=victims[a], reference_model=clean_ckpt,
                            common=stage_flags, uap_bd=uaps.get(a), known=known,
                            uap_flags=uap_flags, defend_flags=flags("defend", "defend:abd"),
                            prefix=f"ablation-{a}-")

    # 5. similarity analysis, embeddings, report
    report_stage = {}

    def analyse(d):
        report_stage.update(_analyse(cfg, data, out, victims, uaps, results))
    st.run("report", ["analysis"], outputs=(), fn=analyse, force=True)
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
    if cfg["stage_flags"]:
        notes.append(f"Per-stage flags of the config (last, so they override the above): "
                     f"{cfg['stage_flags']}.")
    if quick:
        notes.append("--quick: a smoke run on a small synthetic set with 1-2 epochs per stage; "
                     "its numbers are not meaningful.")
    timing = dict(st.timing)  # report.md adds their sum as the total
    wall = time.perf_counter() - t_start
    if st.skipped:
        notes.append(f"This invocation took {wall:.0f} s.")
    report = {
        "clean": results["clean"], "attacks": results["attacks"],
        "ablations": tables, "similarity": report_stage.get("similarity"),
        "timing": timing,
        "settings": {"recipe": cfg["recipe"], "model": cfg["model"],
                     "image_size": results["clean"].get("image_size"),
                     "train_data": data["train"], "eval_data": data["eval"],
                     "target_label": target, "attacks": cfg["attacks"],
                     "defenses": cfg["defenses"], "seed": cfg["seed"], "quick": quick,
                     "pretrained": cfg["pretrained"], "poison": POISON,
                     "demo_overrides": demo, "pipeline_flags": PIPELINE_FLAGS,
                     "stage_flags": cfg["stage_flags"],
                     **({"quick_overrides": QUICK_OVERRIDES} if quick else {})},
        "notes": notes,
    }
    from abd_fast.report import write_report
    paths = write_report(report, out, embeddings=report_stage.get("embeddings"))
    print(f"report: {paths['md']} and {paths['json']}; plots: "
          + ", ".join(str(p) for k, p in paths.items() if k not in ("md", "json") and p)
          + f" | {_fmt_s(wall)} in this invocation", flush=True)
    return report


def _analyse(cfg, data, out: Path, victims, uaps, results) -> dict:
    """Similarity analysis (ABD Fig. 2) on the first attack's victim with its UAP, and the
    clean/triggered image embeddings of the victim, FT and ABD for embedding.png."""
    import torch

    from abd_fast.attacks import make_trigger
    from abd_fast.data import build_loader
    from abd_fast.defenses.uap import UAP
    from abd_fast.engine import load_checkpoint
    from abd_fast.evaluate import similarity_analysis
    from abd_fast.models import create_model, get_tokenizer, image_features, image_spec
    from abd_fast.ops import normalize_images
    from abd_fast.train import _trigger_options
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
    trigger = make_trigger(a, image_size=spec.size, seed=run_cfg["seed"],
                           **_trigger_options(run_cfg))
    tok = get_tokenizer(cfg["model"])
    n_batches = QUICK_OVERRIDES["similarity_batches"] if cfg["quick"] else SIMILARITY_BATCHES
    captions = build_loader(data["train"], train=False, batch_size=250, image_size=spec.size,
                            loader=cfg["loader"], num_workers=cfg["workers"])
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
        clean, trig = [], []
        with torch.no_grad():  # every eval image: the listing is sorted by class
            for batch in evaluation:  # one forward pass over clean and triggered images
                x = torch.cat([normalize_images(batch.images, mean, std),
                               trigger.apply(batch.images, batch.ids, mean=mean, std=std)])
                clean_f, trig_f = image_features(model, x).chunk(2)
                clean.append(clean_f)
                trig.append(trig_f)
        clean, trig = torch.cat(clean), torch.cat(trig)
        keep = torch.linspace(0, len(clean) - 1, min(EMBEDDING_IMAGES, len(clean))).long()
        embeddings[labels[name]] = (clean[keep], trig[keep])
    return {"similarity": sim, "embeddings": embeddings}
