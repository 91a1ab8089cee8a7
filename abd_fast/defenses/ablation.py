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
Common flags (data, model, batch size, epochs, lr, ...) go to every sub-run (--max-samples to
the defend runs only); without them each sub-run uses its command's defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TABLE2 = {  # row -> defend flags (the UAP flag is added for rows with the adversarial view)
    "ft": ["--method", "ft"],
    "i_adv": ["--method", "abd", "--no-eda"],
    "t_eda": ["--method", "abd", "--no-adv"],
    "i_adv_t_eda": ["--method", "abd"],
}
TABLE3 = {"uap": ["--no-backdoor-loss"], "uap_bd": []}  # row -> uap flags
UAP_DIRS = {"uap": "uap-file", "uap_bd": "uap-bd-file"}


def planned_rows(tables=(2, 3), known=(), uap_bd_given: bool = True) -> list[str]:
    """Names of the sub-runs run_tables will run, given the rows already `known` (and
    "uap_bd_file" when ABD's UAP exists)."""
    known = set(known) | ({"uap_bd_file"} if uap_bd_given else set())
    out = []
    needs_bd = (2 in tables and ({"i_adv", "i_adv_t_eda"} - known)) or \
        (3 in tables and "uap_bd" not in known and "i_adv_t_eda" not in known)
    if needs_bd and "uap_bd_file" not in known:
        out.append(UAP_DIRS["uap_bd"])
    if 2 in tables:
        out += [r for r in TABLE2 if r not in known]
    if 3 in tables:
        out += [UAP_DIRS["uap"], "uap"]
        if "uap_bd" not in known and "i_adv_t_eda" not in known:
            out.append("uap_bd")
    return out


def run_tables(stages, *, attack: str, checkpoint, common: list, reference_model=None,
               uap_bd=None, known: dict | None = None, tables=(2, 3), uap_flags=(),
               defend_flags=(), prefix: str = "") -> dict:
    """Runs the missing rows of Table II/III through `stages` (abd_fast.pipeline.Stages) and
    returns {"table2": {"attack", "rows"} | None, "table3": ... | None}.

    known: rows already computed elsewhere {row: eval result} (e.g. the pipeline's FT and ABD
    runs: "ft", "i_adv_t_eda", "uap_bd"); uap_bd: ABD's UAP file, else it is trained here.
    common: flags of every sub-run; uap_flags / defend_flags: of the uap / defend runs."""
    from abd_fast.pipeline import read_eval
    known = dict(known or {})
    ref = ["--reference-model", reference_model] if reference_model else []
    victim = ["--checkpoint", checkpoint]
    rows2, rows3 = {}, {}

    files = {"uap_bd": uap_bd} if uap_bd is not None else {}

    def uap_file(row):
        if row in files:
            return files[row]
        d = stages.run(prefix + UAP_DIRS[row], ["uap", *common, *victim, *ref, *TABLE3[row],
                                                *uap_flags], outputs=("uap.pt", "eval.json"))
        files[row] = str(d / "uap.pt")
        return files[row]

    def defend(row, flags, uap=None):
        argv = ["defend", *common, *victim, *flags, *(["--uap", uap] if uap else []),
                *defend_flags]
        return read_eval(stages.run(prefix + row, argv))

    if 2 in tables:
        for row, flags in TABLE2.items():
            if row in known:
                rows2[row] = known[row]
            else:
                uap = uap_file("uap_bd") if "--no-adv" not in flags else None
                rows2[row] = defend(row, flags, uap)
        known.setdefault("i_adv_t_eda", rows2["i_adv_t_eda"])
    if 3 in tables:
        rows3["uap"] = defend("uap", TABLE2["i_adv_t_eda"], uap_file("uap"))
        rows3["uap_bd"] = known.get("uap_bd") or known.get("i_adv_t_eda") or defend(
            "uap_bd", TABLE2["i_adv_t_eda"], uap_file("uap_bd"))
    return {"table2": {"attack": attack, "rows": rows2} if 2 in tables else None,
            "table3": {"attack": attack, "rows": rows3} if 3 in tables else None}


def table_markdown(key: str, table: dict) -> str:
    from abd_fast.report import TABLE2_ROWS, TABLE3_ROWS, _fmt, _table
    names = TABLE2_ROWS if key == "table2" else TABLE3_ROWS
    rows = [[label, _fmt(table["rows"][r].get("ca_top1")), _fmt(table["rows"][r].get("asr"))]
            for r, label in names.items() if r in table["rows"]]
    title = ("Table II: ABD's views" if key == "table2" else
             "Table III: UAP vs UAP + backdoor loss L_bd")
    return "\n".join([f"# {title} ({table['attack']} victim)", "",
                      *_table(["setting", "CA top-1 (%)", "ASR (%)"], rows)])


# ---- the `ablation` command ----------------------------------------------------------------

PASS_FLAGS = ("train_data", "eval_data", "classnames", "target_label", "model", "image_size",
              "batch_size", "epochs", "lr", "warmup", "seed", "loader", "workers",
              "checkpoint_every")


def add_command(subparsers, common_parent):
    p = subparsers.add_parser("ablation", parents=[common_parent],
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
    p.set_defaults(func=ablation_command, own_config=True, _parser=p)


def ablation_command(args) -> int:
    from abd_fast.pipeline import Stages, StageError, own_settings
    from abd_fast.train import UsageError, _check_output, _check_path
    cfg = own_settings(args, {})
    if cfg.get("table") is None:
        raise UsageError("--table is needed: 2 (ABD's views) or 3 (UAP vs UAP + L_bd)")
    if cfg.get("checkpoint") is None:
        raise UsageError("--checkpoint is needed: the victim's checkpoint.pt (poison stage)")
    if cfg.get("output") is None:
        raise UsageError("--output is needed: the directory for the rows and the table")
    for key in ("checkpoint", "uap", "reference_model"):
        _check_path(cfg, key, "file")
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
    _check_output(cfg)
    common = []
    for key in PASS_FLAGS:
        if cfg.get(key) is not None:
            common += [f"--{key.replace('_', '-')}", str(cfg[key])]
    if cfg.get("compile"):
        common.append("--compile")
    table = cfg["table"]
    out = Path(cfg["output"])
    rows = planned_rows((table,), uap_bd_given=cfg.get("uap") is not None)
    stages = Stages(out, {r: 1 for r in rows})
    try:
        # --max-samples limits the fine-tuning data (the defend runs), not the UAP's.
        subset = ["--max-samples", str(cfg["max_samples"])] if cfg.get("max_samples") else []
        tables = run_tables(stages, attack=attack, checkpoint=cfg["checkpoint"], common=common,
                            reference_model=cfg.get("reference_model"), uap_bd=cfg.get("uap"),
                            tables=(table,), defend_flags=subset)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    key = f"table{table}"
    from abd_fast.engine import atomic_write_text
    from abd_fast.report import validate_report
    validate_report({"clean": None, "attacks": {}, "ablations": {"table2": None, "table3": None,
                                                                  key: tables[key]},
                     "similarity": None, "timing": stages.timing, "settings": {}, "notes": []})
    atomic_write_text(json.dumps(tables[key], indent=1) + "\n", out / f"{key}.json")
    md = table_markdown(key, tables[key])
    atomic_write_text(md + "\n", out / f"{key}.md")
    print(md)
    print(f"-> {out / (key + '.json')}, {out / (key + '.md')}", flush=True)
    return 0
