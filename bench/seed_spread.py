"""How far apart two training settings leave the defenses' CA and ASR, measured against the
seed-to-seed spread: every uap and defend stage of a finished demo run, re-run on the same
victims with seeds 0, 1, 2 (--seed; it reseeds the data order, EDA, augmentations and the
UAP generator) under each setting.

    flock /tmp/abd_cpu.lock .venv/bin/python bench/seed_spread.py --demo runs/demo \
        --output runs/spread                       # default vs fp32 (-> bench/results/seed_spread.json)

Settings (--settings, comma list): default (no flag: --precision auto and each loop's
compile default), fp32 (--precision fp32 --no-compile: the arithmetic before those flags),
bf16 (--precision bf16; on a CPU without native bf16 it is emulated and slow). The stages'
flags are the demo's own (each stage's stage.json), with --seed, the setting's flags and the
UAP of the same seed and setting substituted; a stage done before is skipped (Stages).
Reported per attack and defense: mean and sample standard deviation of CA and ASR over the
seeds per setting, and the difference of the means in units of the larger spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, machine, table, write_json  # noqa: E402

SETTINGS = {"default": [], "fp32": ["--precision", "fp32", "--no-compile"],
            "bf16": ["--precision", "bf16"]}


def _argv(demo: Path, stage: str) -> list[str]:
    meta = json.loads((demo / stage / "stage.json").read_text())
    if not meta.get("complete"):
        raise SystemExit(f"--demo {demo}: stage {stage} did not complete")
    return meta["argv"]


def _replace(argv: list[str], flag: str, value) -> list[str]:
    i = argv.index(flag)
    return argv[:i + 1] + [str(value)] + argv[i + 2:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a finished demo run (python -m abd_fast.train)")
    ap.add_argument("--output", required=True, help="directory of the re-runs")
    ap.add_argument("--settings", default="default,fp32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(ROOT / "bench/results/seed_spread.json"))
    args = ap.parse_args(argv)
    from abd_fast.cli.stages import Stages
    from abd_fast.evaluate import read_eval
    from abd_fast.train import main as run_command
    demo, out = Path(args.demo), Path(args.output)
    settings = [s.strip() for s in args.settings.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    defends = sorted(p.name for p in demo.iterdir()
                     if (p / "stage.json").exists() and _argv(demo, p.name)[0] == "defend"
                     and not p.name.startswith("ablation-"))
    attacks = sorted({d.split("-")[0] for d in defends})
    plan = {f"{s}-seed{k}-{st}": 1 for s in settings for k in seeds
            for st in [f"uap-{a}" for a in attacks] + defends}
    stages = Stages(out, plan, run_command)
    results = {}
    for s in settings:
        for k in seeds:
            uaps = {}
            for a in attacks:
                name = f"{s}-seed{k}-uap-{a}"
                d = stages.run(name, [*_replace(_argv(demo, f"uap-{a}"), "--seed", k),
                                      *SETTINGS[s]], outputs=("uap.pt", "eval.json"))
                uaps[a] = d / "uap.pt"
            for st in defends:
                a, method = st.split("-", 1)
                cmd = _replace(_argv(demo, st), "--seed", k)
                if "--uap" in cmd:
                    cmd = _replace(cmd, "--uap", uaps[a])
                d = stages.run(f"{s}-seed{k}-{st}", [*cmd, *SETTINGS[s]])
                ev = read_eval(d)
                results.setdefault(st, {}).setdefault(s, []).append(
                    {"seed": k, "ca": ev["ca_top1"], "asr": ev["asr"],
                     "seconds": stages.timing[f"{s}-seed{k}-{st}"]})
    rows = []
    for st, by in results.items():
        row = {"stage": st}
        for metric in ("ca", "asr"):
            spread = 0.0
            for s in settings:
                vals = [r[metric] for r in by[s]]
                mean = statistics.mean(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[f"{metric}_{s}"] = f"{mean:.1f} ± {sd:.1f}"
                row[f"_{metric}_{s}"] = (mean, sd)
                spread = max(spread, sd)
            if len(settings) >= 2:
                d = row[f"_{metric}_{settings[0]}"][0] - row[f"_{metric}_{settings[1]}"][0]
                row[f"{metric}_diff"] = f"{d:+.1f} ({abs(d) / spread:.1f} sd)" if spread \
                    else f"{d:+.1f}"
        rows.append(row)
    cols = [("stage", "stage")] + [(f"{m}_{s}", f"{m.upper()} {s}") for m in ("ca", "asr")
                                   for s in settings]
    if len(settings) >= 2:
        cols += [(f"{m}_diff", f"{m.upper()} {settings[0]} - {settings[1]}")
                 for m in ("ca", "asr")]
    print(table(rows, cols))
    write_json(Path(args.out), {"machine": machine(), "args": vars(args), "settings":
                                {s: SETTINGS[s] for s in settings}, "results": results})
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
