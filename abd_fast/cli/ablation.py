"""ABD's ablations (Table II and Table III), each one command:

    python -m abd_fast.train ablation --table 2 --checkpoint VICTIM [--uap FILE] \
        [--reference-model CLEAN] --output DIR [common flags]

Table II rows (views of ABD's fine-tuning), each a `defend` run on the victim:
  ft           --method ft                      MMCL on clean data
  i_adv        --method abd --no-eda            + the UAP image view I_adv
  t_eda        --method abd --no-adv            + the EDA caption view T_eda
  i_adv_t_eda  --method abd                     both (ABD)
Table III rows (the UAP's backdoor loss L_bd), each `uap` then `defend --method abd`:
  uap          uap --no-backdoor-loss           AdvCLIP's UAP
  uap_bd       uap (with L_bd)                  ABD's UAP
Sub-runs go to DIR/<row>/ (UAPs to DIR/uap-file/ and DIR/uap-bd-file/, unless --uap gives
ABD's UAP); each is skipped on a re-run when done with the same flags. Writes DIR/table<N>.json
({"attack", "rows": {row: eval result}}, report.json's ablation schema) and DIR/table<N>.md.
Common flags (data, model, batch size, epochs, lr, ...) go to every sub-run; --max-samples and
defend's budget and view flags (--budget, --budget-ratio, --budget-steps, --adv-view) to the
defend runs only. Without them each sub-run uses its command's defaults; the pipeline's
ablation rows run with `--budget paper --adv-view autoaugment`, which those flags reproduce.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import UsageError, check_output, check_path, common_parser, own_settings
from .defend import budget_and_view_flags
from .stages import Stages, StageError

NAME = "ablation"
PASS_FLAGS = ("train_data", "eval_data", "classnames", "target_label", "model", "image_size",
              "batch_size", "epochs", "lr", "warmup", "seed", "loader", "workers",
              "checkpoint_every", "csv_img_key", "csv_caption_key", "csv_separator", "non_rgb")
DEFEND_FLAGS = ("max_samples", "budget", "budget_ratio", "budget_steps", "adv_view")


def add_parser(subparsers):
    p = subparsers.add_parser(NAME, parents=[common_parser()],
                              argument_default=argparse.SUPPRESS,
                              help="ABD's Table II (views) or Table III (backdoor loss) on a "
                                   "victim, one defend/uap run per row",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", type=int, choices=[2, 3], help="2: FT, +I_adv, +T_eda, both; "
                   "3: UAP vs UAP + L_bd")
    p.add_argument("--checkpoint", metavar="FILE", help="the victim (poison stage output)")
    p.add_argument("--uap", metavar="FILE", help="ABD's UAP for the victim (uap.pt); default: "
                   "trained here")
    p.add_argument("--reference-model", metavar="FILE",
                   help="the clean model, for the backdoor loss of the UAPs trained here")
    # For the defend rows; the pipeline's rows run --budget paper --adv-view autoaugment.
    budget_and_view_flags(p)
    return p


def _settings(args, parser) -> tuple[dict, str]:
    """The command's settings, checked, and the victim's attack (from its checkpoint)."""
    cfg = own_settings(args, parser, {})
    if cfg.get("table") is None:
        raise UsageError("--table is needed: 2 (ABD's views) or 3 (UAP vs UAP + L_bd)")
    if cfg.get("checkpoint") is None:
        raise UsageError("--checkpoint is needed: the victim's checkpoint.pt (poison stage)")
    if cfg.get("output") is None:
        raise UsageError("--output is needed: the directory for the rows and the table")
    for key in ("checkpoint", "uap", "reference_model"):
        check_path(cfg, key, "file")
    from abd_fast.engine import CheckpointError, load_checkpoint
    try:
        attack = load_checkpoint(cfg["checkpoint"], "--checkpoint").get("config", {}) \
            .get("attack")
    except CheckpointError as e:
        raise UsageError(str(e)) from e
    if attack is None:
        raise UsageError(f"--checkpoint {cfg['checkpoint']}: not a poisoned model's "
                         "checkpoint (its run has no --attack); give the poison stage's "
                         "checkpoint.pt")
    check_output(cfg)
    return cfg, attack


def _write_table(key: str, table: dict, timing: dict, out: Path):
    """OUTPUT/tableN.json (report.json's ablation schema, validated) and tableN.md."""
    from abd_fast.defenses.ablation import table_markdown
    from abd_fast.engine import atomic_write_text
    from abd_fast.report import validate_report
    validate_report({"clean": None, "attacks": {}, "ablations": {"table2": None, "table3": None,
                                                                  key: table},
                     "similarity": None, "timing": timing, "settings": {}, "notes": []})
    atomic_write_text(json.dumps(table, indent=1) + "\n", out / f"{key}.json")
    md = table_markdown(key, table)
    atomic_write_text(md + "\n", out / f"{key}.md")
    print(md)
    print(f"-> {out / (key + '.json')}, {out / (key + '.md')}", flush=True)


def _argv(cfg: dict, keys) -> list[str]:
    """`--key value` for each of keys set in cfg."""
    return [f for key in keys if cfg.get(key) is not None
            for f in (f"--{key.replace('_', '-')}", str(cfg[key]))]


def run(args, parser, run_command) -> int:
    from abd_fast.defenses.ablation import planned_rows, run_tables
    cfg, attack = _settings(args, parser)
    common = _argv(cfg, PASS_FLAGS)
    if cfg.get("precision") is not None:
        common += ["--precision", cfg["precision"]]
    if cfg.get("compile") is not None:
        common.append("--compile" if cfg["compile"] else "--no-compile")
    table = cfg["table"]
    out = Path(cfg["output"])
    rows = planned_rows((table,), uap_bd_given=cfg.get("uap") is not None)
    stages = Stages(out, {r: 1 for r in rows}, run_command)
    try:
        # The fine-tuning data and budget are the defend runs', not the UAP's.
        tables = run_tables(stages, attack=attack, checkpoint=cfg["checkpoint"], common=common,
                            reference_model=cfg.get("reference_model"), uap_bd=cfg.get("uap"),
                            tables=(table,), defend_flags=_argv(cfg, DEFEND_FLAGS))
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    key = f"table{table}"
    _write_table(key, tables[key], stages.timing, out)
    return 0
