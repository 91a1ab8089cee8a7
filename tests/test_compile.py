"""--compile: the Trainer compiles its model once per stage (fixed shapes: no recompile from
step to step or epoch to epoch), a later stage that differs only in lr, epochs or weights
reuses the compiled graphs, and the graphs land in $ABD_FAST_CACHE/inductor, from where a
later run loads them instead of compiling again. On a toy CLIP (seconds to compile; the
demo model takes 60-90 s cold)."""
import pytest
import torch
from torch._dynamo.utils import counters

from abd_fast import engine
from abd_fast.engine import Trainer
from test_precision import FakeLoader, ToyClip, toy_loss


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ABD_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine, "_USER_INDUCTOR_CACHE", None)
    torch._dynamo.reset()
    counters.clear()
    yield tmp_path / "cache" / "inductor"
    torch._dynamo.reset()


def fit(tmp_path, name, lr, epochs):
    trainer = Trainer(ToyClip(), FakeLoader(), toy_loss(), lr=lr, epochs=epochs, warmup=0,
                      output_dir=tmp_path / name, compile=True, progress=False)
    return trainer.fit()


@pytest.mark.slow
def test_compiled_once_per_shape_and_reused_across_stages_and_runs(tmp_path, fresh_cache):
    summary = fit(tmp_path, "a", lr=1e-2, epochs=2)      # 6 steps over 2 epochs
    assert summary["step"] == 6
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1
    assert any(fresh_cache.iterdir())                     # under $ABD_FAST_CACHE/inductor
    fit(tmp_path, "b", lr=3e-4, epochs=1)                 # another stage: new lr, new weights
    assert counters["frames"]["total"] == 1               # the compiled code served it
    torch._dynamo.reset()                                 # as a new process would start
    hits = counters["aot_autograd"]["autograd_cache_hit"]
    fit(tmp_path, "c", lr=1e-3, epochs=1)
    assert counters["aot_autograd"]["autograd_cache_hit"] > hits  # loaded from the disk cache


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_compile_per_loop(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)  # a C++ compiler
    monkeypatch.setenv(engine.COMPILE_ENV, "1")
    assert set(engine.COMPILE_DEFAULTS[device]) == set(engine.LOOPS)
    for loop in engine.LOOPS:
        assert engine.default_compile(loop) == engine.COMPILE_DEFAULTS[device][loop]
    monkeypatch.setenv(engine.COMPILE_ENV, "0")
    assert not any(engine.default_compile(loop) for loop in engine.LOOPS)
