"""The training engine shared by every stage: optimizer, schedule, checkpoints, the loop.

    trainer = Trainer(model, loader, loss_fn, lr=1e-3, epochs=10, warmup=50, output_dir=out)
    result = trainer.fit()       # loss_fn(model, batch, epoch) -> scalar loss

`Trainer` runs epochs over an abd_fast.data loader: AdamW (make_optimizer), the schedule
below per optimizer step, logit_scale clamp after each step, autocast by precision (auto:
bf16 where the hardware runs it fast, else fp32; abd_fast.precision), torch.compile
(compile_module; per-loop defaults COMPILE_DEFAULTS), DDP under torchrun
(init_distributed; the stage's contrastive loss is `contrastive_loss(dist)`: gathered
features with grad, local loss), rank-0 I/O: checkpoints (every N steps and at the end), a
progress bar and metrics.jsonl.

Schedule (per optimizer step s = 0 .. total-1, warmup w):
    s <  w: lr = base * (s + 1) / (w + 1)                  linear warmup, never 0
    s >= w: lr = base * (1 + cos(pi * (s - w) / (total - 1 - w))) / 2
so the cosine starts at base on step w and is exactly 0 on the last step, whatever the
warmup (the research code this tool replaces offsets its cosine by the warmup steps and
misses 0); tests/test_engine.py checks every step against the formula.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from abd_fast.models import to_channels_last
from abd_fast.precision import autocast, resolve_precision
from abd_fast.precision import channels_last as use_channels_last
from abd_fast.precision import sparse_rows as use_sparse_rows


def effective_warmup(warmup: int, total: int) -> int:
    """Warmup steps actually used: at most total - 2, so the cosine has a first and last step."""
    return max(0, min(warmup, total - 2))


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total` (see the module doc)."""
    if not 0 <= step < total:
        raise ValueError(f"step {step} outside [0, {total})")
    w = effective_warmup(warmup, total)
    if step < w:
        return base_lr * (step + 1) / (w + 1)
    span = total - 1 - w
    if span <= 0:  # a one-step run: its only step is the last one
        return 0.0
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - w) / span))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices and embeddings, none on norms, biases,
    gains and logit_scale (open_clip's rule: 1-D tensors and names with bn/ln/bias/scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                   or "logit_scale" in name)
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model, lr: float, weight_decay: float = 0.1,
                   betas=(0.9, 0.999), eps: float = 1e-8,
                   sparse_rows: bool = False) -> torch.optim.AdamW:
    """AdamW over param_groups. The fused kernel (CPU and CUDA) updates all tensors in one
    pass: on CPU 7x faster than foreach, which matters because the 49408 x 128 token
    embedding, updated densely, is most of a tiny CLIP's parameters (bench/train_step.py).
    sparse_rows: a SparseRowAdamW, which runs the kernel on that embedding's rows that have
    had a gradient (abd_fast.precision.sparse_rows says when), where the model has a
    trainable, weight-decayed `token_embedding` of a width SparseRowAdamW takes (else the
    plain AdamW)."""
    groups = param_groups(model, weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for g in groups for p in g["params"])
    table = getattr(getattr(model, "token_embedding", None), "weight", None)
    if (sparse_rows and fused and any(p is table for p in groups[1]["params"])
            and table.shape[1] % SparseRowAdamW.WIDTH == 0):
        return SparseRowAdamW(groups, table, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


class SparseRowAdamW(torch.optim.AdamW):
    """AdamW whose update of one embedding table (`table`, a parameter of its groups) costs
    what the rows that have had a gradient cost, not the whole table: a CLIP's text batches
    look up a few hundred of its 49408 rows (the demo's captions: about a hundred), yet the
    dense update reads and writes the table, its gradient and both moments at every step
    (with the gradient's zero fill, a sixth of the demo model's CPU step; docs/PERFORMANCE.md).

    The table's gradient may be sparse (nn.Embedding(sparse=True): the rows looked up) or
    dense. Every parameter takes AdamW's fused kernel (torch._fused_adamw_, the op
    torch.optim.AdamW(fused=True) calls); the table's `rows`, the rows that have ever had a
    gradient, take it on their own after the decoupled decay p *= 1 - lr * wd of the whole
    table (one pass), which is the kernel's own first operation. A row outside them
    has both moments zero and a zero gradient, where the kernel's step is exactly that decay:
    so the result is the fused AdamW's to the bit (tests/test_engine.py), and whether a row
    with zero moments is in `rows` changes nothing, which makes a resumed run exact when it
    recomputes `rows` from the moments. Once `rows` is half the table, the kernel runs on the
    whole table instead (the same result, without gathering rows). This needs the kernel to
    compute an element the same way wherever it sits: it does where whole rows are whole CPU
    vectors (its scalar tail rounds differently), hence a row width that is a multiple of
    WIDTH floats (512 bits: every CLIP text width is). The state (step, exp_avg, exp_avg_sq
    of the whole table) is AdamW's: checkpoints load into either optimizer."""

    WIDTH = 16

    def __init__(self, params, table: torch.nn.Parameter, **kw):
        super().__init__(params, **kw)
        if not self.defaults["fused"] or self.defaults["amsgrad"] or self.defaults["maximize"]:
            raise ValueError("SparseRowAdamW: fused=True, without amsgrad or maximize")
        if table.ndim != 2 or table.shape[1] % self.WIDTH:
            raise ValueError(f"SparseRowAdamW: the table's rows must be a multiple of "
                             f"{self.WIDTH} wide, not {tuple(table.shape)}")
        self.table = table
        self.rows = None  # sorted ids of the rows with a gradient so far (None: from the state)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.rows = None

    @torch.no_grad()
    def step(self, closure=None):
        table, grad = self.table, self.table.grad
        if grad is None:  # AdamW skips a parameter without a gradient
            return super().step(closure)
        table.grad = None
        try:
            loss = super().step(closure)
        finally:
            table.grad = grad
        state = self.state[table]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=table.device)
            state["exp_avg"] = torch.zeros_like(table, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(table, memory_format=torch.preserve_format)
        m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
        if self.rows is None:
            self.rows = (m_all.ne(0) | v_all.ne(0)).any(1).nonzero().squeeze(1)
        if grad.is_sparse:
            grad = grad.coalesce()
            ids, values = grad.indices()[0], grad.values()
        else:
            ids = grad.ne(0).any(1).nonzero().squeeze(1)
            values = grad[ids]
        rows = self.rows = torch.cat([self.rows, ids]).unique()
        # looked up each step: load_state_dict replaces the group dicts
        group = next(pg for pg in self.param_groups if any(p is table for p in pg["params"]))
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                     amsgrad=False, maximize=False)
        state["step"] += 1
        if 2 * len(rows) >= len(table):
            g = grad if not grad.is_sparse else torch.zeros_like(table).index_copy_(0, ids, values)
            torch._fused_adamw_([table], [g], [m_all], [v_all], [], [state["step"]],
                                weight_decay=group["weight_decay"], **hyper)
            return loss
        table.mul_(1 - group["lr"] * group["weight_decay"])
        g = values.new_zeros(len(rows), table.shape[1])
        g.index_copy_(0, torch.searchsorted(rows, ids), values)
        p, m, v = (t.index_select(0, rows) for t in (table, m_all, v_all))
        torch._fused_adamw_([p], [g], [m], [v], [], [state["step"]], weight_decay=0.0, **hyper)
        for full, part in ((table, p), (m_all, m), (v_all, v)):
            full.index_copy_(0, rows, part)
        return loss


