"""The scan's calibration and its measured table (docs/SCAN.md) from the files `scan` and
`scan-data` wrote: scan.json (model scans) and scan_data.json (data scans).

    .venv/bin/python bench/scan_table.py --clean s0=DIR s1=DIR ... --clean-finetunes ft0=DIR ...
        --judge badnet=DIR ...

Each mode's threshold is the largest score of its clean calibration models plus MARGIN:
--clean: clean models trained from scratch (their self-mode scores calibrate self mode; a
reference-mode score against another seed's model is shown, not used: reference mode assumes
the reference is the judged model's base). --clean-finetunes: clean models fine-tuned from the
reference they were scanned against (calibrate both modes). --judge: the models judged (their
scan.json's own threshold is ignored, the calibrated one applied). A DIR with a scan_data.json
adds the data scan's AUROC and precision at the poison count.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from abd_fast.scan.model import CALIBRATION_MARGIN as MARGIN, calibrated_threshold


def load(spec: str) -> tuple[str, dict, dict | None]:
    name, _, d = spec.partition("=")
    d = Path(d)
    scan = json.loads((d / "scan.json").read_text()) if (d / "scan.json").exists() else None
    data = json.loads((d / "scan_data.json").read_text()) if (d / "scan_data.json").exists() \
        else None
    return name, scan, data


def modes(scan: dict) -> dict:
    """{mode: (score, most anomalous class, geometry)} of one scan.json (a reference scan also
    carries its self-mode score)."""
    out = {scan["mode"]: (scan["score"], scan["most_anomalous_class"], scan["geometry"])}
    if "self" in scan:
        s = scan["self"]
        out["self"] = (s["score"], s["most_anomalous_class"], s["geometry"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", nargs="+", default=[], metavar="NAME=DIR")
    ap.add_argument("--clean-finetunes", nargs="+", default=[], metavar="NAME=DIR")
    ap.add_argument("--judge", nargs="+", default=[], metavar="NAME=DIR")
    args = ap.parse_args()
    clean = [load(s) for s in args.clean]
    finetunes = [load(s) for s in args.clean_finetunes]
    judged = [load(s) for s in args.judge]
    scores = {}
    for rows, used in ((clean, ("self",)), (finetunes, ("self", "reference"))):
        for _, scan, _ in rows:
            for mode, (score, _, _) in modes(scan).items():
                if mode in used:
                    scores.setdefault(mode, []).append(score)
    thresholds = {mode: calibrated_threshold(v) for mode, v in scores.items()}
    print("calibrated thresholds (largest clean score + %.1f): %s" % (
        MARGIN, {m: round(t, 2) for m, t in thresholds.items()}))
    print()
    print("| model | role | mode | score | threshold | verdict | most anomalous class (geometry)"
          " | seconds | data AUROC | precision at poison count |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for role, rows in (("clean", clean), ("clean fine-tune", finetunes), ("judged", judged)):
        for name, scan, data in rows:
            d = ("%.3f" % data["auroc"], "%.3f" % data["precision_at_poison_count"]) \
                if data and "auroc" in data else ("-", "-")
            if scan is None:
                print(f"| {name} | {role} | - | - | - | - | - | - | {d[0]} | {d[1]} |")
                continue
            for mode, (score, cls, geometry) in sorted(modes(scan).items()):
                t = thresholds.get(mode)
                verdict = "-" if t is None else ("BACKDOORED" if score > t else "clean")
                print(f"| {name} | {role} | {mode} | {score:.2f} | "
                      f"{'-' if t is None else f'{t:.2f}'} | {verdict} | {cls} ({geometry}) | "
                      f"{scan.get('seconds', 0):.0f} | {d[0]} | {d[1]} |")


if __name__ == "__main__":
    main()
