"""The defense stages through the CLI on a tiny configuration (mechanics, not accuracy):
uap (patch and L-inf, with and without the backdoor loss) and defend with every method,
each writing its outputs and an eval.json with the attack's ASR; validation errors."""
import json
import re
import shutil

import pytest
import torch

from abd_fast.defenses.uap import UAP, patch_geometry
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def victim(small_data, tmp_path_factory):  # noqa: F811
    """A clean tiny ViT and a blended victim of it (one epoch each)."""
    import abd_fast.train as cli
    out = tmp_path_factory.mktemp("victim")
    common = ["--model", "abd-tiny-vit", "--train-data", str(small_data.csv), "--eval-data",
              str(small_data.eval_dir), "--batch-size", "16", "--epochs", "1", "--warmup", "2",
              "--workers", "0", "--loader", "torch"]
    assert cli.main(["pretrain", *common, "--output", str(out / "clean")]) == 0
    assert cli.main(["poison", *common, "--pretrained", str(out / "clean" / "checkpoint.pt"),
                     "--attack", "blended", "--target-label", "star", "--poison-count", "16",
                     "--output", str(out / "poisoned")]) == 0
    yield out, common
    shutil.rmtree(out)  # two checkpoints: not kept to the session's end


def test_uap_patch_with_backdoor_loss(victim, tmp_path, capsys):
    out, common = victim
    code, err = run_main(["uap", *common, "--checkpoint", out / "poisoned" / "checkpoint.pt",
                          "--reference-model", out / "clean" / "checkpoint.pt", "--lr", "2e-4",
                          "--output", tmp_path / "uap"], capsys)
    assert code == 0, err
    uap = UAP.load(tmp_path / "uap" / "uap.pt")
    side, _ = patch_geometry(32)
    assert uap.mode == "patch" and uap.perturbation.shape == (3, side, side)
    assert 0 <= uap.perturbation.min() and uap.perturbation.max() <= 1
    result = json.loads((tmp_path / "uap" / "eval.json").read_text())
    assert result["asr"] is not None and result["embedding_distance"] > 0
    assert result["reference_model"] == str(out / "clean" / "checkpoint.pt")
    assert (tmp_path / "uap" / "uap_examples.png").stat().st_size > 0
    ckpt = torch.load(tmp_path / "uap" / "checkpoint.pt", weights_only=True)
    assert "z" in ckpt["model"] and set(ckpt["extra"]) == {"discriminator", "d_optimizer"}
    assert max(v.abs().max().item() for k, v in ckpt["extra"]["discriminator"].items()
               if k.endswith("weight")) <= 0.01 + 1e-7  # clipped after every D step


def test_uap_linf_without_backdoor_loss(victim, tmp_path, capsys):
    out, common = victim
    code, err = run_main(["uap", *common, "--checkpoint", out / "poisoned" / "checkpoint.pt",
                          "--mode", "linf", "--eps", "0.05", "--no-backdoor-loss",
                          "--output", tmp_path / "uap"], capsys)
    assert code == 0, err
    uap = UAP.load(tmp_path / "uap" / "uap.pt")
    assert uap.mode == "linf" and uap.perturbation.shape == (3, 32, 32)
    result = json.loads((tmp_path / "uap" / "eval.json").read_text())
    assert result["reference_model"].startswith("none: the poisoned model")
    assert uap.perturbation.abs().max() <= 0.05 + 1e-7


@pytest.mark.parametrize("mode,place", [("patch+linf", "random"), ("patch", "random")])
def test_uap_geometries_with_the_differential_loss(victim, tmp_path, capsys, mode, place):
    out, common = victim
    code, err = run_main(["uap", *common, "--checkpoint", out / "poisoned" / "checkpoint.pt",
                          "--reference-model", out / "clean" / "checkpoint.pt",
                          "--mode", mode, "--patch-place", place, "--bd-loss", "differential",
                          "--output", tmp_path / "uap"], capsys)
    assert code == 0, err
    uap = UAP.load(tmp_path / "uap" / "uap.pt")
    assert (uap.mode, uap.place) == (mode, place)
    ckpt = torch.load(tmp_path / "uap" / "checkpoint.pt", weights_only=True)
    # the differential loss's defaults: sign -1, lambda 10
    assert (ckpt["config"]["bd_loss"], ckpt["config"]["backdoor_loss_sign"],
            ckpt["config"]["lambda_bd"]) == ("differential", -1.0, 10.0)
    assert json.loads((tmp_path / "uap" / "eval.json").read_text())["asr"] is not None


