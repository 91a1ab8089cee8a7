"""`--precision fp32 --no-compile` reproduces the training commands' results from before
--precision and --compile existed, bit for bit: losses of every step, CA, ASR and the
embedding distance of pretrain, poison and defend with each method (tests/fp32_reproduction.py;
the expectation was computed by the code of that time, commit 258c670, on a machine of the
same kind)."""
import json
from pathlib import Path

import pytest

from fp32_reproduction import COMMIT, machine_key, run

EXPECTED = Path(__file__).parent / "data" / "fp32_reproduction.json"


@pytest.mark.slow
def test_fp32_no_compile_reproduces_the_results_before_the_flags(tmp_path):
    table = json.loads(EXPECTED.read_text())
    assert table["commit"] == COMMIT
    expected = table["runs"].get(machine_key())
    if expected is None:
        pytest.skip(f"no results of commit {COMMIT} recorded for a {machine_key()} machine "
                    f"(recorded: {', '.join(table['runs'])}); fp32 results differ between CPU "
                    "tiers. Record them with tests/fp32_reproduction.py (its docstring)")
    got = run(tmp_path, ["--precision", "fp32", "--no-compile"])
    assert got == expected  # exact: floats compared bit for bit
