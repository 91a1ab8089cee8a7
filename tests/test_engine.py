"""Training engine pieces: schedule, parameter groups, atomic checkpoints."""
import math

import pytest
import torch

from abd_fast.engine import atomic_save, clamp_logit_scale, lr_at, make_optimizer, param_groups


@pytest.mark.parametrize("warmup,total", [(50, 1000), (0, 7), (3, 10), (10, 5), (1, 2)])
def test_schedule_formula(warmup, total):
    base = 3e-4
    lrs = [lr_at(s, base, warmup, total) for s in range(total)]
    w = max(0, min(warmup, total - 2))
    for s, lr in enumerate(lrs):
        if s < w:
            expected = base * (s + 1) / (w + 1)
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - 1 - w)))
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert lrs[-1] == 0.0                       # exactly 0 on the last step
    assert lrs[0] > 0                           # the first step learns
    assert max(lrs) == pytest.approx(base)      # the peak is the base rate, on step w
    assert lrs[w] == pytest.approx(base)
    assert all(a <= b for a, b in zip(lrs[:w], lrs[1:w + 1]))           # warmup rises
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1:]))            # cosine falls
    with pytest.raises(ValueError):
        lr_at(total, base, warmup, total)


def test_param_groups_exclude_norms_biases_and_logit_scale():
    from abd_fast.models import create_model
    model = create_model("abd-tiny-vit")
    no_decay, decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in nd and not d & nd
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(".ln_" in n or n.startswith("ln_") for n in nd) and any("bias" in n for n in nd)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = make_optimizer(model, 1e-3)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def _table_and_head(sparse: bool, width: int = 16):
    torch.manual_seed(0)
    return torch.nn.Embedding(50, width, sparse=sparse), torch.nn.Linear(width, 3)


def _adamw(cls, emb, head, **kw):
    groups = [{"params": [head.bias], "weight_decay": 0.0},
              {"params": [head.weight, emb.weight], "weight_decay": 0.1}]
    return cls(groups, lr=1e-2, fused=True, **kw)


def _backward(opt, emb, head, ids, t, dense=False):
    """Step t's gradient: rows below min(6 + 2t, 50) looked up; before step 12 row 49 too, with
    a zero gradient; at step 5 none (the table gets no gradient). The lr changes every step."""
    for g in opt.param_groups:
        g["lr"] = 1e-2 * (t + 1) / 24
    opt.zero_grad(set_to_none=True)
    if t == 5:
        head.weight.sum().backward()
        return
    x = emb(torch.cat([ids, torch.full((len(ids), 1), 49)], 1) if t < 12 else ids)
    if t < 12:
        x = torch.cat([x[:, :-1], 0 * x[:, -1:]], 1)
    head(x).square().sum().backward()
    if dense and emb.weight.grad.is_sparse:
        emb.weight.grad = emb.weight.grad.coalesce().to_dense()


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_row_adamw_is_fused_adamw_to_the_bit(sparse):
    """SparseRowAdamW gives torch's fused AdamW's parameters and moments exactly (the same
    gradients): while few rows have had a gradient (its kernel call on them after the whole
    table's decay), once half have (the whole table), on a step without a gradient for the
    table, from a sparse or a dense gradient. Resumed from its state at step 9 (its rows then
    recomputed from the moments, without row 49, looked up with a zero gradient), it and a
    plain fused AdamW go on to the same end."""
    import copy

    from abd_fast.engine import SparseRowAdamW
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, min(6 + 2 * t, 50), (5, 3), generator=gen) for t in range(24)]
    emb, head = _table_and_head(sparse)
    opt = _adamw(SparseRowAdamW, emb, head, table=emb.weight)
    ref_emb, ref_head = copy.deepcopy(emb), copy.deepcopy(head)
    ref = _adamw(torch.optim.AdamW, ref_emb, ref_head)
    ours, theirs = [head.bias, head.weight, emb.weight], [ref_head.bias, ref_head.weight,
                                                         ref_emb.weight]
    for t, ids in enumerate(batches):
        _backward(opt, emb, head, ids, t)
        for g in ref.param_groups:
            g["lr"] = 1e-2 * (t + 1) / 24
        for p, q in zip(ours, theirs):
            q.grad = None if p.grad is None else (
                p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad.clone())
        assert (emb.weight.grad is None) == (t == 5)
        assert t == 5 or emb.weight.grad.is_sparse == sparse
        opt.step()
        ref.step()
        assert all(torch.equal(p, q) for p, q in zip(ours, theirs)), t
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[emb.weight][k], ref.state[ref_emb.weight][k]), (t, k)
        if t == 8:
            # gathered rows; a sparse gradient brings row 49, a dense one does not
            assert (49 in opt.rows.tolist()) == sparse and len(opt.rows) < 25
            saved = (copy.deepcopy(emb), copy.deepcopy(head), copy.deepcopy(opt.state_dict()))
    assert len(opt.rows) >= 25  # the last steps: the whole table
    for cls in (SparseRowAdamW, torch.optim.AdamW):
        e, h, state = copy.deepcopy(saved)
        o = _adamw(cls, e, h, **({"table": e.weight} if cls is SparseRowAdamW else {}))
        o.load_state_dict(state)
        assert not o.state[e.weight]["exp_avg_sq"][49].any()  # so not in the recomputed rows
        for t in range(9, 24):
            _backward(o, e, h, batches[t], t, dense=cls is not SparseRowAdamW)
            o.step()
        assert torch.equal(e.weight, emb.weight) and torch.equal(h.weight, head.weight), cls


