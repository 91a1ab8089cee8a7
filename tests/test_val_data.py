"""--val-data: the validation split recipe choices are made on (the synthetic val split by
default on the synthetic data; none for user data without the flag), kept apart from the
evaluation and training data, and passed by the pipeline to the stages that make choices."""
import pytest

from abd_fast.cli.common import COMMON_DEFAULTS, Run, UsageError, require_val_data
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)


def _run(cfg_changes, tmp_path):
    cfg = dict(COMMON_DEFAULTS, command="uap", output=str(tmp_path), workers=0, loader="torch",
               **cfg_changes)
    return Run(cfg)


def test_val_images_default_on_synthetic_data(small_data, tmp_path, monkeypatch):  # noqa: F811
    import abd_fast.data.synthetic as synthetic
    monkeypatch.setattr(synthetic, "ensure_dataset", lambda seed=0: small_data)
    run = _run({}, tmp_path)
    source, images, classnames = run.val_images(1000, "the choice")
    assert run.val_source == source == small_data.val_dir != run.eval_source
    assert classnames == small_data.classnames and len(images) == 20


def test_val_images_user_data(small_data, tmp_path):  # noqa: F811
    user = {"train_data": str(small_data.csv), "eval_data": str(small_data.eval_dir)}
    with pytest.raises(UsageError, match="--val-data is needed: the UAP's geometry choice"):
        _run(user, tmp_path).val_images(10, "the UAP's geometry choice")
    with pytest.raises(UsageError, match="--val-data is needed: the UAP's geometry choice"):
        require_val_data(user, "the UAP's geometry choice")
    val = {**user, "val_data": str(small_data.val_dir)}
    require_val_data(val, "the UAP's geometry choice")
    _, _, classnames = _run(val, tmp_path).val_images(10, "the choice")
    assert classnames == small_data.classnames


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
