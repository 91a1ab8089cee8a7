"""Command line of abd_fast: python -m abd_fast.train COMMAND [flags].

Commands (no command: `pipeline` on the embedded demo data into runs/demo):
  pipeline   the whole job: clean model -> victims -> UAP -> defenses -> ablations -> report
  ablation   ABD's Table II (--table 2) or Table III (--table 3) on a victim
  pretrain   train a CLIP on caption data, from scratch or from --pretrained weights (the
             clean model); without --train-data, on the embedded synthetic dataset
  poison     fine-tune a CLIP on clean + poisoned caption data with MMCL (plant a backdoor)
  eval       zero-shot CA top-1/top-5, ASR and the clean/triggered embedding distance
  uap        train ABD's universal adversarial perturbation against a poisoned model
  uap-select choose among candidate UAPs on the validation split (no target, no trigger)
  defend     fine-tune a poisoned model with ft, cleanclip, roclip or abd
  scan       is a CLIP backdoored, toward which class? (no target, no trigger needed)
  scan-data  rank the training pairs by how likely they are poisoned (--drop-top K: clean)
  selfcheck  check the fused ops against their PyTorch references

Every stage takes the common flags (--help of a command lists them) and --config FILE, a
YAML mapping of flag names to values (`batch-size: 64`); flags given on the command line
override the file. Runs under torchrun for DDP (gloo on CPU, nccl on GPU):
    torchrun --nproc_per_node 2 -m abd_fast.train poison ...
Stages write to --output: checkpoint.pt (resume with --resume), metrics.jsonl, eval.json.
"""
from __future__ import annotations

import argparse
import os
import sys

# Large CPU batches: transparent huge pages cut page-fault time of fresh tensors 4x.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network

# The commands (abd_fast/cli/, one module each; see abd_fast/cli/__init__.py for their kinds).
from abd_fast.cli import (ablation, badclip_trigger, defend, eval, export_poison,  # noqa: E402
                          pipeline, poison, pretrain, scan, scan_data, selfcheck,
                          show_triggers, uap, uap_select)
from abd_fast.cli.common import (COMMON_DEFAULTS, Parser, UsageError,  # noqa: E402
                                 resolve_config, validate)

STAGES = (pretrain, poison, eval, uap, uap_select, defend, scan, scan_data)
TOOLS = (selfcheck, show_triggers, export_poison, badclip_trigger)
JOBS = (pipeline, ablation)
COMMANDS = {m.NAME: m for m in STAGES + TOOLS + JOBS}
STAGE_DEFAULTS = {m.NAME: m.DEFAULTS for m in STAGES}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m abd_fast.train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", parser_class=Parser)
    ap.stages = sub.choices  # command -> its parser (config files are checked by it)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0].startswith("--") and argv[0] != "--help":
        argv = ["pipeline", *argv]  # flags without a command: the pipeline's (README)
    try:
        args = ap.parse_args(argv)
        if args.command is None:  # the README's main command: the whole demo
            args = ap.parse_args(["pipeline"])
        command = COMMANDS[args.command]
        if command in JOBS:  # pipeline, ablation: resolve their settings, run other commands
            return command.run(args, ap.stages[args.command], main)
        if command in TOOLS:
            for key, value in COMMON_DEFAULTS.items():
                if not hasattr(args, key):
                    setattr(args, key, value)
            return command.run(args)
        cfg = resolve_config(args, ap.stages[args.command])
        validate(cfg, command.check)
        try:
            return command.run(cfg)
        finally:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from abd_fast.data import BadDataError
        from abd_fast.engine import CheckpointError, CheckpointWriteError, NonFiniteLossError
        if isinstance(e, (NonFiniteLossError, CheckpointError, CheckpointWriteError, BadDataError,
                          FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
