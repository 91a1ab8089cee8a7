"""CLIP models: open_clip architectures by name, the tiny configs shipped with abd_fast, and
safe loading of local weights. Nothing here reaches the network.

Weights load from safetensors, from torch checkpoints through torch.load(weights_only=True),
or, for TorchScript archives such as OpenAI's released CLIP checkpoints, by reading their
tensors with a restricted unpickler that builds no object and runs no code of the archive.
A file carrying any other pickled payload is refused with WeightsError.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


class WeightsError(ValueError):
    """A weights file that cannot be loaded safely (or at all)."""


def _register_configs():
    global _registered
    if not _registered:
        import open_clip
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def available_models() -> list[str]:
    """Architectures create_model accepts: abd_fast's tiny configs and open_clip's."""
    import open_clip
    _register_configs()
    return open_clip.list_models()


def tiny_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects from the image pipeline: square size, CLIP mean and std."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def image_spec(model) -> ImageSpec:
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageSpec(int(size), tuple(model.visual.image_mean), tuple(model.visual.image_std))


def create_model(name: str, *, pretrained: str | os.PathLike | None = None,
                 image_size: int | None = None, device="cpu"):
    """Builds the open_clip CLIP `name` (e.g. "RN50", "ViT-B-32", "abd-tiny-vit") with random
    weights, or with the weights of the local file `pretrained`. image_size overrides the
    config's (ViT position embeddings of the weights are interpolated, as open_clip does)."""
    import open_clip
    _register_configs()
    if name.startswith(("hf-hub:", "local-dir:")) or name not in open_clip.list_models():
        raise ValueError(f"--model {name!r} is not a known architecture. Tiny configs shipped "
                         f"with abd_fast: {', '.join(tiny_models())}; or any open_clip model "
                         "such as RN50 or ViT-B-32 (open_clip.list_models()).")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"--image-size must be positive, got {image_size}")
    kwargs = {"force_image_size": image_size} if image_size else {}
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # open_clip warns that no pretrained tag was given
    try:
        model = open_clip.create_model(name, pretrained=None, **kwargs)
    finally:
        logger.setLevel(level)
    if pretrained is not None:
        load_weights(model, pretrained)
    _accept_short_text(model)
    return model.to(device)


# ---- the channels-last layout, with 1x1 convolutions as matrix products on a CPU -----------

class PointwiseConv2d(torch.nn.Conv2d):
    """A 1x1, stride-1, unpadded, ungrouped nn.Conv2d (the same parameters and state_dict)
    that on a CPU computes its output as the matrix product it is: the [N, H, W, C] view of
    a channels-last input times the [C, O] weight (F.linear, which autocast runs in bf16 as
    it does conv2d). oneDNN's convolutions are slow at the small spatial sizes of a ResNet
    tower's last stages (the demo's: 4x4 to 1x1), most of all in the weight gradient:
    forward + backward of the demo's 512 -> 1024 one at 1x1, batch 64, bf16, one thread, is
    8.5x faster as a matrix product on an AMX Xeon, RN50's at 224 px 1.16x over all of them
    (bench/pointwise.py, docs/PERFORMANCE.md). The same arithmetic, summed in another order:
    the result differs in the rounding. Elsewhere (CUDA) it is nn.Conv2d. to_channels_last
    makes a model's 1x1 convolutions these."""

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        y = torch.nn.functional.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
        return y.permute(0, 3, 1, 2)


def to_channels_last(model, on: bool = True):
    """model.to(memory_format=torch.channels_last), with its 1x1, stride-1 convolutions made
    PointwiseConv2d: the layout in which convolution towers run but under an explicit
    --precision fp32 (abd_fast.precision.channels_last), whose arithmetic stays the
    convolutions' bit for bit. on=False undoes it (contiguous, nn.Conv2d). Returns the model."""
    model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
    old, new = (torch.nn.Conv2d, PointwiseConv2d) if on else (PointwiseConv2d, torch.nn.Conv2d)
    for m in model.modules():
        if (type(m) is old and m.kernel_size == (1, 1) and m.stride == (1, 1)
                and m.padding in ((0, 0), "valid") and m.groups == 1
                and m.padding_mode == "zeros"):
            m.__class__ = new
    return model


# ---- text batches cut after their longest caption -------------------------------------------

