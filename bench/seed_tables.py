"""Table I-III as mean ± std over per-seed reports written by separate invocations (the
report.json of `pipeline --seed k`, or of each `pipeline --seeds ...` run's seed<k>/), e.g.
when a multi-seed run was stopped part-way or its seeds ran on different days:

    .venv/bin/python bench/seed_tables.py runs/seeds/seed0/report.json \
        runs/seeds/seed1/report.json --output runs/seeds-01

Writes OUTPUT/report.json and report.md exactly as `pipeline --seeds` aggregates
(abd_fast.report.aggregate_seeds); the first report's clean model, attacks and defenses set
the table (a row some seed lacks is left empty).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abd_fast.report import aggregate_seeds, write_report  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", metavar="REPORT_JSON")
    ap.add_argument("--output", required=True, metavar="DIR")
    args = ap.parse_args()
    reports = {}
    for path in args.reports:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: cannot read a report.json ({e})")
        seed = r.get("settings", {}).get("seed")
        if seed is None or seed in reports:
            raise SystemExit(f"{path}: its settings.seed is {seed!r}: expected one seed per "
                             "report, each seed once")
        reports[seed] = r
    report = aggregate_seeds(reports, notes=[f"Aggregated by bench/seed_tables.py from "
                                             f"{', '.join(args.reports)}."])
    paths = write_report(report, args.output)
    print(f"mean ± std over seeds {', '.join(map(str, reports))}: {paths['md']}")


if __name__ == "__main__":
    main()
