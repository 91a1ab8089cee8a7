"""ClipLoss under torchrun: 2 gloo processes, every local_loss / gather_with_grad mode."""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_clip_loss_matches_open_clip_two_processes():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "dist_clip_loss_worker.py")],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" OK ") == 8, proc.stdout  # 2 ranks x 4 modes