def test_sparse_rows_where_and_when():
    """make_optimizer takes SparseRowAdamW where asked for and the table's rows are whole
    vectors for the kernel; abd_fast.precision.sparse_rows: on a CPU, but for an explicit
    fp32 (a Trainer's choice: test_trainer_learns_and_logs)."""
    from abd_fast.engine import SparseRowAdamW
    from abd_fast.models import create_model
    from abd_fast.precision import sparse_rows
    model = create_model("abd-tiny-vit")
    assert type(make_optimizer(model, 1e-3)) is torch.optim.AdamW
    assert type(make_optimizer(model, 1e-3, sparse_rows=True)) is SparseRowAdamW
    model.token_embedding = torch.nn.Embedding(49408, 120)
    assert type(make_optimizer(model, 1e-3, sparse_rows=True)) is torch.optim.AdamW
    emb, head = _table_and_head(True, width=20)
    with pytest.raises(ValueError, match="multiple of 16"):
        _adamw(SparseRowAdamW, emb, head, table=emb.weight)
    assert sparse_rows("auto", "cpu") and sparse_rows("bf16", "cpu") and sparse_rows(None, "cpu")
    assert not sparse_rows("fp32", "cpu") and not sparse_rows("auto", "cuda")


def test_logit_scale_clamp():
    from abd_fast.models import create_model
    model = create_model("abd-tiny-vit")
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise OSError("No space left on device")
    with pytest.raises(OSError, match="No space"):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


# ---- the Trainer on a small synthetic dataset (tiny ViT, 32 px) ------------------------------

import json  # noqa: E402
import random  # noqa: E402
import warnings  # noqa: E402

from abd_fast.engine import (CheckpointError, NonFiniteLossError, Trainer,  # noqa: E402
                             contrastive_loss, is_abd_checkpoint, load_checkpoint,
                             seed_everything, strip_checkpoint)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from abd_fast.data.synthetic import ensure_dataset
    return ensure_dataset(tmp_path_factory.mktemp("syn") / "d", seed=3, n_train=200,
                          n_eval_per_class=2, image_size=32, per_shard=100)


class Crash(Exception):
    """Stands for a SIGKILL in the middle of a run."""


def noisy_mmcl(model_name="abd-tiny-vit", crash_at=None, nan_at=None):
    """MMCL with randomness from every global RNG (torch noise on the images, python and
    numpy caption dropout), so an exact resume must restore them all."""
    import numpy as np

    from abd_fast.models import get_tokenizer
    from abd_fast.ops import normalize_images
    tok, loss, calls = get_tokenizer(model_name), contrastive_loss(DistInfoDefault()), [0]
    mean, std = torch.tensor([0.48, 0.46, 0.41]), torch.tensor([0.27, 0.26, 0.28])

    def loss_fn(model, batch, epoch):
        calls[0] += 1
        if crash_at is not None and calls[0] == crash_at:
            raise Crash
        x = normalize_images(batch.images, mean, std)
        x = x + 0.05 * torch.randn_like(x)
        caps = [c if random.random() < 0.9 and np.random.rand() < 0.9 else "a shape."
                for c in batch.captions]
        img, txt, scale = model(x, tok(caps))
        out = loss(img, txt, scale)
        return out * float("nan") if nan_at is not None and calls[0] == nan_at else out
    return loss_fn


