"""How many clean fine-tunes `pipeline --scan-threshold calibrate` needs (docs/SCAN.md):
from N clean fine-tunes scanned against their base (scan.json of each `calib-scan` stage), for
every k and every k-subset, the threshold the pipeline would set from those k
(abd_fast.scan.model.calibrated_threshold) and

- false positives: the share of the other N - k fine-tunes scoring above it (a clean model
  flagged), averaged over the subsets, and the worst subset's; with --applied-to, the same
  fine-tunes' scans on another split (the pipeline calibrates on val and also applies the
  threshold to the victims' scans on eval), the others' scores there;
- each judged model's detection: the share of the subsets whose threshold it is above.

    .venv/bin/python bench/calibration_size.py --clean-finetunes runs/demo/calib-scan{1..10} \
        --judge badnet=runs/demo/uap-badnet-random-differential-steer/val_scan.json ... \
        [--applied-to runs/demo/calib-evalscan{1..10}] --out bench/results/calibration_size.json

A --judge file is a scan.json or a val_scan.json (its "result"); only its score is read, and the
threshold it was scanned with is ignored.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from abd_fast.scan.model import calibrated_threshold  # noqa: E402
from bench.common import table, write_json  # noqa: E402


def score(path: Path) -> float:
    try:
        d = json.loads(path.read_text())
        return float(d.get("result", d)["score"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"{path}: not a scan.json or val_scan.json with a score ({e!r})")


def sizes(clean: list[float], judged: dict[str, float], max_k: int,
          applied: list[float] | None = None) -> list[dict]:
    """applied: the same fine-tunes' scores on the split the threshold is applied to (default:
    the calibration's own)."""
    applied = clean if applied is None else applied
    rows = []
    for k in range(1, min(max_k, len(clean) - 1) + 1):
        fp, flagged = [], {name: 0 for name in judged}
        subsets = list(itertools.combinations(range(len(clean)), k))
        for subset in subsets:
            t = calibrated_threshold([clean[i] for i in subset])
            rest = [s for i, s in enumerate(applied) if i not in subset]
            fp.append(sum(s > t for s in rest) / len(rest))
            for name, s in judged.items():
                flagged[name] += s > t
        rows.append({"k": k, "subsets": len(subsets), "fp_mean": 100 * sum(fp) / len(fp),
                     "fp_max": 100 * max(fp),
                     **{f"flagged_{n}": 100 * c / len(subsets) for n, c in flagged.items()}})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clean-finetunes", nargs="+", type=Path, required=True,
                   help="directories holding the scan.json of a clean fine-tune")
    p.add_argument("--judge", nargs="*", default=[], metavar="NAME=FILE",
                   help="scan.json or val_scan.json of a model judged")
    p.add_argument("--applied-to", nargs="+", type=Path,
                   help="the same fine-tunes (same order) scanned on the split the threshold "
                        "is applied to: their scores count the false positives")
    p.add_argument("--max-k", type=int, default=4)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    clean = [score(d / "scan.json") for d in a.clean_finetunes]
    judged = {}
    for spec in a.judge:
        name, sep, f = spec.partition("=")
        if not sep:
            p.error(f"--judge {spec}: expected NAME=FILE")
        judged[name] = score(Path(f))
    applied = None
    if a.applied_to:
        if len(a.applied_to) != len(clean):
            p.error(f"--applied-to: {len(a.applied_to)} directories for {len(clean)} "
                    "--clean-finetunes; give the same fine-tunes in the same order")
        applied = [score(d / "scan.json") for d in a.applied_to]
    rows = sizes(clean, judged, a.max_k, applied)
    print("clean fine-tunes' scores:", ", ".join(f"{s:.2f}" for s in clean))
    if applied:
        print("the same, where applied:", ", ".join(f"{s:.2f}" for s in applied))
    print("judged:", ", ".join(f"{n} {s:.2f}" for n, s in judged.items()))
    print(table(rows, [("k", "k"), ("subsets", "subsets"), ("fp_mean", "FP % (mean)"),
                       ("fp_max", "FP % (worst subset)"),
                       *[(f"flagged_{n}", f"{n} flagged %") for n in judged]]))
    if a.out:
        write_json(a.out, {"clean_finetunes": {str(d): s for d, s in
                                               zip(a.clean_finetunes, clean)},
                           "applied_to": applied and {str(d): s for d, s in
                                                      zip(a.applied_to, applied)},
                           "judged": judged, "rows": rows})


if __name__ == "__main__":
    main()
