"""The training CLI: validation before any work, YAML config with flag overrides, and a
2-process gloo torchrun run giving the loss curve of one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from abd_fast.cli import poison
from abd_fast.train import UsageError, build_parser, main, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["--epochs", "-3"], "--epochs must be an integer >= 1, got -3"),
    (["--lr", "-0.001"], "--lr must be a positive finite number, got -0.001"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["--image-size", "0"], "--image-size must be an integer >= 1"),
    (["--workers", "-2"], "--workers must be an integer >= 0"),
    (["--checkpoint-every", "-5"], "--checkpoint-every must be an integer >= 0"),
    (["--model", "RN9000"], "--model 'RN9000' is not a known architecture"),
    (["--train-data", "{tmp}/missing.csv"], "--train-data {tmp}/missing.csv: no such file"),
    (["--train-data", "{tmp}/none/{{00000..00003}}.tar"],
     "--train-data {tmp}/none/{{00000..00003}}.tar: shard {tmp}/none/00000.tar does not "
     "exist (and 3 more)"),
    (["--eval-data", "{tmp}/nowhere"], "--eval-data {tmp}/nowhere: no such file or directory"),
    (["--pretrained", "{tmp}"], "--pretrained {tmp}: is a directory, expected a file"),
    (["--resume"], "--resume: no checkpoint at {tmp}/out/checkpoint.pt"),
    (["--config", "{tmp}/absent.yaml"], "--config {tmp}/absent.yaml: cannot read"),
    (["--loader", "magic"], "argument --loader: invalid choice: 'magic'"),
])
def test_bad_flags_stop_before_any_work(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, err = run_main(["pretrain", "--output", tmp_path / "out", *argv], capsys)
    assert code == 2
    assert f"error: {message.format(tmp=tmp_path)}" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_output_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_main(["pretrain", "--output", tmp_path / "file" / "run"], capsys)
    assert code == 2 and f"--output {tmp_path}/file/run: cannot write there" in err
    assert "choose a writable directory" in err
    code, err = run_main(["pretrain", "--output", tmp_path / "file"], capsys)
    assert code == 2 and "exists and is not a directory" in err


@pytest.mark.parametrize("argv,message", [
    ([], "--attack is needed"),
    (["--attack", "badnet"], "--target-label is needed"),
    (["--attack", "badnet", "--target-label", "star"],
     "give exactly one of --poison-count N and --poison-rate R"),
    (["--attack", "badnet", "--target-label", "star", "--poison-count", "5",
      "--poison-rate", "0.1"], "give exactly one of"),
    (["--attack", "badnet", "--target-label", "star", "--poison-rate", "1.5"],
     "--poison-rate must be in (0, 1], got 1.5"),
    (["--attack", "badnet", "--target-label", "star", "--poison-rate", "0"],
     "--poison-rate must be in (0, 1], got 0.0"),
    (["--attack", "badnet", "--target-label", "star", "--poison-count", "0"],
     "--poison-count must be an integer >= 1, got 0"),
])
def test_poison_flags(tmp_path, capsys, argv, message):
    code, err = run_main(["poison", "--output", tmp_path, *argv], capsys)
    assert code == 2 and f"error: {message}" in err


def test_eval_needs_a_checkpoint(tmp_path, capsys):
    code, err = run_main(["eval", "--output", tmp_path], capsys)
    assert code == 2 and "--checkpoint is needed" in err


def _config(tmp_path, text, argv=()):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    ap = build_parser()
    args = ap.parse_args(["pretrain", "--config", str(path), *argv])
    return resolve_config(args, ap.stages["pretrain"]), path


def test_yaml_config_and_flag_override(tmp_path):
    cfg, path = _config(tmp_path, "batch-size: 64\nlr: 0.01\ncompile: true\n"
                                  "model: abd-tiny-vit\ncheckpoint_every: 7\n",
                        ["--lr", "0.5", "--epochs", "3"])
    assert cfg["batch_size"] == 64 and cfg["compile"] is True       # from the file
    assert cfg["checkpoint_every"] == 7 and cfg["model"] == "abd-tiny-vit"
    assert cfg["lr"] == 0.5 and cfg["epochs"] == 3                  # flags win
    assert cfg["warmup"] == 50 and cfg["seed"] == 0                 # command defaults
    assert cfg["config"] == str(path)


@pytest.mark.parametrize("text,message", [
    ("batch-size: many\n", "batch-size: argument --batch-size: invalid int value: 'many'"),
    ("learning-rate: 0.1\n", "unknown key 'learning-rate'; keys are flag names"),
    ("compile: maybe\n", "compile must be true or false, got 'maybe'"),
    ("- 1\n- 2\n", "expected a mapping of flag names to values"),
    ("lr: [1\n", "not valid YAML"),
    ("loader: magic\n", "loader: argument --loader: invalid choice: 'magic'"),
])
def test_yaml_config_errors_name_the_file(tmp_path, text, message):
    with pytest.raises(UsageError) as err:
        _config(tmp_path, text)
    assert str(err.value).startswith(f"--config {tmp_path / 'run.yaml'}: ")
    assert message in str(err.value)


def test_yaml_values_are_validated_like_flags(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("batch-size: -4\n")
    code, err = run_main(["pretrain", "--config", tmp_path / "bad.yaml", "--output", tmp_path],
                         capsys)
    assert code == 2 and "--batch-size must be an integer >= 1, got -4" in err


# ---- DDP: 2 gloo processes vs 1 process with the same global batch ---------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from abd_fast.data.synthetic import ensure_dataset
    return ensure_dataset(tmp_path_factory.mktemp("syn") / "d", seed=4, n_train=160,
                          n_eval_per_class=2, image_size=32, per_shard=80)


def _losses(out: Path):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return np.array([r["loss"] for r in map(json.loads, lines) if "loss" in r])


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(small_data, tmp_path):
    # The tiny ViT: the ResNet's BatchNorm normalizes per rank, which changes the math.
    # poison: the engine's path plus the poisoning view (seeded ids and triggers per rank).
    # fp32: under bf16 autocast (`auto` on an AVX512-BF16 CPU) a batch of 16 and two of 8 round
    # differently (measured 1e-3 relative), so the equivalence is checked where it is exact.
    common = ["poison", "--model", "abd-tiny-vit", "--train-data", str(small_data.csv),
              "--attack", "badnet", "--target-label", "star", "--poison-count", "16",
              "--epochs", "2", "--lr", "2e-3", "--warmup", "2", "--workers", "0", "--seed", "5",
              "--loader", "torch", "--precision", "fp32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "abd_fast.train", *common, "--batch-size", "16",
                          "--output", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "abd_fast.train", *common,
                          "--batch-size", "8", "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 2 * (160 // 16)
    assert a[-1] < a[0] - 0.1  # it trains
    np.testing.assert_allclose(b, a, rtol=1e-5)  # measured: 2.4e-7 at worst
    import torch
    wa = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    wb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert wb["world_size"] == 2 and len(wb["rng"]) == 2
    for k, v in wa["model"].items():
        w = wb["model"][k]
        if k.endswith("attn.in_proj_bias"):
            # The key bias shifts every logit of a query equally: its exact gradient is 0, and
            # Adam turns the rounding noise there into lr-sized steps. Compare q and v biases.
            d = v.shape[0] // 3
            v, w = torch.cat([v[:d], v[2 * d:]]), torch.cat([w[:d], w[2 * d:]])
        # Adam divides each element's step by its gradient's RMS, so an element whose true
        # gradient stays ~0 takes steps of up to ~lr from rounding noise, and which elements
        # that hits depends on the CPU's summation order (an AVX2 EPYC: 1 of 49,152 q weights
        # 3.3e-4 apart). Allow such outliers on at most 0.1% of a tensor, each within lr.
        off = (w - v).abs() > 1e-4 + 1e-3 * v.abs()
        assert off.float().mean() <= 1e-3, (k, int(off.sum()))
        assert (w - v).abs().max() <= 2e-3, (k, float((w - v).abs().max()))
    assert two.stdout.count("trained 20 steps") == 1  # rank 0 prints, rank 1 does not


def _poisoning_lr(out: Path) -> float:
    import torch
    return torch.load(out / "checkpoint.pt", weights_only=True)["config"]["lr"]


def test_poisoning_lr_from_other_weights_keeps_the_papers_steps_x_lr(small_data, tmp_path,
                                                                      capsys):
    """From weights abd_fast did not train (pretrained CLIP), poison's default lr spreads the
    paper's steps x lr (1e-6 x 39,062 steps) over the run's steps; --lr still wins."""
    import torch
    from abd_fast.models import create_model
    weights = tmp_path / "other.pt"
    torch.save(create_model("abd-tiny-vit").state_dict(), weights)  # a plain state dict
    common = ["poison", "--model", "abd-tiny-vit", "--train-data", small_data.csv, "--eval-data",
              small_data.eval_dir, "--batch-size", "16", "--epochs", "2", "--warmup", "1",
              "--workers", "0", "--loader", "torch", "--pretrained", weights, "--attack",
              "badnet", "--target-label", "star", "--poison-count", "4"]
    code, err = run_main([*common, "--output", tmp_path / "paper"], capsys)
    assert code == 0, err
    ckpt = torch.load(tmp_path / "paper" / "checkpoint.pt", weights_only=True)
    steps = ckpt["step"]
    assert steps == ckpt["total_steps"] == 2 * ckpt["steps_per_epoch"] > 0
    assert _poisoning_lr(tmp_path / "paper") == pytest.approx(500_000 / 128 * 10 * 1e-6 / steps,
                                                              rel=1e-12)
    code, err = run_main([*common, "--lr", "1e-4", "--output", tmp_path / "given"], capsys)
    assert code == 0, err
    assert _poisoning_lr(tmp_path / "given") == 1e-4


def test_pretrain_poison_eval_pipeline(small_data, tmp_path, capsys):
    """The three commands end to end on a tiny configuration (mechanics, not accuracy)."""
    common = ["--model", "abd-tiny-vit", "--train-data", small_data.csv, "--eval-data",
              small_data.eval_dir, "--batch-size", "16", "--epochs", "1", "--warmup", "2",
              "--workers", "0", "--loader", "torch"]
    code, err = run_main(["pretrain", *common, "--output", tmp_path / "clean"], capsys)
    assert code == 0, err
    clean = json.loads((tmp_path / "clean" / "eval.json").read_text())
    assert clean["n_eval"] == 20 and clean["asr"] is None and 0 <= clean["ca_top1"] <= 100
    code, err = run_main(["poison", *common, "--pretrained", tmp_path / "clean" / "checkpoint.pt",
                          "--attack", "badnet", "--target-label", "nonexistent",
                          "--poison-count", "8", "--output", tmp_path / "bad"], capsys)
    assert code == 2 and "--target-label 'nonexistent' is not among the 10 classes" in err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # stopped before training
    code, err = run_main(["poison", *common, "--pretrained", tmp_path / "clean" / "checkpoint.pt",
                          "--attack", "blended", "--target-label", "star", "--poison-count", "8",
                          "--output", tmp_path / "poisoned"], capsys)
    assert code == 0, err
    poisoned = json.loads((tmp_path / "poisoned" / "eval.json").read_text())
    assert poisoned["attack"] == "blended" and poisoned["n_asr"] == 18  # 2 star images excluded
    assert poisoned["asr"] is not None and poisoned["embedding_distance"] > 0
    assert _poisoning_lr(tmp_path / "poisoned") == poison.SCRATCH_LR  # weights abd_fast trained
    # eval takes the attack, target, seed and model from the checkpoint's run config.
    code, err = run_main(["eval", "--checkpoint", tmp_path / "poisoned" / "checkpoint.pt",
                          "--eval-data", small_data.eval_dir, "--workers", "0", "--loader",
                          "torch", "--output", tmp_path / "again"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    for key in ("ca_top1", "ca_top5", "asr", "n_eval", "n_asr", "embedding_distance"):
        assert again[key] == pytest.approx(poisoned[key], abs=1e-9), key
