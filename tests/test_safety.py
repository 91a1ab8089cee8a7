"""Files a run reads that could carry pickled code (checkpoints to resume, UAP files, trigger
patches) are read with weights_only=True: a payload is refused with a clear error and never
runs. (Model weights: tests/test_models.py.)"""
import torch

from test_models import _Payload
from test_train_cli import run_main, small_data  # noqa: F401 (fixture)


def _evil(path, marker):
    torch.save({"format": "abd_fast.checkpoint", "version": 1, "x": _Payload(marker)}, path)
    return path


def test_resume_refuses_a_pickled_payload(tmp_path, capsys):
    marker = tmp_path / "executed"
    evil = _evil(tmp_path / "checkpoint.pt", marker)
    code, err = run_main(["pretrain", "--output", tmp_path, "--resume", evil], capsys)
    assert code == 1 and f"--resume {evil}: not a readable abd_fast checkpoint" in err
    assert not marker.exists()


def test_uap_and_patch_files_refuse_pickled_payloads(tmp_path):
    import pytest

    from abd_fast.attacks.triggers import load_patch
    from abd_fast.defenses.uap import UAP
    marker = tmp_path / "executed"
    evil = _evil(tmp_path / "x.pt", marker)
    with pytest.raises(ValueError, match="--uap .*not a readable UAP file"):
        UAP.load(evil)
    with pytest.raises(ValueError, match="patch file .*not a PNG or a tensor file"):
        load_patch(evil)
    assert not marker.exists()