def test_uap_steered_by_the_scan(victim, small_data, tmp_path, capsys):  # noqa: F811
    """--steer scan (our extension): the scan's target-free search on the validation images
    picks a class; eval.json records it; the run never needs the target. --scan-steps 5
    (both commands) keeps the search short."""
    out, common = victim
    val = str(small_data.val_dir)
    code, err = run_main(["uap", *common, "--checkpoint", out / "poisoned" / "checkpoint.pt",
                          "--reference-model", out / "clean" / "checkpoint.pt",
                          "--steer", "scan", "--val-data", val, "--scan-steps", "5",
                          "--output", tmp_path / "uap"], capsys)
    assert code == 0, err
    steer = json.loads((tmp_path / "uap" / "eval.json").read_text())["steer"]
    assert steer["mode"] == "reference" and steer["toward"] and steer["val_data"] == val
    assert isinstance(steer["backdoored"], bool) and steer["lambda_steer"] == 1.0
    # uap-select --val-scan reads the steered run's scan (val_scan.json) instead of making the
    # same search again: the same verdict and choice as scanning itself
    saved = tmp_path / "uap" / "val_scan.json"
    select = ["uap-select", *common, "--checkpoint", out / "poisoned" / "checkpoint.pt",
              "--reference-model", out / "clean" / "checkpoint.pt", "--val-data", val,
              "--candidates", tmp_path / "uap", "--criterion", "scan", "--scan-steps", "5"]
    selections = []
    for extra in ([], ["--val-scan", saved]):
        code, err = run_main([*select, *extra, "--output", tmp_path / f"sel{len(extra)}"], capsys)
        assert code == 0, err
        sel = json.loads((tmp_path / f"sel{len(extra)}" / "selection.json").read_text())
        selections.append({k: sel[k] for k in ("scan", "chosen", "score", "candidates")})
    assert selections[0] == selections[1] and selections[0]["scan"]["score"] == steer["score"]
    # --scan-threshold: the saved scan's verdict at another threshold (its score and most
    # anomalous class unchanged); flagged, the score is the gain on that class
    for threshold, flagged in ((-1.0, True), (1e6, False)):
        code, err = run_main([*select, "--val-scan", saved, "--scan-threshold", threshold,
                              "--output", tmp_path / f"t{flagged}"], capsys)
        assert code == 0, err
        sel = json.loads((tmp_path / f"t{flagged}" / "selection.json").read_text())
        assert sel["scan"]["threshold"] == threshold and sel["scan"]["backdoored"] is flagged
        assert sel["scan"]["score"] == steer["score"]
        anomalous = sel["scan"]["most_anomalous_class"]
        assert sel["scan"]["suspected_target"] == (anomalous if flagged else None)
        gain = sel["candidates"][0]["gain"]
        assert sel["score"] == (gain[anomalous] if flagged else max(gain.values()))
    # The weights are recognized by content: the same files elsewhere (a run directory moved
    # or copied) reuse the saved scan; another file does not, and neither does a file changed
    # in place. A val_scan.json from before contents were recorded is compared by path.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("poisoned", "clean"):
        shutil.copy(out / name / "checkpoint.pt", moved / f"{name}.pt")
    code, err = run_main([*select, "--checkpoint", moved / "poisoned.pt", "--reference-model",
                          moved / "clean.pt", "--val-scan", saved, "--output", tmp_path / "mv"],
                         capsys)
    assert code == 0, err
    sel = json.loads((tmp_path / "mv" / "selection.json").read_text())
    assert {k: sel[k] for k in ("scan", "chosen", "score")} == \
        {k: selections[0][k] for k in ("scan", "chosen", "score")}
    legacy = json.loads(saved.read_text())
    for key in ("checkpoint", "reference_model"):
        del legacy["inputs"][f"{key}_sha256"]
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    assert run_main([*select, "--val-scan", tmp_path / "legacy.json", "--output",
                     tmp_path / "lg"], capsys)[0] == 0
    code, err = run_main([*select, "--checkpoint", moved / "poisoned.pt", "--val-scan",
                          tmp_path / "legacy.json", "--output", tmp_path / "lg2"], capsys)
    assert code == 2 and "other checkpoint than this run" in err, err
    with open(moved / "poisoned.pt", "ab") as f:
        f.write(b"\0")
    code, err = run_main([*select, "--checkpoint", moved / "poisoned.pt", "--reference-model",
                          moved / "clean.pt", "--val-scan", saved, "--output", tmp_path / "mv2"],
                         capsys)
    assert code == 2 and re.search(r"--val-scan .* other checkpoint than this run \(.*"
                                   r"poisoned.pt', contents differ\)", err), err
    # another seed's or step count's search is not this one; --val-scan and --scan-steps
    # belong to --criterion scan
    for extra, says in ((["--seed", "3", "--val-scan", saved], "--val-scan .* other seed"),
                        (["--scan-steps", "6", "--val-scan", saved],
                         "--val-scan .* other steps than this run \\(5 vs 6\\)"),
                        (["--criterion", "gain", "--val-scan", saved],
                         "--val-scan is the scan's result for --criterion scan"),
                        (["--criterion", "gain", "--scan-threshold", "3"],
                         "--scan-threshold is the scan's threshold for --criterion scan"),
                        (["--scan-threshold", "inf"],
                         "--scan-threshold must be a finite number, got inf"),
                        (["--criterion", "gain"], "--scan-steps sets the target search's "
                                                  "steps, which only --criterion scan runs")):
        code, err = run_main([*select, *extra, "--output", tmp_path / "o"], capsys)
        assert code == 2 and re.search(says, err), err


