"""ABD's UAP choice at other reference-scan thresholds, from the selection.json files that
`uap-select --criterion scan` wrote (they record the validation scan's score and most
anomalous class and every candidate's per-class capture gain): at threshold T the choice is
the candidate with the largest gain on the scan's class when the score exceeds T, else the
one with the largest gain on any class (the first of equals), as `uap-select --scan-threshold
T` chooses (abd_fast.cli.uap_select.flagged_at). No model is run: the recorded gains are
rounded to 0.01, so a tie closer than that could go the other way.

    .venv/bin/python bench/uap_reselect.py runs/demo runs/data3 ... --thresholds 2.7,3.2,10

Prints per run directory and attack (every uap-<attack>/selection.json in it) the val-scan
score, the recorded choice and the choice at each threshold; --out writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abd_fast.cli.uap_select import flagged_at  # noqa: E402
from abd_fast.defenses.select import choose  # noqa: E402
from bench.common import write_json  # noqa: E402


def choice_at(selection: dict, threshold: float) -> str:
    """The candidate uap-select --criterion scan chooses at `threshold`: its score is the
    recorded gain on the scan's class (defenses.select.score_uaps), chosen by select.choose."""
    focus = flagged_at(selection["scan"], threshold)["suspected_target"]
    return choose([{**c, "score": c["gain"][focus] if focus is not None
                    else max(c["gain"].values())} for c in selection["candidates"]])["name"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (pipeline outputs)")
    ap.add_argument("--thresholds", default="2.7", help="comma list of thresholds")
    ap.add_argument("--out", help="JSON file for the table")
    args = ap.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = []
    for run in args.runs:
        files = sorted(Path(run).glob("uap-*/selection.json"))
        if not files:
            sys.exit(f"{run}: no uap-<attack>/selection.json in it")
        for f in files:
            sel = json.loads(f.read_text())
            if "scan" not in sel:
                sys.exit(f"{f}: not a --criterion scan selection (no scan recorded)")
            rows.append({"run": run, "stage": f.parent.name, "val_scan": sel["scan"]["score"],
                         "recorded": sel["chosen"],
                         "at": {str(t): choice_at(sel, t) for t in thresholds}})
    for r in rows:
        changed = [t for t, c in r["at"].items() if c != r["recorded"]]
        print(f"{r['run']} {r['stage']}: val scan {r['val_scan']:.2f}, recorded "
              f"{r['recorded']}" + "".join(f"; at {t}: {r['at'][t]}" for t in changed)
              + ("" if changed else "; the same at every threshold"))
    if args.out:
        write_json(Path(args.out), {"thresholds": thresholds, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