def DistInfoDefault():
    from abd_fast.engine import DistInfo
    return DistInfo()


def make_trainer(data, out, loss_fn, *, init_seed=0, **kw):
    from abd_fast.data import build_loader
    from abd_fast.models import create_model
    seed_everything(init_seed)
    model = create_model("abd-tiny-vit")
    loader = build_loader(data.csv, train=True, batch_size=24, image_size=32, loader="torch",
                          num_workers=0, seed=1)
    kw = {"lr": 2e-3, "epochs": 2, "warmup": 3, "seed": 1, "progress": False, **kw}
    return Trainer(model, loader, loss_fn, output_dir=out, **kw)


def test_trainer_learns_and_logs(small_data, tmp_path):
    trainer = make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=3, config={"note": "x"})
    assert trainer.steps_per_epoch == 200 // 24 and trainer.total_steps == 3 * 8
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    assert result["step"] == 24 and math.isfinite(result["loss"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "epoch_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25)) and len(epochs) == 3
    assert [r["lr"] for r in steps] == [lr_at(s, 2e-3, 3, 24) for s in range(24)]
    assert epochs[-1]["epoch_loss"] < epochs[0]["epoch_loss"]  # it learns
    assert all(r["images_per_s"] > 0 for r in steps)
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "token_embedding.weight" in changed and "visual.conv1.weight" in changed
    assert trainer.model.logit_scale.item() <= math.log(100)
    # --precision auto on a CPU: the token embedding's rows (sparse during fit only)
    from abd_fast.engine import SparseRowAdamW
    assert type(trainer.optimizer) is SparseRowAdamW and not trainer.model.token_embedding.sparse
    fp32 = make_trainer(small_data, tmp_path / "fp32", noisy_mmcl(), precision="fp32")
    assert type(fp32.optimizer) is torch.optim.AdamW


def test_checkpoint_contents_and_safe_loading(small_data, tmp_path):
    from abd_fast.models import create_model, load_weights
    trainer = make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=1, checkpoint_every=5,
                           config={"model": "abd-tiny-vit", "lr": 2e-3})
    trainer.fit()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no code can run
    assert ckpt["format"] == "abd_fast.checkpoint" and ckpt["version"] == 1
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch"]) == (8, 1, 0)
    assert ckpt["total_steps"] == 8 and ckpt["world_size"] == 1 and ckpt["seed"] == 1
    assert ckpt["config"] == {"model": "abd-tiny-vit", "lr": 2e-3}
    assert set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert len(ckpt["optimizer"]["state"]) == len(list(trainer.model.parameters()))
    assert "scale" in ckpt["scaler"] or ckpt["scaler"] == {}
    fresh = create_model("abd-tiny-vit")
    load_weights(fresh, tmp_path / "checkpoint.pt")  # the models' safe loader reads it too
    for (k, a), b in zip(fresh.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.equal(a, b), k

    # Stripped (a finished pipeline stage): weights and config stay, resume state goes.
    size = (tmp_path / "checkpoint.pt").stat().st_size
    strip_checkpoint(tmp_path / "checkpoint.pt")
    stripped = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(ckpt) - set(stripped) == {"optimizer", "scaler", "rng", "extra"}
    assert all(torch.equal(stripped["model"][k], v) for k, v in ckpt["model"].items())
    assert stripped["config"] == ckpt["config"] and stripped["step"] == 8
    assert (tmp_path / "checkpoint.pt").stat().st_size < size / 2  # AdamW: 2 moments per weight
    load_weights(create_model("abd-tiny-vit"), tmp_path / "checkpoint.pt")
    assert is_abd_checkpoint(tmp_path / "checkpoint.pt")  # ours, stripped or not
    # Other weights (poison's default lr differs for them): a plain state dict, safetensors,
    # a TorchScript archive (without torch.load's warning about it), any other file.
    from safetensors.torch import save_file
    torch.save(fresh.state_dict(), tmp_path / "plain.pt")
    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    (tmp_path / "text.pt").write_text("weights")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("plain.pt", "w.safetensors", "scripted.pt", "text.pt", "absent.pt"):
            assert not is_abd_checkpoint(tmp_path / name), name
    with pytest.raises(CheckpointError, match="weights only .* nothing to resume; load it with "
                                              "--pretrained or --checkpoint"):
        make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=1,
                     config={"model": "abd-tiny-vit", "lr": 2e-3},
                     resume=tmp_path / "checkpoint.pt")


def test_background_checkpoint_is_a_snapshot_of_its_step(small_data, tmp_path):
    """save_in_background serializes before returning: training on (here: every weight
    changed at once) does not reach the file, which equals a synchronous save's."""
    trainer = make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=1)
    trainer.fit()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.save_in_background()
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    trainer.wait_for_checkpoint()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.equal(saved["model"][k], v) for k, v in before.items())
    trainer.model.load_state_dict(before)
    trainer.save()
    again = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(again) == set(saved) and again["step"] == saved["step"]
    assert all(torch.equal(again["model"][k], v) for k, v in saved["model"].items())


