"""The one-command pipeline and the ablation command: flag validation before any work, the
--quick smoke run (report, plots, every stage), skipping completed stages and resuming an
interrupted one, the clean-model cache on user data (CSV + ImageFolder), Table II and III."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from abd_fast.engine import Trainer
from abd_fast.cli.pipeline import (AUTO_JOBS, DEFAULT_ATTACKS, DEFAULT_DEFENSES, FULL_DEFENSES,
                                   _settings, add_parser)
from abd_fast.report import TABLE2_ROWS, TABLE3_ROWS, validate_report
from test_defense_cli import victim  # noqa: F401 (fixture)
from abd_fast.train import main
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)


def _run(argv, capsys):
    """stdout of an in-process run, which must exit with status 0."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private abd_fast cache (synthetic data, clean models) for the test."""
    monkeypatch.setenv("ABD_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _user_flags(data):
    return ["--train-data", data.csv, "--eval-data", data.eval_dir, "--target-label", "star",
            "--workers", "0", "--loader", "torch"]


@pytest.mark.parametrize("argv,message", [
    (["--attacks", "badnet,trojan"], "--attacks 'badnet,trojan': unknown attack 'trojan'; "
                                     "choose from badnet, blended"),
    (["--attacks", ""], "--attacks '': empty"),
    (["--defenses", "ft,prune"], "--defenses 'ft,prune': unknown defense 'prune'"),
    (["--defenses", "abd,abd"], "--defenses 'abd,abd': names a defense twice"),
    (["--model", "RN9000"], "--model 'RN9000' is not a known architecture"),
    (["--pretrained", "{tmp}/none.pt"], "--pretrained {tmp}/none.pt: no such file"),
    (["--image-size", "0"], "--image-size must be an integer >= 1, got 0"),
    (["--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
    (["--config", "{tmp}/absent.yaml"], "--config {tmp}/absent.yaml: cannot read"),
    (["--uap-candidates", "corner:paper,middle"], "--uap-candidates 'middle': expected "
                                                 "GEOMETRY[:LOSS[:steer]]"),
    (["--uap-candidates", "linf:loud"], "--uap-candidates 'linf:loud': expected"),
    (["--scan-threshold", "nan"], "--scan-threshold must be a finite number, got nan"),
    (["--scan-threshold", "auto"], "argument --scan-threshold: expected a number or "
                                   "'calibrate', got 'auto'"),
    (["--calibration-finetunes", "3"], "--calibration-finetunes is the number of clean "
                                       "fine-tunes of --scan-threshold calibrate"),
    (["--scan-threshold", "calibrate", "--calibration-finetunes", "0"],
     "--calibration-finetunes must be an integer >= 1, got 0"),
])
def test_pipeline_flags_stop_before_any_work(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, err = run_main(["pipeline", "--output", tmp_path / "out", *argv], capsys)
    assert code == 2 and f"error: {message.format(tmp=tmp_path)}" in err
    assert not (tmp_path / "out").exists()


def _cfg(argv, tmp_path):
    import argparse
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    return _settings(parser.parse_args([*map(str, argv), "--output", str(tmp_path / "o")]), parser)


def test_pipeline_defaults_full_and_jobs(tmp_path, small_data, monkeypatch):  # noqa: F811
    """The demo runs FT, CleanCLIP and ABD without the ablations; --full adds RoCLIP and
    Table II/III unless told otherwise; --jobs defaults to AUTO_JOBS on the embedded data on a
    CPU with enough threads only."""
    cfg = _cfg([], tmp_path)
    assert cfg["defenses"] == list(DEFAULT_DEFENSES) and "roclip" not in cfg["defenses"]
    assert not cfg["ablations"]
    cfg = _cfg(["--full"], tmp_path)
    assert cfg["defenses"] == list(FULL_DEFENSES) and cfg["ablations"]
    cfg = _cfg(["--full", "--no-ablations", "--defenses", "ft,abd"], tmp_path)
    assert cfg["defenses"] == ["ft", "abd"] and not cfg["ablations"]
    assert _cfg(["--ablations"], tmp_path)["ablations"]
    with pytest.raises(Exception, match="give --ablations or --no-ablations, not both"):
        _cfg(["--ablations", "--no-ablations"], tmp_path)
    monkeypatch.setattr(torch, "get_num_threads", lambda: AUTO_JOBS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cfg([], tmp_path)["jobs"] == AUTO_JOBS
    assert _cfg(["--jobs", "1"], tmp_path)["jobs"] == 1
    assert _cfg(["--quick"], tmp_path)["jobs"] == 1  # the CI smoke run stays in-process
    assert _cfg(_user_flags(small_data) + ["--val-data", small_data.val_dir],
                tmp_path)["jobs"] == 1  # user data: one stage at a time unless asked
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert _cfg([], tmp_path)["jobs"] == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: AUTO_JOBS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _cfg([], tmp_path)["jobs"] == 1


def test_pipeline_user_data_flags(small_data, tmp_path, capsys):  # noqa: F811
    out = ["--output", tmp_path / "out"]
    code, err = run_main(["pipeline", *out, "--train-data", small_data.csv], capsys)
    assert code == 2 and "error: --train-data needs --eval-data" in err
    code, err = run_main(["pipeline", *out, "--train-data", small_data.csv, "--eval-data",
                          small_data.eval_dir], capsys)
    assert code == 2 and "error: --target-label is needed with your own data" in err
    code, err = run_main(["pipeline", *out, *_user_flags(small_data)[:4], "--target-label",
                          "banana", "--val-data", small_data.val_dir], capsys)
    assert code == 2 and "error: --target-label 'banana' is not a class of the evaluation " \
        "data (arrow, circle" in err
    # ABD's UAP is chosen among candidates on validation images: user data needs --val-data.
    code, err = run_main(["pipeline", *out, *_user_flags(small_data)], capsys)
    assert code == 2 and "error: --val-data is needed: the choice of ABD's UAP among " \
        "--uap-candidates (or give --uap-candidates corner:paper" in err
    # The scan threshold's calibration scans clean fine-tunes on validation images too.
    code, err = run_main(["pipeline", *out, *_user_flags(small_data), "--uap-candidates",
                          "corner:paper", "--scan-threshold", "calibrate"], capsys)
    assert code == 2 and "error: --val-data is needed: --scan-threshold calibrate's scans" in err
    # Flags without a command are the pipeline's (the README's main command).
    code, err = run_main([*out, "--attacks", "nope"], capsys)
    assert code == 2 and "--attacks 'nope': unknown attack" in err
    (tmp_path / "p.yaml").write_text("attacks: badnet\ndefenses: shield\n")
    code, err = run_main(["pipeline", *out, "--config", tmp_path / "p.yaml"], capsys)
    assert code == 2 and "--defenses 'shield': unknown defense" in err


@pytest.mark.parametrize("yaml,message", [
    ("stage-flags: {prune: {lr: 1}}", "stage-flags: unknown key 'prune'; keys are pretrain"),
    ("stage-flags: {defend:shield: {lr: 1}}", "stage-flags: unknown key 'defend:shield'"),
    ("stage-flags: {defend: {lr: fast}}", "stage-flags: defend: lr: argument --lr: invalid "
                                          "float value: 'fast'"),
    ("stage-flags: {uap: {warp: 3}}", "stage-flags: uap: unknown key 'warp'"),
    ("stage-flags: {defend: {method: ft}}", "stage-flags: defend: method is set by the "
                                            "pipeline"),
    ("stage-flags: {uap: {scan-steps: 5}}", "stage-flags: uap: scan-steps is set by the "
                                             "pipeline"),
    ("stage-flags: [1, 2]", "stage-flags must map a command"),
])
def test_pipeline_stage_flags_are_checked(tmp_path, capsys, yaml, message):
    (tmp_path / "p.yaml").write_text(yaml + "\n")
    code, err = run_main(["pipeline", "--output", tmp_path / "out", "--config",
                          tmp_path / "p.yaml"], capsys)
    assert code == 2 and f"error: --config {tmp_path / 'p.yaml'}: {message}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_stage_flags_reach_their_stages(cache, small_data, tmp_path, capsys):  # noqa: F811
    """A config's per-command flags (the paper recipe's mechanism) go last on the stage's
    command line; a poison count replaces the pipeline's poison rate."""
    (tmp_path / "p.yaml").write_text(
        "attacks: badnet\ndefenses: ft,cleanclip\nno-ablations: true\nquick: true\n"
        "stage-flags:\n  poison: {poison-count: 24}\n  defend: {lr: 3.0e-4}\n"
        "  defend:ft: {lr: 5.0e-4, warmup: 1}\n")
    _run(["pipeline", *_user_flags(small_data), "--config", tmp_path / "p.yaml", "--output",
          tmp_path / "out"], capsys)

    def argv(stage):
        return json.loads((tmp_path / "out" / stage / "stage.json").read_text())["argv"]
    poison = argv("poison-badnet")
    assert poison[-2:] == ["--poison-count", "24"] and "--poison-rate" not in poison
    assert argv("badnet-ft")[-6:] == ["--lr", "0.0003", "--lr", "0.0005", "--warmup", "1"]
    assert argv("badnet-cleanclip")[-2:] == ["--lr", "0.0003"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["stage_flags"]["defend:ft"] == {"lr": 0.0005, "warmup": 1}
    # The scans: the clean model alone, the victim against it, the victim's poisoned pairs.
    scan = report["scan"]
    assert set(scan) == {"clean", "badnet"} and scan["clean"]["mode"] == "self"
    assert scan["badnet"]["model"]["mode"] == "reference"
    assert scan["badnet"]["data"]["poison_count"] == 24
    assert 0 <= scan["badnet"]["data"]["auroc"] <= 1
    assert "--target-label" not in argv("scan-badnet")
    assert "## Backdoor scan" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_pipeline_from_other_weights(cache, small_data, tmp_path, capsys):  # noqa: F811
    """--pretrained weights abd_fast did not train (pretrained CLIP): the victim is poisoned at
    the paper's steps x lr over its steps, and the defense's budget follows that poisoning."""
    from abd_fast.cli.poison import PAPER_STEPS_X_LR
    from abd_fast.models import create_model
    torch.save(create_model("abd-tiny-rn").state_dict(), tmp_path / "clip.pt")
    _run(["pipeline", *_user_flags(small_data), "--pretrained", tmp_path / "clip.pt",
          "--attacks", "badnet", "--defenses", "ft", "--no-ablations", "--quick", "--output",
          tmp_path / "out"], capsys)
    ckpt = torch.load(tmp_path / "out" / "poison-badnet" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["lr"] == pytest.approx(PAPER_STEPS_X_LR / ckpt["step"], rel=1e-12)
    budget = json.loads((tmp_path / "out" / "badnet-ft" / "eval.json").read_text())["budget"]
    assert budget["poisoning"]["lr"] == ckpt["config"]["lr"]
    assert budget["steps_x_lr"] == pytest.approx(3 * PAPER_STEPS_X_LR, rel=1e-9)


def test_scan_threshold_waits_for_its_calibration():
    """The stages given the scan threshold wait for --scan-threshold calibrate's, and stop
    when the run failed before it was set."""
    import threading
    from types import SimpleNamespace
    from abd_fast.cli.pipeline import _ScanThreshold
    from abd_fast.cli.stages import StageCancelled
    st = SimpleNamespace(failed=False)
    assert _ScanThreshold(None).flags("scan", st) == []
    assert _ScanThreshold(3.1).flags("uap-select", st) == ["--scan-threshold", 3.1]
    calibrated = _ScanThreshold("calibrate")
    threading.Timer(0.3, calibrated.set, (2.5,)).start()
    assert calibrated.flags("scan", st) == ["--threshold", 2.5]
    st.failed = True
    with pytest.raises(StageCancelled, match="its calibration did not finish"):
        _ScanThreshold("calibrate").flags("scan", st)


@pytest.mark.slow
def test_pipeline_calibrates_the_scan_threshold(cache, small_data, tmp_path, capsys):  # noqa: F811
    """--scan-threshold calibrate: clean fine-tunes of the clean model (the victim's poisoning
    recipe without poisons, seeds 1 and 2 over --seed 0) scanned against it on the validation
    split; the victim's scan and uap-select wait for their largest score + 1 (two stages at a
    time here), the report records it, and a re-run skips every stage."""
    out = tmp_path / "out"
    argv = ["pipeline", *_user_flags(small_data), "--val-data", small_data.val_dir,
            "--attacks", "badnet", "--defenses", "abd", "--uap-candidates",
            "corner:paper,random:differential:steer", "--no-ablations", "--quick",
            "--scan-threshold", "calibrate", "--jobs", "2", "--output", out]
    _run(argv, capsys)

    def stage(name):
        return json.loads((out / name / "stage.json").read_text())["argv"]

    def last(argv, flag):
        return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]
    victim = torch.load(out / "poison-badnet" / "checkpoint.pt", weights_only=True)["config"]
    scores = []
    for k in (1, 2):
        ft = stage(f"calib-ft{k}")
        assert ft[0] == "pretrain" and "--attack" not in ft and "--target-label" not in ft
        assert last(ft, "--pretrained") == str(out / "clean" / "checkpoint.pt")
        assert ft.count("--seed") == 1 and last(ft, "--seed") == str(k)
        for key in ("batch_size", "epochs", "lr", "warmup"):
            assert last(ft, "--" + key.replace("_", "-")) == str(victim[key]), key
        scan = stage(f"calib-scan{k}")
        assert last(scan, "--checkpoint") == str(out / f"calib-ft{k}" / "checkpoint.pt")
        assert last(scan, "--reference-model") == str(out / "clean" / "checkpoint.pt")
        assert last(scan, "--eval-data") == str(small_data.val_dir)
        scores.append(json.loads((out / f"calib-scan{k}" / "scan.json").read_text())["score"])
    threshold = round(max(scores) + 1, 4)
    assert last(stage("scan-badnet"), "--threshold") == str(threshold)
    assert json.loads((out / "scan-badnet" / "scan.json").read_text())["threshold"] == threshold
    assert last(stage("uap-badnet"), "--scan-threshold") == str(threshold)
    selection = json.loads((out / "uap-badnet" / "selection.json").read_text())
    assert selection["scan"]["threshold"] == threshold
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    calibration = report["settings"]["scan_calibration"]
    assert calibration["threshold"] == threshold and calibration["margin"] == 1
    assert calibration["scores"] == {"calib-ft1": scores[0], "calib-ft2": scores[1]}
    assert calibration["split"] == str(small_data.val_dir)
    assert f"The victims' threshold, {threshold:.2f}, was calibrated in this run" \
        in (out / "report.md").read_text()
    assert report["scan"]["badnet"]["model"]["threshold"] == threshold
    text = _run(argv, capsys)
    assert text.count("), skipped") == len(report["timing"]) - 1  # all but the report


@pytest.mark.slow
def test_quick_pipeline_report_skip_and_resume(cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    text = _run(["--quick", "--full", "--output", out], capsys)
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert list(report["attacks"]) == list(DEFAULT_ATTACKS)
    for attack, models in report["attacks"].items():
        assert set(models) == {"victim", *FULL_DEFENSES}
        for name, r in models.items():  # every victim and defense evaluated with the attack
            assert r["attack"] == attack and r["asr"] is not None and r["n_eval"] == 100, name
    assert report["clean"]["asr"] is None
    t2, t3 = report["ablations"]["table2"], report["ablations"]["table3"]
    assert t2["attack"] == t3["attack"] == "badnet"
    assert set(t2["rows"]) == set(TABLE2_ROWS) and set(t3["rows"]) == set(TABLE3_ROWS)
    assert all(r["asr"] is not None for r in [*t2["rows"].values(), *t3["rows"].values()])
    assert t2["rows"]["ft"] == report["attacks"]["badnet"]["ft"]  # reused, not recomputed
    sim = report["similarity"]
    assert sim["attack"] == "badnet" and sim["adversarial_backdoor_caption"] is not None
    for plot in ("ca_asr.png", "embedding.png", "similarity.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = [d.name for d in out.iterdir() if (d / "stage.json").exists()]
    assert set(report["timing"]) == set(stages)
    assert "badnet-abd" in stages and "ablation-badnet-uap" in stages
    # uap-select reads the steered candidate's scan of the val images, not a search of its own
    select = json.loads((out / "uap-badnet" / "stage.json").read_text())["argv"]
    steered = out / "uap-badnet-random-differential-steer"
    assert select[select.index("--val-scan") + 1] == str(steered / "val_scan.json")
    assert json.loads((out / "uap-badnet" / "selection.json").read_text())["scan"]["score"] \
        == json.loads((steered / "eval.json").read_text())["steer"]["score"]
    assert f"[stage {len(stages)}/{len(stages)}] report" in text and "ETA" in text

    # A re-run skips every completed stage (same flags) and writes the same numbers.
    text = _run(["--quick", "--full", "--output", out], capsys)
    assert text.count("), skipped") == len(stages) - 1  # all but the report
    again = json.loads((out / "report.json").read_text())
    assert again["attacks"] == report["attacks"] and again["ablations"] == report["ablations"]

    # Finished stages keep their weights, not the optimizer state (a third of the size).
    ckpt = torch.load(out / "badnet-ft" / "checkpoint.pt", weights_only=True)
    assert "optimizer" not in ckpt and ckpt["model"] and ckpt["config"]["method"] == "ft"

    # A stage killed after its last checkpoint (before its eval) resumes from that
    # checkpoint; the stages before and after it are kept.
    shutil.rmtree(out / "blended-roclip")
    save = Trainer.save

    def save_then_die(trainer):
        save(trainer)
        if trainer.output_dir.name == "blended-roclip":
            raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(Trainer, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            main(["--quick", "--full", "--output", str(out)])
    assert "blended-roclip: running" in capsys.readouterr().out
    assert "optimizer" in torch.load(out / "blended-roclip" / "checkpoint.pt", weights_only=True)
    text = _run(["--quick", "--full", "--output", out], capsys)
    assert "resuming blended-roclip" in text and text.count("), skipped") == len(stages) - 2
    assert json.loads((out / "report.json").read_text())["attacks"]["blended"]["roclip"][
        "asr"] == report["attacks"]["blended"]["roclip"]["asr"]
    assert "optimizer" not in torch.load(out / "blended-roclip" / "checkpoint.pt",
                                         weights_only=True)


@pytest.mark.slow
def test_clean_model_cache_on_user_data(cache, small_data, tmp_path, capsys):  # noqa: F811
    argv = ["pipeline", *_user_flags(small_data), "--attacks", "badnet", "--defenses", "ft",
            "--no-ablations", "--quick"]
    first = _run([*argv, "--output", tmp_path / "a"], capsys)
    assert "reusing the clean model" not in first and "pretrain" in first
    assert len(list((cache / "clean-models").iterdir())) == 1
    second = _run([*argv, "--output", tmp_path / "b"], capsys)
    assert "reusing the clean model" in second
    a, b = (torch.load(tmp_path / d / "clean" / "checkpoint.pt", weights_only=True)["model"]
            for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert any("reused from the cache" in n for n in report["notes"])
    assert report["ablations"] == {"table2": None, "table3": None}
    assert set(report["attacks"]["badnet"]) == {"victim", "ft"}
    # Another seed is another clean model: trained, not taken from the cache.
    assert "reusing the clean model" not in _run([*argv, "--seed", "1", "--output",
                                                  tmp_path / "c"], capsys)
    assert len(list((cache / "clean-models").iterdir())) == 2


@pytest.mark.slow
def test_ablation_tables_2_and_3(victim, tmp_path, capsys):  # noqa: F811
    out, common = victim
    ckpt, clean = out / "poisoned" / "checkpoint.pt", out / "clean" / "checkpoint.pt"
    # The pipeline's budget and view, given to the defend rows only (as pipeline's rows get).
    code, err = run_main(["ablation", "--table", "2", *common, "--checkpoint", ckpt,
                          "--reference-model", clean, "--budget", "paper", "--budget-steps", "2",
                          "--adv-view", "autoaugment", "--output", tmp_path / "t2"], capsys)
    assert code == 0, err
    t2 = json.loads((tmp_path / "t2" / "table2.json").read_text())
    assert t2["attack"] == "blended" and set(t2["rows"]) == set(TABLE2_ROWS)
    assert all(r["asr"] is not None and r["n_asr"] == 18 for r in t2["rows"].values())
    assert "| FT + I_adv + T_eda |" in (tmp_path / "t2" / "table2.md").read_text()
    # The rows ran the intended defend flags (stage.json records them).
    flags = {row: json.loads((tmp_path / "t2" / row / "stage.json").read_text())["argv"]
             for row in TABLE2_ROWS}
    assert "--no-eda" in flags["i_adv"] and "--no-adv" in flags["t_eda"]
    assert "--uap" not in flags["t_eda"] and "--uap" in flags["i_adv_t_eda"]
    assert flags["ft"][flags["ft"].index("--method") + 1] == "ft"
    for row in TABLE2_ROWS:
        argv = flags[row]
        assert argv[argv.index("--budget") + 1] == "paper"
        assert argv[argv.index("--adv-view") + 1] == "autoaugment"
        budget = json.loads((tmp_path / "t2" / row / "eval.json").read_text())["budget"]
        assert budget["rule"] == "paper" and budget["steps"] == 2 and budget["pairs"] == 128
    uap_argv = json.loads((tmp_path / "t2" / "uap-bd-file" / "stage.json").read_text())["argv"]
    assert "--budget" not in uap_argv and "--adv-view" not in uap_argv
    uap_bd = tmp_path / "t2" / "uap-bd-file" / "uap.pt"
    code, err = run_main(["ablation", "--table", "3", *common, "--checkpoint", ckpt,
                          "--uap", uap_bd, "--max-samples", "32", "--output", tmp_path / "t3"],
                         capsys)
    assert code == 0, err
    t3 = json.loads((tmp_path / "t3" / "table3.json").read_text())
    assert set(t3["rows"]) == set(TABLE3_ROWS)
    uap_argv = json.loads((tmp_path / "t3" / "uap-file" / "stage.json").read_text())["argv"]
    assert "--no-backdoor-loss" in uap_argv
    # --max-samples limits the defenses' fine-tuning data, not the UAP's training data.
    assert "--max-samples" not in uap_argv
    defend_argv = json.loads((tmp_path / "t3" / "uap" / "stage.json").read_text())["argv"]
    assert defend_argv[-2:] == ["--max-samples", "32"]
    assert not (tmp_path / "t3" / "uap-bd-file").exists()  # --uap given: not retrained
    code, err = run_main(["ablation", "--table", "3", "--output", tmp_path / "t4"], capsys)
    assert code == 2 and "--checkpoint is needed" in err
    code, err = run_main(["ablation", "--table", "2", "--checkpoint", clean,
                          "--output", tmp_path / "t4"], capsys)
    assert code == 2 and "not a poisoned model's checkpoint" in err


def test_main_command_as_a_user_runs_it(tmp_path):
    """`python -m abd_fast.train [flags]` is the pipeline; its usage errors exit with status 2
    and a message (the module runs as __main__ and the pipeline calls its main)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "abd_fast.train", "--attacks", "badnet,nope",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: --attacks 'badnet,nope': unknown attack 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_training_stages_checkpoint_during_the_stage(tmp_path):
    """Training stages get --checkpoint-every (so a kill loses at most that many steps)
    without it entering their identity in stage.json; a stage's own value wins."""
    from abd_fast.cli.stages import STAGE_CHECKPOINT_STEPS, Stages
    seen = []

    def fake_main(argv):
        seen.append(argv)
        out = Path(argv[argv.index("--output") + 1])
        (out / "eval.json").write_text("{}")
        return 0
    st = Stages(tmp_path, {"a": 1, "b": 1, "c": 1}, fake_main, log=lambda *a, **k: None)
    st.run("a", ["defend", "--method", "abd"])
    st.run("b", ["eval", "--checkpoint", "x.pt"])
    st.run("c", ["poison", "--checkpoint-every", "7"])
    assert seen[0][:5] == ["defend", "--method", "abd", "--checkpoint-every",
                           str(STAGE_CHECKPOINT_STEPS)]
    assert "--checkpoint-every" not in seen[1]
    assert seen[2].count("--checkpoint-every") == 1 and "7" in seen[2]
    assert json.loads((tmp_path / "a" / "stage.json").read_text())["argv"] == \
        ["defend", "--method", "abd"]


def test_a_stage_whose_input_changed_runs_again(tmp_path):
    """Same flags are not enough to skip: when an earlier stage re-ran (a new UAP file, a new
    candidate in a directory list), the stages reading its outputs run again."""
    import os

    from abd_fast.cli.stages import Stages
    runs = []

    def fake_main(argv):
        runs.append(argv[0])
        (Path(argv[argv.index("--output") + 1]) / "eval.json").write_text("{}")
        return 0
    (tmp_path / "in").mkdir()
    uap, cand = tmp_path / "in" / "uap.pt", tmp_path / "cand"
    uap.write_bytes(b"1")
    cand.mkdir()
    (cand / "uap.pt").write_bytes(b"1")
    argv = {"a": ["defend", "--uap", str(uap)], "b": ["uap-select", "--candidates",
                                                   f"{tmp_path / 'none'},{cand}"]}

    def run_all():
        st = Stages(tmp_path / "run", {"a": 1, "b": 1}, fake_main, log=lambda *a, **k: None)
        for name in argv:
            st.run(name, argv[name])
    run_all()
    run_all()
    assert runs == ["defend", "uap-select"]  # the second pass skipped both
    later = (tmp_path / "run" / "a" / "stage.json").stat().st_mtime_ns + 10**9
    os.utime(uap, ns=(later, later))
    run_all()
    assert runs[2:] == ["defend"]
    os.utime(uap, ns=(0, 0))  # back before every stage.json
    later = (tmp_path / "run" / "a" / "stage.json").stat().st_mtime_ns + 10**9
    os.utime(cand / "uap.pt", ns=(later, later))
    run_all()
    assert runs[3:] == ["uap-select"]


def test_a_failed_strip_keeps_the_stage_and_its_full_checkpoint(tmp_path, monkeypatch):
    """Stripping a finished stage's checkpoint only saves space: a full disk at that point
    keeps the stage complete with its full checkpoint and says so."""
    import errno

    import abd_fast.engine
    from abd_fast.cli.stages import Stages

    def fake_main(argv):
        out = Path(argv[argv.index("--output") + 1])
        (out / "checkpoint.pt").write_bytes(b"full")
        (out / "eval.json").write_text("{}")
        return 0

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(abd_fast.engine, "strip_checkpoint", full_disk)
    lines = []
    st = Stages(tmp_path, {"a": 1}, fake_main,
                log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    st.run("a", ["poison"])
    assert json.loads((tmp_path / "a" / "stage.json").read_text())["complete"]
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == b"full"
    assert any("kept a's full checkpoint (stripping it failed: [Errno 28] No space left"
               in line for line in lines)


def test_uap_candidates_plan_a_uap_per_candidate_then_the_choice():
    from abd_fast.cli.common import UsageError
    from abd_fast.cli.pipeline import plan_stages
    from abd_fast.cli.uap_select import candidate_specs
    specs = candidate_specs("corner:paper, linf:differential,patch+linf,random:differential:steer")
    assert list(specs) == ["corner-paper", "linf-differential", "patchlinf-paper",
                           "random-differential-steer"]
    assert specs["linf-differential"] == ["--mode", "linf", "--bd-loss", "differential"]
    assert specs["random-differential-steer"][-4:] == ["--steer", "scan", "--lambda-steer", "10"]
    for bad in ("random:differential:toward", "linf:paper:steer:x", "corner:steer"):
        with pytest.raises(UsageError, match=re.escape(f"--uap-candidates {bad!r}")):
            candidate_specs(bad)
    cfg = dict(quick=True, pretrained=None, attacks=["badnet"], defenses=["abd"],
               ablations=False, stage_flags={}, uap_candidates="corner,random:differential")
    plan = list(plan_stages(cfg))
    assert plan.index("uap-badnet-corner-paper") < plan.index("uap-badnet") \
        < plan.index("badnet-abd")
    assert "uap-badnet-random-differential" in plan
    # One candidate: that UAP alone, no choice.
    plan = list(plan_stages(dict(cfg, uap_candidates="linf:differential")))
    assert [n for n in plan if n.startswith("uap-")] == ["uap-badnet"]


def test_pipeline_default_uap_candidates_and_the_chosen_geometry(tmp_path):
    """By default the pipeline chooses ABD's UAP among the paper's, three differential
    geometries and a steered one (the paper's first: it wins ties); Table III's UAP without
    L_bd takes the chosen candidate's geometry, without its backdoor-loss or steering flags."""
    from abd_fast.cli.pipeline import PIPELINE_DEFAULTS, _chosen_geometry, _uap_candidates
    cfg = dict(PIPELINE_DEFAULTS, defenses=["abd"], output=str(tmp_path))
    assert list(_uap_candidates(cfg)) == ["corner-paper", "random-differential",
                                          "linf-differential", "patchlinf-differential",
                                          "random-differential-steer"]
    (tmp_path / "uap-blended").mkdir()
    (tmp_path / "uap-blended" / "selection.json").write_text(
        json.dumps({"chosen": "uap-blended-linf-differential"}))
    assert _chosen_geometry(cfg, "blended") == ["--mode", "linf"]
    one = dict(cfg, uap_candidates="patch+linf:differential")
    assert _chosen_geometry(one, "badnet") == ["--mode", "patch+linf", "--patch-place", "random"]
    assert _chosen_geometry(dict(cfg, defenses=["ft"]), "blended") == []
    (tmp_path / "uap-blended" / "selection.json").write_text(
        json.dumps({"chosen": "uap-blended-random-differential-steer"}))
    assert _chosen_geometry(cfg, "blended") == ["--mode", "patch", "--patch-place", "random"]


@pytest.mark.slow
def test_pipeline_chooses_the_uap_on_the_val_split(cache, tmp_path, capsys):
    """--uap-candidates: a uap stage per candidate, then uap-select on the embedded data's
    validation split; ABD defends with the chosen file; no stage of the choice gets the
    target label."""
    from abd_fast.data.synthetic import ensure_dataset
    from abd_fast.cli.pipeline import QUICK_DATA
    if getattr(ensure_dataset(seed=0, **QUICK_DATA), "val_dir", None) is None:
        pytest.skip("the embedded data has no validation split on this branch (it comes with "
                    "the `data` branch's val split)")
    out = tmp_path / "run"
    _run(["--quick", "--attacks", "badnet", "--defenses", "abd", "--no-ablations",
          "--uap-candidates", "corner,linf:differential", "--scan-threshold", "40",
          "--output", out], capsys)
    sel = json.loads((out / "uap-badnet" / "selection.json").read_text())
    assert {c["name"] for c in sel["candidates"]} == {"uap-badnet-corner-paper",
                                                       "uap-badnet-linf-differential"}
    argv = json.loads((out / "uap-badnet" / "stage.json").read_text())["argv"]
    assert argv[0] == "uap-select" and "--target-label" not in argv and "--val-data" in argv
    assert argv[argv.index("--criterion") + 1] == "scan" and "scan" in sel
    # --scan-threshold reaches the choice's val scan and the victim's scan (reference mode),
    # not the clean model's (self mode); 40 is above any score here: nothing is flagged
    assert argv[argv.index("--scan-threshold") + 1] == "40.0"
    assert sel["scan"]["threshold"] == 40.0 and sel["scan"]["backdoored"] is False
    report = json.loads((out / "report.json").read_text())
    assert report["scan"]["badnet"]["model"]["threshold"] == 40.0
    assert report["scan"]["clean"]["threshold"] != 40.0
    assert report["settings"]["scan_threshold"] == 40.0
    assert (out / "uap-badnet" / "uap.pt").read_bytes() == \
        (Path(sel["chosen_file"])).read_bytes()
    # The report names the chosen candidate in the UAP-alone floor row.
    chosen = sel["chosen"].removeprefix("uap-badnet-")
    assert report["floors"]["badnet"]["uap"]["chosen"]["name"] == chosen
    assert f"| badnet | UAP alone ({chosen}) |" in (out / "report.md").read_text()
