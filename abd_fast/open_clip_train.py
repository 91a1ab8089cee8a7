"""`python -m abd_fast.open_clip_train <open_clip_train flags>`: open_clip's own trainer with
abd_fast's fused ClipLoss (abd_fast/cli/open_clip_train.py)."""
import sys

from abd_fast.cli.open_clip_train import main

if __name__ == "__main__":
    sys.exit(main())