def _accept_short_text(model):
    """Lets the text tower of an open_clip CLIP take token batches with fewer columns than its
    context (trim_tokens), where the result is the same: under its causal mask a position's
    output depends only on the tokens up to it, and the pooled position (argmax: the EOT
    token) is kept, so the cut columns change nothing but the rounding. Sets
    model.short_text. open_clip's CLIP adds its whole positional embedding and mask; this
    encode_text slices both to the batch's length (for a full-length batch, the same ops on
    the same values: bit for bit open_clip's)."""
    import types

    import open_clip
    model.short_text = False
    mask = getattr(model, "attn_mask", None)
    if type(model) is not open_clip.CLIP or model.text_pool_type != "argmax" or mask is None:
        return
    causal = torch.ones(mask.shape, dtype=torch.bool).triu(1)
    if not torch.equal(torch.isneginf(mask), causal) or mask[~causal].any():
        return
    model.encode_text = types.MethodType(_encode_text, model)
    model.short_text = True


def _encode_text(self, text, normalize: bool = False):
    """open_clip.CLIP.encode_text for a batch of L <= context_length columns."""
    from open_clip.transformer import text_global_pool
    L = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:L].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:L, :L])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type,
                         eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = (self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear)
             else x @ self.text_projection)
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def trim_tokens(tokens):
    """tokens [N, C] (zero-padded) without the columns after the batch's last token, their
    number rounded up to a multiple of ceil(C / 4) to 8: at most 4 shapes per context, so a
    compiled model compiles at most 4 times (the demo's 32-token context: 8, 16, 24, 32)."""
    C = tokens.shape[1]
    used = tokens.ne(0).any(0).nonzero()
    n = int(used[-1]) + 1 if len(used) else 1
    step = -(-C // 32) * 8
    return tokens[:, :min(C, -(-n // step) * step)].contiguous()


def image_features(model, x):
    """L2-normalized fp32 image embeddings E_I(x) [B, D] (x: normalized images)."""
    return torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)


def text_features(model, tokens):
    """L2-normalized fp32 text embeddings E_T(tokens) [B, D]."""
    return torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)


def get_tokenizer(name: str, trim: bool = False):
    """open_clip's tokenizer of the architecture `name`, remembering its captions' tokens
    (CachedTokenizer); trim: its batches cut after their longest caption (trim_tokens; for a
    model with short_text only)."""
    return CachedTokenizer(_open_clip_tokenizer(name), trim=trim)


@functools.cache
def _open_clip_tokenizer(name: str):
    """open_clip.get_tokenizer(name), built once per process: building the BPE tables takes
    ~0.4 s, paid by every stage a pipeline runs in one process. Its state is a memo of BPE
    merges, so sharing it changes no output."""
    import open_clip
    _register_configs()
    return open_clip.get_tokenizer(name)


class CachedTokenizer:
    """A tokenizer that keeps the token row of each of the last `size` captions it saw: the
    training loops tokenize the same captions every epoch, and open_clip's BPE tokenizer (text
    cleaning with ftfy, then BPE, in Python) costs ~26 ms per 256 captions on 2 CPU cores, a
    few % of a demo step. A row depends on its caption only, so the output is unchanged.
    trim: a batch's columns after its longest caption are dropped (trim_tokens)."""

    def __init__(self, tokenizer, size: int = 100_000, trim: bool = False):
        self.tokenizer, self.size, self.trim, self.rows = tokenizer, size, trim, {}

    def __call__(self, texts, context_length=None):
        if context_length is not None or isinstance(texts, str):
            return self.tokenizer(texts, context_length=context_length)
        rows = {t: self.rows.get(t) for t in texts}
        missing = [t for t, row in rows.items() if row is None]
        if missing:
            rows.update(zip(missing, self.tokenizer(missing)))
            self.rows.update((t, rows[t]) for t in missing)
            while len(self.rows) > self.size:  # the oldest first (dicts keep insertion order)
                del self.rows[next(iter(self.rows))]
        out = torch.stack([rows[t] for t in texts])
        return trim_tokens(out) if self.trim else out

    def __getattr__(self, name):  # context_length, vocab_size, encode, ... of the tokenizer
        return getattr(self.tokenizer, name)


def imagenet_templates():
    """The 80 OpenAI ImageNet prompt templates (callables: class name -> caption): zero-shot
    classifiers average over them, and the poisoning draws target captions from them."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return OPENAI_IMAGENET_TEMPLATES


@contextlib.contextmanager
def frozen(*models):
    """Eval mode and no parameter gradients inside (gradients still reach the inputs, e.g. a
    trigger or perturbation being optimized); each model's mode and flags are restored after,
    also when the body raises. None entries are ignored."""
    state = [(m, m.training, [p for p in m.parameters() if p.requires_grad])
             for m in models if m is not None]
    for m, _, params in state:
        m.eval()
        for p in params:
            p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, params in state:
            for p in params:
                p.requires_grad_(True)
            m.train(training)


# ---- weights -------------------------------------------------------------------------------

def load_weights(model, path: str | os.PathLike, flag: str = "--pretrained"):
    """Loads the weights of the file `path` into `model` (strict), adapting open_clip's and
    OpenAI's layouts. Raises WeightsError with the file and the reason on any problem."""
    from open_clip.factory import (convert_state_dict, convert_to_custom_text_state_dict,
                                   resize_pos_embed, resize_text_pos_embed)
    state = load_state_dict(path, flag)
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    # TorchScript archives also hold plain attributes (input_resolution, attn_mask, ...)
    state = {k: v for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightsError(f"{flag} {path}: the file does not fit this architecture; "
                           f"{len(missing)} tensors missing, e.g. {missing[:5]}")
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
           if v.shape != expected[k].shape]
    if bad:
        raise WeightsError(f"{flag} {path}: tensor shapes do not fit this architecture and "
                           f"image size (is --model or --image-size wrong?): {bad[:3]}")
    model.load_state_dict(state, strict=True)
    return model


def load_state_dict(path: str | os.PathLike, flag: str = "--pretrained") -> dict:
    """{name: tensor} of a safetensors file, a weights-only torch checkpoint (optionally under
    a "state_dict" or "model" key, "module." prefixes removed) or a TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{flag} {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{flag} {path}: not a readable safetensors file ({e})") from e
    elif _is_torchscript(path):
        state = _torchscript_tensors(path, flag)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = next((line for line in str(e).splitlines()
                           if "GLOBAL" in line or "global" in line), None)
            if reason is None:
                raise WeightsError(f"{flag} {path}: not a readable checkpoint ({e})") from e
            raise WeightsError(
                f"{flag} {path}: refused: the file holds pickled Python objects besides tensors, "
                "which could run code when loaded. abd_fast loads safetensors, weights-only torch "
                f"checkpoints and TorchScript archives. ({reason.strip()})") from e
        except Exception as e:
            raise WeightsError(f"{flag} {path}: not a readable checkpoint ({e})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{flag} {path}: expected a mapping of names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


class _Attributes:
    """Stands in for every TorchScript class: keeps the state it is given, runs nothing."""

    def __setstate__(self, state):
        self.state = state


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                   "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8,
                   "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


def _as_list(values):  # TorchScript's typed-list builders (build_intlist, ...)
    return list(values)


def _untagged(value, _type_tag):  # TorchScript's restore_type_tag
    return value


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Unpickles TorchScript's data.pkl allowing only tensor reconstruction and containers;
    the few TorchScript helpers it names are replaced by equivalents of our own."""

    _allowed = {("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
                ("collections", "OrderedDict"): collections.OrderedDict,
                ("torch.jit._pickle", "restore_type_tag"): _untagged,
                **{("torch.jit._pickle", f"build_{kind}list"): _as_list
                   for kind in ("int", "double", "bool", "tensor", "generic")}}

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return type(name, (_Attributes,), {})
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # the dtype of a storage record
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent record {pid!r}")
        _, dtype, key, _location, numel = pid
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        if len(data) != numel * torch.empty((), dtype=dtype).element_size():
            raise pickle.UnpicklingError(f"storage {key} has {len(data)} bytes for {numel} values")
        storage = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else \
            torch.UntypedStorage(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is what _rebuild_tensor_v2 takes
            return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def _torchscript_tensors(path: Path, flag: str) -> dict:
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("/data.pkl")]
        if len(names) != 1:
            raise WeightsError(f"{flag} {path}: TorchScript archive without one data.pkl")
        prefix = names[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in z.namelist() and z.read(byteorder).strip() != b"little":
            raise WeightsError(f"{flag} {path}: big-endian archives are not supported")
        with z.open(names[0]) as f:
            try:
                root = _TensorOnlyUnpickler(f, z, prefix).load()
            except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, KeyError) as e:
                raise WeightsError(f"{flag} {path}: refused: {e}") from e
    out = {}

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            out[name] = obj.detach()
        elif isinstance(obj, _Attributes):
            walk(obj.state, name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
    walk(root, "")
    return out
