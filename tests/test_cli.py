"""The command line as a user runs it."""
import subprocess
import sys


def test_selfcheck_runs_and_agrees():
    proc = subprocess.run([sys.executable, "-m", "abd_fast.train", "selfcheck"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fused ops agree with the references" in proc.stdout
    assert proc.stdout.count("max |ours - reference|") == 4
