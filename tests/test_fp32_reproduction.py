"""`--precision fp32 --no-compile` reproduces the training commands' results from before
--precision and --compile existed, bit for bit: losses of every step, CA, ASR and the
embedding distance of pretrain, poison and defend with each method (tests/fp32_reproduction.py).
The expectation is computed by the code of that time, commit 258c670: stored in
tests/data/fp32_reproduction.json per kind of machine (fp32 rounding depends on the CPU's
vector units, the thread count and torch's version), or, on a kind of machine not stored
there, computed in this test by running that commit's code from the checkout's git history
(with this build's extension) in a subprocess."""
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fp32_reproduction import COMMIT, machine_key, run

EXPECTED = Path(__file__).parent / "data" / "fp32_reproduction.json"
ROOT = Path(__file__).resolve().parents[1]


def results_of_the_old_code(tmp_path) -> dict | None:
    """fp32_reproduction.py run with commit COMMIT's code on this machine; None if the checkout
    has no git history with that commit."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", COMMIT], check=True,
                                 capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    old = tmp_path / "old"
    old.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old, filter="data")
    for built in [*(ROOT / "abd_fast").glob("_C*.so"), ROOT / "abd_fast" / "_build_config.json"]:
        if built.exists():
            shutil.copy(built, old / "abd_fast")
    out = tmp_path / "old.json"
    subprocess.run([sys.executable, str(Path(__file__).with_name("fp32_reproduction.py")),
                    "--record", str(out)], cwd=old, check=True, env=dict(os.environ))
    (entry,) = json.loads(out.read_text())["runs"].values()
    return entry


@pytest.mark.slow
def test_fp32_no_compile_reproduces_the_results_before_the_flags(tmp_path):
    table = json.loads(EXPECTED.read_text())
    assert table["commit"] == COMMIT
    expected = table["runs"].get(machine_key())
    if expected is None:
        expected = results_of_the_old_code(tmp_path)
    if expected is None:
        pytest.skip(f"no results of commit {COMMIT} recorded for a {machine_key()} machine "
                    f"(recorded: {', '.join(table['runs'])}) and no git history to compute "
                    "them: fp32 results differ between CPU tiers. Record them with "
                    "tests/fp32_reproduction.py (its docstring)")
    (tmp_path / "new").mkdir()
    got = run(tmp_path / "new", ["--precision", "fp32", "--no-compile"])
    assert got == expected  # exact: floats compared bit for bit
