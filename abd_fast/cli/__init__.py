"""The command line of abd_fast, one module per command over the library (which never imports
this package). `python -m abd_fast.train` (abd_fast/train.py) dispatches to them.

A command module has NAME (the command's name), add_parser(subparsers) and run(...); the
dispatcher calls run by the command's kind:
  stage commands (pretrain, poison, eval, uap, uap-select, defend, scan, scan-data)
      DEFAULTS, check(cfg), run(cfg):
      settings resolved and validated by the dispatcher (common.resolve_config, validate)
  tools (selfcheck, show-triggers, export-poison, badclip-trigger)  run(args)
  jobs (pipeline, ablation)  run(args, parser, run_command): resolve their own settings and
      run other commands in-process through run_command (the dispatcher's main)
common.py holds the common flags, config files, validation and the run set-up (Run);
stages.py the resumable stage runner the jobs share. Adding a command: its module, and one
line in abd_fast/train.py. open_clip_train.py is the other entry point's (python -m
abd_fast.open_clip_train: open_clip's own trainer with our ClipLoss).
"""
