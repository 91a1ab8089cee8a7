"""ABD's ablations (Table II and Table III): which runs make each row, and the tables.

Table II's rows are views of ABD's fine-tuning (TABLE2: FT, + the UAP image view I_adv,
+ the EDA caption view T_eda, both), each a `defend` run on the victim; Table III's compare
the UAP with and without the backdoor loss L_bd (TABLE3), each a `uap` run and then
`defend --method abd` with that UAP. run_tables runs the rows' commands through a stage
runner (the command line's abd_fast.cli.stages.Stages), reusing rows already known; the
`ablation` command (abd_fast/cli/ablation.py, whose --help lists the rows) and the pipeline
call it.
"""
from __future__ import annotations

from abd_fast.evaluate import read_eval
from abd_fast.report import TABLE2_ROWS, TABLE3_ROWS, format_number, markdown_table

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
        if not ({"uap_bd", "i_adv_t_eda"} & known) and 2 not in tables:
            out.append("uap_bd")  # else Table II's ABD row is this one
    return out


def run_tables(stages, *, attack: str, checkpoint, common: list, reference_model=None,
               uap_bd=None, known: dict | None = None, tables=(2, 3), uap_flags=(),
               defend_flags=(), prefix: str = "") -> dict:
    """Runs the missing rows of Table II/III through `stages` (abd_fast.cli.stages.Stages:
    stages.run(name, argv, outputs) runs a command into a directory) and
    returns {"table2": {"attack", "rows"} | None, "table3": ... | None}.

    known: rows already computed elsewhere {row: eval result} (e.g. the pipeline's FT and ABD
    runs: "ft", "i_adv_t_eda", "uap_bd"); uap_bd: ABD's UAP file, else it is trained here.
    common: flags of every sub-run; uap_flags / defend_flags: of the uap / defend runs.
    The rows run through stages.parallel: side by side when the runner has more than one job
    slot (pipeline --jobs), once the UAP files they share exist."""
    known = known or {}
    ref = ["--reference-model", reference_model] if reference_model else []
    victim = ["--checkpoint", checkpoint]

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

    missing2 = [r for r in TABLE2 if r not in known] if 2 in tables else []
    # Table III's "UAP + L_bd" row is ABD with ABD's UAP: Table II's last row when it has one
    bd_row = known.get("uap_bd") or known.get("i_adv_t_eda")
    own_bd = 3 in tables and bd_row is None and "i_adv_t_eda" not in missing2
    if any("--no-adv" not in TABLE2[r] for r in missing2) or own_bd:
        uap_file("uap_bd")  # first: the rows below that use it then run side by side
    # row -> (its defend flags, the row whose UAP file it trains with)
    todo = {r: (TABLE2[r], None if "--no-adv" in TABLE2[r] else "uap_bd") for r in missing2}
    if 3 in tables:
        todo["uap"] = (TABLE2["i_adv_t_eda"], "uap")
        if own_bd:
            todo["uap_bd"] = (TABLE2["i_adv_t_eda"], "uap_bd")
    ran = dict(zip(todo, stages.parallel(
        lambda r: defend(r, todo[r][0], todo[r][1] and uap_file(todo[r][1])), todo)))
    rows2 = {r: known[r] if r in known else ran[r] for r in TABLE2} if 2 in tables else {}
    return {"table2": {"attack": attack, "rows": rows2} if 2 in tables else None,
            "table3": {"attack": attack, "rows": {
                "uap": ran["uap"],
                "uap_bd": bd_row or ran.get("uap_bd") or rows2["i_adv_t_eda"]}}
            if 3 in tables else None}


def table_markdown(key: str, table: dict) -> str:
    """Markdown of one table ("table2" / "table3") as the ablation command prints it."""
    names = TABLE2_ROWS if key == "table2" else TABLE3_ROWS
    rows = [[label, format_number(table["rows"][r].get("ca_top1")),
             format_number(table["rows"][r].get("asr"))]
            for r, label in names.items() if r in table["rows"]]
    title = ("Table II: ABD's views" if key == "table2" else
             "Table III: UAP vs UAP + backdoor loss L_bd")
    return "\n".join([f"# {title} ({table['attack']} victim)", "",
                      *markdown_table(["setting", "CA top-1 (%)", "ASR (%)"], rows)])