@pytest.mark.parametrize("method,extra", [
    ("abd", []), ("abd", ["--abd-objective", "replace"]), ("abd", ["--no-adv"]),
    ("abd", ["--abd-objective", "union", "--adv-view", "autoaugment"]),
    ("cleanclip", []), ("roclip", ["--epochs", "2", "--break-epoch", "2"]), ("ft", [])])
def test_defend_methods_run_and_report_asr(victim, tmp_path, capsys, method, extra):
    out, common = victim
    uap_dir = tmp_path / "uap"
    if method == "abd" and "--no-adv" not in extra:
        code, err = run_main(["uap", *common, "--checkpoint", out / "poisoned" / "checkpoint.pt",
                              "--output", uap_dir], capsys)
        assert code == 0, err
        extra = [*extra, "--uap", uap_dir / "uap.pt"]
    code, err = run_main(["defend", *common, "--method", method,
                          "--checkpoint", out / "poisoned" / "checkpoint.pt", *extra,
                          "--output", tmp_path / "defended"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "defended" / "eval.json").read_text())
    # The attack, target and seed come from the poisoned checkpoint's run.
    assert result["attack"] == "blended" and result["target_label"] == "star"
    assert result["asr"] is not None and result["n_asr"] == 18
    ckpt = torch.load(tmp_path / "defended" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["method"] == method
    if method == "roclip":
        assert ckpt["extra"]["text_bank"]["count"] > 0


def _steps(out):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_defend_records_its_budget_against_the_poisoning(victim, tmp_path, capsys):
    """--budget paper: batch 64, the poisoning's steps, steps x lr = 3x the poisoning's, pairs
    = steps x 64 / epochs; eval.json states it (and --budget fixed its own flags' budget)."""
    out, common = victim
    poisoned = torch.load(out / "poisoned" / "checkpoint.pt", weights_only=True)
    p_steps, p_lr = poisoned["step"], poisoned["config"]["lr"]
    code, err = run_main(["defend", *common, "--method", "ft", "--checkpoint",
                          out / "poisoned" / "checkpoint.pt", "--budget", "paper", "--epochs",
                          "5", "--output", tmp_path / "paper"], capsys)
    assert code == 0, err
    b = json.loads((tmp_path / "paper" / "eval.json").read_text())["budget"]
    assert b["rule"] == "paper" and b["steps"] == p_steps == _steps(tmp_path / "paper")[-1]
    assert b["lr"] == pytest.approx(3 * p_lr) and b["ratio"] == pytest.approx(3.0)
    assert (b["batch_size"], b["epochs"], b["pairs"]) == (64, 5, p_steps // 5 * 64)
    assert b["poisoning"]["steps"] == p_steps and b["poisoning"]["lr"] == p_lr
    cfg = torch.load(tmp_path / "paper" / "checkpoint.pt", weights_only=True)["config"]
    assert (cfg["batch_size"], cfg["max_samples"]) == (64, b["pairs"])
    # fixed: the flags' budget (batch 16, 1 epoch over all 160 pairs), stated the same way
    code, err = run_main(["defend", *common, "--method", "ft", "--checkpoint",
                          out / "poisoned" / "checkpoint.pt", "--output", tmp_path / "fixed"],
                         capsys)
    assert code == 0, err
    b = json.loads((tmp_path / "fixed" / "eval.json").read_text())["budget"]
    assert b["rule"] == "fixed" and b["steps"] == _steps(tmp_path / "fixed")[-1] == 160 // 16
    assert b["pairs"] == 160 and b["lr"] == 3e-4
    assert b["ratio"] == pytest.approx(b["steps"] * 3e-4 / (p_steps * p_lr))


def test_paper_budget_needs_a_poisoning_record_and_enough_pairs(victim, tmp_path, capsys):
    out, common = victim
    code, err = run_main(["defend", *common, "--method", "ft", "--checkpoint",
                          out / "clean" / "checkpoint.pt", "--budget", "paper",
                          "--output", tmp_path / "a"], capsys)
    assert code == 2 and "has no such record" in err and "--budget fixed" in err
    # 10 poisoning steps in 1 epoch of 2 steps of 64: 640 pairs, the data has 160
    code, err = run_main(["defend", *common, "--method", "ft", "--checkpoint",
                          out / "poisoned" / "checkpoint.pt", "--budget", "paper", "--epochs",
                          "1", "--output", tmp_path / "b"], capsys)
    assert code == 2 and "need 640 clean pairs, the training data has 160" in err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("argv,message", [
    (["defend", "--method", "ft", "--budget-steps", "5"], "--budget-steps applies to --budget"),
    (["defend", "--method", "ft", "--budget", "paper", "--budget-ratio", "0"],
     "--budget-ratio must be"),
    (["uap", "--eps", "-0.1", "--mode", "linf"], "--eps must be in (0, 1], got -0.1"),
    (["uap", "--patch-area", "0"], "--patch-area must be in (0, 1], got 0.0"),
    (["uap", "--reference-model", "{tmp}/nope.pt"], "--reference-model {tmp}/nope.pt: no such"),
    (["uap", "--bd-loss", "differential"], "--bd-loss differential compares the poisoned"),
    (["uap", "--patch-place", "middle"], "argument --patch-place: invalid choice: 'middle'"),
    (["uap", "--steer", "scan", "--train-data", "{tmp}"], "--val-data is needed"),
    (["uap", "--scan-steps", "0"], "--scan-steps must be an integer >= 1, got 0"),
    (["uap", "--scan-steps", "3"], "--scan-steps sets the target search's steps, which only "
                                   "--steer scan runs"),
    (["defend", "--method", "abd"], "--method abd needs --uap FILE"),
    (["defend", "--method", "magic"], "argument --method: invalid choice: 'magic'"),
    (["defend", "--method", "roclip", "--break-epoch", "0"], "--break-epoch must be an integer"),
    (["defend", "--method", "abd", "--uap", "{tmp}/none.pt"], "--uap {tmp}/none.pt: no such"),
])
def test_defense_flags_are_validated_before_any_work(victim, tmp_path, capsys, argv, message):
    out, _ = victim
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, err = run_main([*argv, "--checkpoint", out / "poisoned" / "checkpoint.pt",
                          "--output", tmp_path / "o"], capsys)
    assert code == 2, err
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_defend_needs_the_poisoned_checkpoint(tmp_path, capsys):
    code, err = run_main(["defend", "--method", "ft", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "--checkpoint is needed" in err