def clamp_logit_scale(model, max_log: float = math.log(100.0)):
    """CLIP's clamp of the learned log temperature to ln(100), after each step."""
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        with torch.no_grad():
            scale.clamp_(0, max_log)


class _WriteRecorder:
    """A file's write(), remembering the OSError that made a write fail."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _atomic_write(path: str | os.PathLike, write):
    """write(binary file) into a temporary file beside `path`, fsync, rename, fsync the
    directory: a crash or a full disk never leaves a partial file under `path`, and the
    previous file stays valid."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj, path: str | os.PathLike):
    """torch.save, atomically (see _atomic_write)."""
    def write(f):
        writer = _WriteRecorder(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            # torch's zip writer turns a failed write (ENOSPC, EIO) into a RuntimeError
            # about stream positions: raise the OS error that caused it.
            if writer.error is not None:
                raise writer.error from e
            raise
    _atomic_write(path, write)


def atomic_write_text(text: str, path: str | os.PathLike):
    """Writes a small text file (eval.json, ...) atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


# ---- distributed -----------------------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, world size, device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1): nccl on GPU, gloo on
    CPU; one GPU per local rank. Without torchrun: rank 0 of 1. device: "cpu" or "cuda" to
    force (default: cuda when available)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def contrastive_loss(info: DistInfo):
    """The stages' CLIP loss module: abd_fast.ops.ClipLoss gathering features from every rank
    with their gradient and computing each rank's rows against all (local loss). Averaged by
    DDP over ranks, its gradient is the one of the CLIP loss over the global batch."""
    from abd_fast.ops import ClipLoss
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=info.rank,
                    world_size=info.world_size)


def _mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


# ---- torch.compile ---------------------------------------------------------------------------

# Whether each training loop runs torch.compile by default (--compile/--no-compile), per
# device, decided by measurement including the compile time over a stage
# (docs/PERFORMANCE.md). CPU, measured on the AVX2 EPYC: the compiled demo step was no faster
# than the eager channels-last one, and a cold compile (55-80 s) costs more than a whole
# defend stage, so no CPU loop compiles by default. GPU: not measured (no GPU here); the
# loops whose stages run longest compile, the usual win of inductor on a GPU.
COMPILE_DEFAULTS = {
    "cpu": {"pretrain": False, "poison": False, "badclip-trigger": False, "uap": False,
            "defend": False},
    "cuda": {"pretrain": True, "poison": True, "badclip-trigger": False, "uap": False,
             "defend": True},
}
LOOPS = tuple(COMPILE_DEFAULTS["cpu"])
COMPILE_ENV = "ABD_FAST_COMPILE"  # "0": no loop compiles by default (--compile still does)


def default_compile(loop: str) -> bool:
    """Whether `loop` (one of LOOPS) compiles unless told: its measured default on this
    device (COMPILE_DEFAULTS), unless $ABD_FAST_COMPILE is "0" or, on a CPU, no C++ compiler
    is found (inductor needs one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if os.environ.get(COMPILE_ENV, "1") == "0" or not COMPILE_DEFAULTS[device][loop]:
        return False
    if device == "cpu":
        import shutil

        from torch._inductor import config
        return shutil.which(config.cpp.cxx[-1] or "g++") is not None
    return True


# The user's choice of inductor cache, if any (inductor sets the variable itself once it has
# compiled something, so it is read before that).
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def use_compile_cache() -> Path:
    """Points inductor's on-disk caches (FX graphs, AOTAutograd graphs, generated kernels) at
    <abd_fast cache>/inductor, unless TORCHINDUCTOR_CACHE_DIR was set: a graph compiled once
    is loaded, not compiled again, by the pipeline's later stages and by later runs (on this
    project's 2-core machine, 2-4 s instead of 60-90 s for the demo model's training step).
    Returns the directory."""
    from abd_fast.data.validate import cache_dir
    path = _USER_INDUCTOR_CACHE or str(cache_dir() / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return Path(path)


def compile_module(fn):
    """torch.compile(fn) (a module or a function) with static shapes (a training loader drops
    its last partial batch, so a stage sees one batch shape; dynamic shapes would compile
    slower code after the first shape change) and the abd_fast compile cache. Stages that
    differ only in lr, epochs or the model's weights reuse the compiled graphs."""
    use_compile_cache()
    return torch.compile(fn, dynamic=False)


# ---- RNG state -----------------------------------------------------------------------------

def seed_everything(seed: int):
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG this process draws from, as plain types and tensors (weights_only loadable)."""
    npst = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"bit_generator": npst["bit_generator"],
                      "key": torch.from_numpy(npst["state"]["key"].astype(np.int64)),
                      "pos": int(npst["state"]["pos"]), "has_gauss": int(npst["has_gauss"]),
                      "gauss": float(npst["gauss"])},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoints ---------------------------------------------------------------------------

CHECKPOINT_FORMAT = "abd_fast.checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (unreadable, or another run's)."""


def load_checkpoint(path: str | os.PathLike, flag: str = "--resume") -> dict:
    """A training checkpoint, read with torch.load(weights_only=True): no code it may carry
    runs. Raises CheckpointError naming `flag` and the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds
        raise CheckpointError(f"{flag} {path}: not a readable abd_fast checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{flag} {path}: not an abd_fast training checkpoint (weights "
                              "files go to --pretrained / --checkpoint)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{flag} {path}: checkpoint version {ckpt.get('version')}, this "
                              f"abd_fast reads version {CHECKPOINT_VERSION}")
    return ckpt


def is_abd_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint an abd_fast command wrote (not other weights: an OpenAI
    or open_clip file, safetensors, TorchScript). Never raises."""
    import warnings
    try:
        with warnings.catch_warnings():  # (torch.load warns about TorchScript archives)
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any file torch cannot read this way is not ours
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT


RESUME_ONLY = ("optimizer", "scaler", "rng", "extra")  # what strip_checkpoint drops


def strip_checkpoint(path: str | os.PathLike):
    """Rewrites the finished run's checkpoint at `path` (atomically) without what only
    resuming needs: optimizer, scaler and RNG states and the extra modules (with AdamW, two
    thirds of the file). Its weights, config and position stay: load_weights (--pretrained,
    --checkpoint) and load_checkpoint(...)["config"] read it as before; --resume refuses it."""
    ckpt = load_checkpoint(path, "checkpoint")
    if "optimizer" in ckpt:
        atomic_save({k: v for k, v in ckpt.items() if k not in RESUME_ONLY}, path)


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (e.g. a full disk); the previous one is left intact."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before applying that step."""


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)      # torch.compile
    return getattr(model, "module", model)           # DDP


class Trainer:
    """Runs a stage's training: `loss_fn(model, batch, epoch) -> scalar loss` over `loader`'s
    epochs, one AdamW step per batch.

    model: the module trained (moved to the device, wrapped in DDP under torchrun, compiled
    with compile=True); loss_fn receives the wrapped module and must call it (its forward),
    not its submodules, so DDP synchronizes the gradients. loader: an abd_fast.data Loader
    of this rank (set_epoch(epoch, start_batch)). warmup: optimizer steps. checkpoint_every:
    optimizer steps between checkpoints (0: only at the end). resume: a checkpoint path
    written by a Trainer of the same run. config: the run's settings (plain types), stored
    in checkpoints. extra: {name: object with state_dict()/load_state_dict()} saved and
    restored with the checkpoint (a stage's other modules or optimizers).
    precision: "auto" (default: bf16 where the hardware runs it fast, else fp32; see
    abd_fast.precision), "bf16" (autocast), "fp16" (autocast + GradScaler) or "fp32" (no
    autocast: today's arithmetic exactly). channels_last: convolution weights (and so their
    outputs) channels-last; default: abd_fast.precision.channels_last(precision). compile:
    torch.compile the model (compile_module: fixed shapes, the abd_fast inductor cache).
    optimizer: a factory model -> torch optimizer (default: AdamW with make_optimizer's
    groups; a SparseRowAdamW where abd_fast.precision.sparse_rows says so, without compile
    or DDP: the token embedding then gives sparse gradients during fit); schedule: "cosine"
    (warmup + cosine to 0, lr_at) or "constant".

    Files in output_dir (rank 0 only): checkpoint.pt (atomic; model, optimizer, scaler, step,
    epoch, batch position in the epoch, RNG states of every rank, config, extra) and
    metrics.jsonl (one JSON object per step: step, epoch, batch, loss, lr, images/s, time).
    """

    def __init__(self, model, loader, loss_fn: Callable, *, lr: float, epochs: int,
                 warmup: int, output_dir, seed: int = 0, checkpoint_every: int = 0,
                 compile: bool = False, resume=None, weight_decay: float = 0.1,
                 config: dict | None = None, dist_info: DistInfo | None = None,
                 precision: str | None = "auto", channels_last: bool | None = None,
                 extra: dict | None = None,
                 progress: bool | None = None, desc: str = "train",
                 on_epoch_end: Callable | None = None, optimizer: Callable | None = None,
                 schedule: str = "cosine"):
        if epochs < 1 or lr <= 0 or warmup < 0 or checkpoint_every < 0:
            raise ValueError("epochs >= 1, lr > 0, warmup >= 0 and checkpoint_every >= 0 needed")
        self.info = dist_info or DistInfo()
        self.device = self.info.device
        self.model = model.to(self.device)
        self.loader, self.loss_fn = loader, loss_fn
        self.lr, self.epochs, self.warmup, self.seed = lr, epochs, warmup, seed
        self.output_dir = Path(output_dir)
        self.checkpoint_every, self.resume = checkpoint_every, resume
        self.config, self.extra = dict(config or {}), dict(extra or {})
        self.desc, self.on_epoch_end = desc, on_epoch_end
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = (use_channels_last(precision) if channels_last is None
                              else channels_last)
        if self.channels_last:
            to_channels_last(self.model)
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise ValueError("the training loader yields no batch (fewer samples than a batch)")
        self.total_steps = epochs * self.steps_per_epoch
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', not {schedule!r}")
        self.schedule = schedule
        sparse_rows = (use_sparse_rows(precision, self.device) and not compile
                       and self.info.world_size == 1)
        self.optimizer = (make_optimizer(self.model, lr, weight_decay, sparse_rows=sparse_rows)
                          if optimizer is None else optimizer(self.model))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = self.epoch = self.batch = 0
        self.checkpoint_path = self.output_dir / "checkpoint.pt"
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._writer, self._write_error = None, None  # save_in_background's thread, failure
        if resume is not None:
            self._restore(load_checkpoint(resume))
        wrapped = self.model
        if self.info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(
                wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.wrapped = compile_module(wrapped) if compile else wrapped

    # -- checkpoints ---------------------------------------------------------------------
    def state(self) -> dict:
        """The checkpoint (call on every rank: it gathers every rank's RNG state)."""
        rng = rng_state()
        if self.info.world_size > 1:
            states = [None] * self.info.world_size
            dist.all_gather_object(states, rng)
            rng = states
        else:
            rng = [rng]
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": _unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.info.world_size, "seed": self.seed,
                "rng": rng, "config": self.config,
                "extra": {k: v.state_dict() for k, v in self.extra.items()}}

    def save(self):
        """Writes the checkpoint now (atomically; CheckpointWriteError if it cannot)."""
        self.wait_for_checkpoint()
        state = self.state()
        if self.info.is_main:
            try:
                atomic_save(state, self.checkpoint_path)
            except OSError as e:
                raise self._write_failed(self.step, e) from e

    def save_in_background(self):
        """A periodic checkpoint that does not stall training: the state is serialized here (a
        snapshot: the steps that follow do not change it) and a thread writes, fsyncs and
        renames it (as atomic_save) while training goes on. On the demo's 2 cores the write
        blocked a stage for 0.4-0.8 s, 7 times per 780 steps. The previous background write is
        waited for first and its failure raised (CheckpointWriteError); until a write has
        finished, the previous checkpoint is the one on disk."""
        self.wait_for_checkpoint()
        state = self.state()
        if not self.info.is_main:
            return
        buf, step = io.BytesIO(), self.step
        torch.save(state, buf)

        def write():
            try:
                _atomic_write(self.checkpoint_path, lambda f: f.write(buf.getbuffer()))
            except Exception as e:  # OSError above all (a full disk); raised when waited for
                self._write_error = (step, e)
        self._writer = threading.Thread(target=write, name="checkpoint-writer")
        self._writer.start()

    def wait_for_checkpoint(self, raise_error: bool = True):
        """Waits for a background checkpoint write; raises its failure unless raise_error is
        False (then it is dropped: another error is on its way)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        failed, self._write_error = self._write_error, None
        if failed is not None and raise_error:
            raise self._write_failed(*failed) from failed[1]

    def _write_failed(self, step: int, e: Exception) -> CheckpointWriteError:
        previous = (f"the previous checkpoint {self.checkpoint_path} (step "
                    f"{self._saved_step()}) is intact"
                    if self.checkpoint_path.exists() else "no earlier checkpoint exists")
        return CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {self.checkpoint_path}: "
            f"{getattr(e, 'strerror', None) or e}; {previous}. Free space (or fix the output "
            "directory) and rerun with --resume.")

    def _restore(self, ckpt: dict):
        mine = {"total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.info.world_size, "seed": self.seed}
        diff = [f"{k} {ckpt.get(k)} (now {v})" for k, v in mine.items() if ckpt.get(k) != v]
        if diff:
            raise CheckpointError(f"--resume {self.resume}: the checkpoint is from a different "
                                  f"run: {', '.join(diff)}. Resume with the same settings "
                                  "(--epochs, --batch-size, data, --seed, process count).")
        if "optimizer" not in ckpt:
            raise CheckpointError(f"--resume {self.resume}: the finished run's weights only (its "
                                  "optimizer state was dropped): nothing to resume; load it "
                                  "with --pretrained or --checkpoint instead")
        _unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        for k, v in self.extra.items():
            v.load_state_dict(ckpt["extra"][k])
        self.step, self.epoch, self.batch = ckpt["step"], ckpt["epoch"], ckpt["batch"]
        set_rng_state(ckpt["rng"][self.info.rank])
        if self.info.is_main and self.metrics_path.exists():
            # Steps logged after this checkpoint by the interrupted run are redone.
            lines = [ln for ln in self.metrics_path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            tmp = self.metrics_path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in lines))
            os.replace(tmp, self.metrics_path)

    # -- the loop ------------------------------------------------------------------------
    def _log(self, record: dict):
        if self.info.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> dict:
        """Trains until the last step (from the resumed position if any). Returns a summary:
        step, loss (last), epoch_loss (mean over the last epoch run), seconds, images_per_s,
        checkpoint. Raises NonFiniteLossError on a NaN/inf loss (the step is not applied;
        the last checkpoint written stays the last good one)."""
        from tqdm.auto import tqdm
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        global_batch = self.loader.batch_size * self.info.world_size
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not (self.progress and self.info.is_main), dynamic_ncols=True)
        t_start, done_images, last, epoch_losses = time.perf_counter(), 0, None, []
        rate = 0.0
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # Adam states decaying into denormals: 10x slower math
        table = (_unwrap(self.model).token_embedding
                 if isinstance(self.optimizer, SparseRowAdamW) else None)
        if table is not None:
            was_sparse, table.sparse = table.sparse, True  # its gradient: the rows looked up
        try:
            while self.step < self.total_steps:
                epoch, t_epoch, epoch_losses = self.epoch, time.perf_counter(), []
                self.loader.set_epoch(epoch, start_batch=self.batch)
                t_step = time.perf_counter()
                for batch in self.loader:
                    lr = (lr_at(self.step, self.lr, self.warmup, self.total_steps)
                          if self.schedule == "cosine" else self.lr)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    with autocast(self.device, self.precision):
                        loss = self.loss_fn(self.wrapped, batch, epoch)
                    value = _mean_over_ranks(loss.detach().float(), self.info).item()
                    if not math.isfinite(value):
                        self.wait_for_checkpoint(raise_error=False)
                        raise NonFiniteLossError(
                            f"the loss is {value} at step {self.step} (epoch {epoch}, batch "
                            f"{self.batch}); stopped before applying it. Last good checkpoint: "
                            + (f"{self.checkpoint_path} (step {self._saved_step()})"
                               if self.checkpoint_path.exists() else "none written yet")
                            + ". Lower --lr, raise --warmup or check the data.")
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    clamp_logit_scale(_unwrap(self.model))
                    self.step += 1
                    self.batch += 1
                    now = time.perf_counter()
                    rate = global_batch / max(now - t_step, 1e-9)
                    t_step, last = now, value
                    done_images += global_batch
                    epoch_losses.append(value)
                    self._log({"step": self.step, "epoch": epoch, "batch": self.batch,
                               "loss": value, "lr": lr, "images_per_s": round(rate, 1),
                               "time": round(now - t_start, 3)})
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{done_images / (now - t_start):.0f}", refresh=False)
                    bar.update(1)
                    if self.batch == self.steps_per_epoch:
                        self.epoch, self.batch = epoch + 1, 0
                    if (self.checkpoint_every and self.step % self.checkpoint_every == 0
                            and self.step < self.total_steps):
                        self.save_in_background()
                if self.batch != 0:
                    raise RuntimeError(f"the loader yielded {self.batch} of "
                                       f"{self.steps_per_epoch} batches in epoch {epoch}")
                record = {"epoch": epoch, "epoch_loss": float(np.mean(epoch_losses)),
                          "seconds": round(time.perf_counter() - t_epoch, 3)}
                # The data layer's counts (images skipped, converted to RGB), when non-zero.
                record.update({k: v for k, v in getattr(self.loader, "epoch_stats", {}).items()
                               if v})
                if self.on_epoch_end is not None:
                    record.update(self.on_epoch_end(epoch, _unwrap(self.model)) or {})
                if self.info.is_main:
                    bar.write(f"{self.desc} epoch {epoch + 1}/{self.epochs}: "
                              + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in record.items() if k != "epoch"))
                self._log({"step": self.step, **record})
            self.save()
        finally:
            self.wait_for_checkpoint(raise_error=False)  # on an error: finish, do not mask it
            bar.close()
            if table is not None:
                table.sparse = was_sparse
            if self.device.type == "cpu":
                torch.set_flush_denormal(False)  # leave the process's FP state as found
        seconds = time.perf_counter() - t_start
        return {"step": self.step, "loss": last,
                "epoch_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                "seconds": seconds, "images_per_s": done_images / seconds if seconds else 0.0,
                "checkpoint": str(self.checkpoint_path)}

    def _saved_step(self):
        try:
            return load_checkpoint(self.checkpoint_path)["step"]
        except CheckpointError:
            return "?"