@pytest.mark.parametrize("every,crash_at", [(3, 6), (4, 10)])  # mid-epoch; epoch boundary
def test_resume_mid_run_is_exact(small_data, tmp_path, every, crash_at):
    full = make_trainer(small_data, tmp_path / "full", noisy_mmcl())
    full.fit()
    first = make_trainer(small_data, tmp_path / "cut", noisy_mmcl(crash_at=crash_at),
                         checkpoint_every=every)
    with pytest.raises(Crash):
        first.fit()
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    last = (crash_at - 1) // every * every
    assert saved["step"] == last and (saved["epoch"], saved["batch"]) == divmod(last, 8)
    # A new process: another init and other RNG states, all replaced by the checkpoint.
    resumed = make_trainer(small_data, tmp_path / "cut", noisy_mmcl(), init_seed=99,
                           checkpoint_every=every, resume=tmp_path / "cut" / "checkpoint.pt")
    assert resumed.step == last
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(full.optimizer.state_dict()["state"].items(),
                         resumed.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(a[n], b[n]) for n in a), k

    def losses(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # redone steps not repeated


def test_resume_refuses_another_runs_checkpoint(small_data, tmp_path):
    make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=1).fit()
    with pytest.raises(CheckpointError, match="different run: total_steps 8 \\(now 16\\)"):
        make_trainer(small_data, tmp_path, noisy_mmcl(), epochs=2,
                     resume=tmp_path / "checkpoint.pt")
    (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights.pt: not a readable"):
        load_checkpoint(tmp_path / "weights.pt")


def test_nan_loss_stops_keeping_last_good_checkpoint(small_data, tmp_path):
    trainer = make_trainer(small_data, tmp_path, noisy_mmcl(nan_at=6), checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5 \(epoch 0, batch 5\)"
                       r".*checkpoint\.pt \(step 4\).*Lower --lr") as err:
        trainer.fit()
    assert "stopped before applying it" in str(err.value)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    assert trainer.step == 5  # the NaN step was not applied
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_epoch_summary_counts_converted_images(tmp_path, capsys):
    """The end-of-epoch line and metrics.jsonl say how many non-RGB images were converted
    (and, when any, how many samples were skipped)."""
    import numpy as np

    from abd_fast.data import build_loader
    from abd_fast.models import create_model
    from test_data import encode, write_pairs
    rng = np.random.default_rng(0)
    items = [(encode(rng, (34, 32), mode="L" if k % 4 == 0 else "RGB"), f"a shape {k}")
             for k in range(48)]
    csv_path, _ = write_pairs(tmp_path / "data", items)
    seed_everything(0)
    loader = build_loader(csv_path, train=True, batch_size=24, image_size=32, loader="torch",
                          num_workers=0)
    trainer = Trainer(create_model("abd-tiny-vit"), loader, noisy_mmcl(), output_dir=tmp_path,
                      lr=1e-3, epochs=1, warmup=1, progress=False)
    trainer.fit()
    epoch = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "epoch_loss" in line]
    assert epoch[0]["converted"] == 12 and "skipped" not in epoch[0]
    assert "converted 12" in capsys.readouterr().out
