"""`scan` and `scan-data` through the CLI on a tiny configuration (mechanics, not accuracy; the
verdict itself is tested on a planted backdoor in test_scan.py): the files they write, a scan
that never reads the target label, --drop-top's cleaned data, and their validation errors."""
import csv
import json

import pytest

from abd_fast.data.sources import open_source
from test_defense_cli import victim  # noqa: F401 (fixture)
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)

SCAN = ["--steps", "2", "--scan-images", "20", "--geometries", "patch-center-0.25,linf-8/255"]


@pytest.fixture(scope="module")
def models(victim):  # noqa: F811
    """test_defense_cli's clean tiny ViT and blended victim (its run records target 'star'),
    with the common flags a scan takes."""
    out, common = victim
    return out, common[:6] + common[-4:]


def _scan(models, tmp_path, capsys, name, *extra):
    out, common = models
    code, err = run_main(["scan", "--checkpoint", out / "poisoned" / "checkpoint.pt", *common,
                          *SCAN, "--output", tmp_path / name, *extra], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / name / "scan.json").read_text())
    result.pop("seconds")
    return result


def test_scan_writes_its_verdict_and_never_reads_the_target_label(models, small_data,  # noqa: F811
                                                                  tmp_path, capsys):
    plain = _scan(models, tmp_path, capsys, "plain")
    assert {"backdoored", "score", "threshold", "suspected_target", "per_class"} <= set(plain)
    assert isinstance(plain["backdoored"], bool)
    assert set(plain["per_class"]) == set(small_data.classnames)
    assert (tmp_path / "plain" / "scan_uap.png").stat().st_size > 0
    # A wrong target given as a flag or in a config file: the same result to the last digit.
    (tmp_path / "wrong.yaml").write_text("target-label: circle\n")
    assert _scan(models, tmp_path, capsys, "flag", "--target-label", "circle") == plain
    assert _scan(models, tmp_path, capsys, "config", "--config", tmp_path / "wrong.yaml") == plain


def test_scan_with_a_reference_scores_the_gap(models, tmp_path, capsys):
    out, _ = models
    r = _scan(models, tmp_path, capsys, "ref", "--reference-model", out / "clean" / "checkpoint.pt")
    assert r["mode"] == "reference" and set(r["reference_capture"]) == {"patch-center-0.25",
                                                                        "linf-8/255"}
    assert r["self"]["threshold"] > 0


def test_scan_data_ranks_every_pair_and_drops_the_top(models, small_data,  # noqa: F811
                                                       tmp_path, capsys):
    out, common = models
    code, err = run_main(["scan-data", "--checkpoint", out / "poisoned" / "checkpoint.pt",
                          *common, "--reference-model", out / "clean" / "checkpoint.pt",
                          "--drop-top", "10", "--output", tmp_path], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "scan_data.csv")))
    n = len(open_source(small_data.csv))
    assert len(rows) == n and [int(r["rank"]) for r in rows] == list(range(1, n + 1))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    cleaned = open_source(tmp_path / "cleaned.csv")
    assert len(cleaned) == n - 10
    dropped = {r["caption"] for r in rows[:10]} - {r["caption"] for r in rows[10:]}
    assert not dropped & set(cleaned.captions)


@pytest.mark.parametrize("command, argv, message", [
    ("scan", [], "--checkpoint is needed"),
    ("scan", ["--geometries", "patch-left-0.25"], "--geometries: geometry 'patch-left-0.25'"),
    ("scan", ["--steps", "0"], "--steps must be an integer >= 1"),
    ("scan", ["--threshold", "nan"], "--threshold must be a finite number, got nan"),
    ("scan-data", ["--drop-top", "-1"], "--drop-top must be an integer >= 0"),
    ("scan-data", ["--reference-model", "{tmp}/none.pt"], "--reference-model {tmp}/none.pt: no "
                                                         "such file"),
])
def test_scan_flags_are_validated_before_any_work(models, tmp_path, capsys, command, argv,
                                                  message):
    out, common = models
    ckpt = [] if argv == [] else ["--checkpoint", out / "poisoned" / "checkpoint.pt"]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_main([command, *ckpt, *common, *argv, "--output", tmp_path], capsys)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in err, err
