"""pipeline --seeds: flag checks before any work, and a --quick run with two seeds (one shared
clean model; per-seed victims, floors, UAPs, defenses, ablations; Table I-III as mean ± std);
the floors of Table I in each seed's report."""
import json

import pytest

from abd_fast.report import validate_report
from test_pipeline import _run, cache  # noqa: F401 (fixture)
from test_train_cli import run_main


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0,0"], "--seeds '0,0': expected distinct non-negative integers"),
    (["--seeds", "0,x"], "--seeds '0,x': expected distinct"),
    (["--seeds", "-1"], "--seeds '-1': expected distinct"),
    (["--seed", "1", "--seeds", "0,1"], "give --seed (one run) or --seeds (several), not both"),
])
def test_seeds_flag_is_checked(tmp_path, capsys, argv, message):
    code, err = run_main(["pipeline", "--output", tmp_path / "out", *argv], capsys)
    assert code == 2 and f"error: {message}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quick_pipeline_two_seeds(cache, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    text = _run(["--quick", "--seeds", "0,1", "--attacks", "badnet,blended", "--defenses",
                 "ft,abd", "--ablations", "--uap-candidates", "corner,linf:differential",
                 "--output", out], capsys)
    assert text.count("pretrain") >= 1 and (out / "clean" / "checkpoint.pt").exists()
    assert not (out / "seed0" / "clean").exists() and not (out / "seed1" / "clean").exists()
    per_seed = {k: json.loads((out / f"seed{k}" / "report.json").read_text()) for k in (0, 1)}
    agg = json.loads((out / "report.json").read_text())
    validate_report(agg)
    assert agg["settings"]["seeds"] == [0, 1]
    assert any("shared by every seed" in n for n in agg["notes"])
    for k, rep in per_seed.items():
        validate_report(rep)
        assert rep["settings"]["seed"] == k and rep["clean"] == per_seed[0]["clean"]
        victim = json.loads((out / f"seed{k}" / "poison-badnet" / "stage.json").read_text())
        assert victim["argv"][victim["argv"].index("--seed") + 1] == str(k)
        assert victim["argv"][victim["argv"].index("--pretrained") + 1] == str(
            out / "clean" / "checkpoint.pt")
        # Floors: the clean model under this seed's own victim trigger; the UAP alone.
        for a in ("badnet", "blended"):
            floor = rep["floors"][a]
            assert floor["clean"]["attack"] == a and floor["clean"]["trigger_seed"] == k
            assert floor["clean"]["ca_top1"] == rep["clean"]["ca_top1"]   # same model
            assert floor["clean"]["asr"] is not None
            assert isinstance(floor["uap"]["capture_class"], str)
            assert 0 <= floor["uap"]["capture_rate"] <= 100
        md = (out / f"seed{k}" / "report.md").read_text()
        assert "| clean model (floor) |" in md and "| UAP alone (" in md
    # Table I-III: mean ± std of the seeds' numbers.
    for a in ("badnet", "blended"):
        for m in ("victim", "ft", "abd"):
            values = [per_seed[k]["attacks"][a][m]["asr"] for k in (0, 1)]
            r = agg["attacks"][a][m]
            assert r["asr_seeds"] == values and r["asr"] == pytest.approx(sum(values) / 2)
        assert agg["floors"][a]["clean"]["asr_seeds"] == [
            per_seed[k]["floors"][a]["clean"]["asr"] for k in (0, 1)]
    rows = agg["ablations"]["table2"]["rows"]
    assert rows["t_eda"]["ca_top1_seeds"] == [
        per_seed[k]["ablations"]["table2"]["rows"]["t_eda"]["ca_top1"] for k in (0, 1)]
    md = (out / "report.md").read_text()
    assert " ± " in md and "| clean model (floor) |" in md
