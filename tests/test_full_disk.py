"""A full disk while writing a checkpoint: the previous checkpoint stays valid, no partial
file is left, and the error says what happened and how to continue. Tested on a real
filesystem that runs out of space (a 1.5-checkpoint tmpfs; needs mount rights) and on a
write failure injected into the save (always)."""
import errno
import os
import shutil
import subprocess

import pytest
import torch

from abd_fast.engine import CheckpointWriteError, load_checkpoint
from test_engine import make_trainer, noisy_mmcl, small_data  # noqa: F401 (fixture)


def _mount_tmpfs(path, size_bytes) -> str | None:
    """Mounts a tmpfs of size_bytes at path; returns why not when it cannot."""
    if shutil.which("mount") is None:
        return "no mount command"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount refused: {r.stderr.strip()}"


def _check_failed_save(trainer, out, first_step):
    with pytest.raises(CheckpointWriteError) as err:
        trainer.save()
    msg = str(err.value)
    assert f"could not write the checkpoint of step {trainer.step}" in msg
    assert f"previous checkpoint {out / 'checkpoint.pt'} (step {first_step}) is intact" in msg
    assert "rerun with --resume" in msg
    assert load_checkpoint(out / "checkpoint.pt")["step"] == first_step   # still valid
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def test_full_filesystem_keeps_the_previous_checkpoint(small_data, tmp_path):
    out = tmp_path / "tiny-fs"
    out.mkdir()
    probe = make_trainer(small_data, tmp_path / "probe", noisy_mmcl(), epochs=1)
    probe.fit()
    size = (tmp_path / "probe" / "checkpoint.pt").stat().st_size
    why = _mount_tmpfs(out, int(size * 1.5) // 4096 * 4096)
    if why:
        pytest.skip(f"cannot make a small filesystem here ({why}); "
                    "test_injected_write_failure covers the logic")
    try:
        trainer = make_trainer(small_data, out, noisy_mmcl(), epochs=1)
        trainer.fit()                       # the first checkpoint fits
        first = trainer.step
        trainer.step += 1                   # a later step: its checkpoint no longer fits
        _check_failed_save(trainer, out, first)
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_injected_write_failure(small_data, tmp_path, monkeypatch):
    trainer = make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=1)
    trainer.fit()
    first = trainer.step
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    trainer.step += 1
    _check_failed_save(trainer, tmp_path, first)
    monkeypatch.setattr(torch, "save", real_save)


def test_background_write_failure_is_raised_when_waited_for(small_data, tmp_path, monkeypatch):
    """A periodic checkpoint written by save_in_background's thread that cannot be written:
    the failure (its step) is raised at the next wait or save, the previous checkpoint stays
    valid, no temporary is left, and the next save writes."""
    trainer = make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=1)
    trainer.fit()
    first = trainer.step

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full_disk)
    trainer.step += 1
    trainer.save_in_background()
    with pytest.raises(CheckpointWriteError) as err:
        trainer.wait_for_checkpoint()
    monkeypatch.undo()
    msg = str(err.value)
    assert f"could not write the checkpoint of step {first + 1}" in msg
    assert f"(step {first}) is intact" in msg and "rerun with --resume" in msg
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    trainer.wait_for_checkpoint()              # reported once
    trainer.save()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == first + 1
