"""--val-data: the validation split recipe choices are made on (the synthetic val split by
default on the synthetic data; none for user data without the flag), kept apart from the
evaluation and training data, and passed by the pipeline to the stages that make choices."""
import pytest

from abd_fast.cli.common import COMMON_DEFAULTS, Run
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)


def _run(cfg_changes, tmp_path):
    cfg = dict(COMMON_DEFAULTS, command="uap", output=str(tmp_path), workers=0, loader="torch",
               **cfg_changes)
    return Run(cfg)


def test_val_loader_default_on_synthetic_data(small_data, tmp_path, monkeypatch):  # noqa: F811
    import abd_fast.data.synthetic as synthetic
    monkeypatch.setattr(synthetic, "ensure_dataset", lambda seed=0: small_data)
    run = _run({}, tmp_path)
    val = run.val_loader("the choice")
    assert run.val_source == small_data.val_dir != run.eval_source
    b = next(iter(val))
    assert val.classnames == small_data.classnames and len(b.labels) == 20


def test_val_loader_user_data(small_data, tmp_path, capsys):  # noqa: F811
    user = {"train_data": str(small_data.csv), "eval_data": str(small_data.eval_dir)}
    assert _run(user, tmp_path).val_loader("the UAP's geometry choice") is None
    out = capsys.readouterr().out
    assert "no validation data: the UAP's geometry choice is unavailable; give --val-data" in out
    val = _run({**user, "val_data": str(small_data.val_dir)}, tmp_path).val_loader()
    assert val.classnames == small_data.classnames


@pytest.mark.parametrize("same", ["eval", "train"])
def test_val_data_must_be_apart(small_data, tmp_path, capsys, same):  # noqa: F811
    path = {"eval": small_data.eval_dir, "train": small_data.csv}[same]
    code, err = run_main(["eval", "--checkpoint", small_data.csv, "--train-data", small_data.csv,
                          "--eval-data", small_data.eval_dir, "--val-data", path, "--output",
                          tmp_path], capsys)
    assert code == 2 and f"--val-data {path} is the --{same}-data" in err
    code, err = run_main(["pipeline", "--train-data", small_data.csv, "--eval-data",
                          small_data.eval_dir, "--target-label", "star", "--val-data", path,
                          "--output", tmp_path / "p"], capsys)
    assert code == 2 and f"--val-data {path} is the --{same}-data" in err


def test_pipeline_passes_val_data_to_the_choosing_stages(small_data):  # noqa: F811
    from abd_fast.cli.pipeline import PIPELINE_DEFAULTS, VAL_COMMANDS, _StageFlags
    cfg = dict(PIPELINE_DEFAULTS, attacks=["badnet"], defenses=["abd"], stage_flags={})
    data = dict(train=str(small_data.csv), eval=str(small_data.eval_dir),
                val=str(small_data.val_dir), classnames=None, target="star")
    flags = _StageFlags(cfg, data)
    assert "--val-data" not in flags.common + flags.victim     # pretrain/poison/scan: unchanged
    for key in ("uap", "defend", "defend:abd"):
        assert key.partition(":")[0] in VAL_COMMANDS
        argv = flags.of(*((key,) if ":" not in key else ("defend", key)))
        assert argv[argv.index("--val-data") + 1] == str(small_data.val_dir)
    assert "--val-data" not in _StageFlags(cfg, dict(data, val=None)).of("uap")
