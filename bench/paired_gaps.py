"""ABD against each other defense, paired by run: for every attack, the ASR gap ABD − X of
each report.json given (a run = one data draw and one seed; both defenses on the same victim
and evaluation images), then their mean, sample std, how many runs are below / level /
above, and the exact two-sided sign-flip test of "mean gap = 0" (every ± assignment of the
gaps, no distribution assumed; with n runs the smallest possible p is 2 / 2^n;
abd_fast.report.paired_gaps, which a multi-seed report.md also shows per seed).

    .venv/bin/python bench/paired_gaps.py bench/results/seeds_jobs2/seed*.json \
        bench/results/data_draw1.json bench/results/data_draw1_seeds/seed*.json \
        bench/results/data_draw2.json bench/results/data_draw2_seeds/seed*.json \
        --out bench/results/paired_gaps.json

Two reports of the same data and seed are refused (the same run counted twice); a report
without the attack or a defense is left out of that row. CA gaps are given beside the ASR's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abd_fast.report import paired_gaps  # noqa: E402
from bench.common import table, write_json  # noqa: E402


def run_name(report: dict, path: str) -> str:
    settings = report.get("settings", {})
    data, seed = settings.get("train_data"), settings.get("seed")
    if data is None or seed is None:
        raise SystemExit(f"{path}: its settings lack train_data or seed: not a pipeline "
                         "report.json of one seed")
    return f"{Path(str(data).split('/train/')[0]).name} seed {seed}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", metavar="REPORT_JSON")
    ap.add_argument("--method", default="abd", help="the defense compared (default abd)")
    ap.add_argument("--out", help="write the gaps and their summary to this JSON file")
    args = ap.parse_args(argv)
    runs = {}
    for path in args.reports:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: cannot read a report.json ({e})")
        name = run_name(report, path)
        if name in runs:
            raise SystemExit(f"{path}: {name} was given already ({runs[name][0]}): each run once")
        runs[name] = (path, report)
    rows, result = [], {}
    attacks = dict.fromkeys(a for _, r in runs.values() for a in r.get("attacks", {}))
    for a in attacks:
        others = dict.fromkeys(d for _, r in runs.values() for d in r["attacks"].get(a, {})
                               if d not in ("victim", args.method))
        for other in others:
            per_run = {}
            for name, (_, r) in runs.items():
                row = r["attacks"].get(a, {})
                if any(row.get(d, {}).get("asr") is None for d in (args.method, other)):
                    continue
                per_run[name] = {k: round(row[args.method][m] - row[other][m], 4)
                                 for k, m in (("asr", "asr"), ("ca", "ca_top1"))}
            if not per_run:
                continue
            asr = paired_gaps([g["asr"] for g in per_run.values()])
            ca = paired_gaps([g["ca"] for g in per_run.values()])
            result.setdefault(a, {})[other] = {"runs": per_run, "asr": asr, "ca": ca}
            rows.append({"attack": a, "pair": f"{args.method} − {other}", "n": asr["n"],
                         "mean": f"{asr['mean']:+.2f}",
                         "std": "" if asr["std"] is None else f"{asr['std']:.2f}",
                         "signs": f"{asr['below']} / {asr['level']} / {asr['above']}",
                         "p": f"{asr['p_sign_flip']:.3f}", "ca": f"{ca['mean']:+.2f}",
                         "runs": ", ".join(f"{g['asr']:+.1f}" for g in per_run.values())})
    if not rows:
        raise SystemExit(f"no attack has both {args.method!r} and another defense in the reports")
    print(table(rows, [("attack", "attack"), ("pair", "ASR gap"), ("n", "runs"),
                       ("mean", "mean"), ("std", "std"), ("signs", "below / level / above"),
                       ("p", "p (sign flip)"), ("ca", "CA gap mean"), ("runs", "per run")]))
    print("runs: " + "; ".join(f"{n} ({p})" for n, (p, _) in runs.items()))
    if args.out:
        write_json(Path(args.out), {"method": args.method, "gaps": result,
                                    "reports": {n: p for n, (p, _) in runs.items()}})


if __name__ == "__main__":
    main()
