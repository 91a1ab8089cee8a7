"""The six triggers against plain-PyTorch formulas, and the seeded-per-sample property."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from abd_fast.attacks import load_patch, make_trigger, save_patch
from abd_fast.attacks import triggers as T
from conftest import available_backends, device_of

B, S = 7, 37
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
SEED = 1234


def images_ids(b=B, s=S):
    images = torch.randint(1, 256, (b, 3, s, s), dtype=torch.uint8)
    ids = torch.randint(0, 2 ** 62, (b,), dtype=torch.int64)
    return images, ids


def finish(v, rows=None, x=None):
    """What every trigger ends with: unselected rows keep x, clamp, CLIP normalization."""
    if rows is not None:
        v = torch.where(rows[:, None, None, None], v, x)
    v = v.clamp(0, 1)
    return (v - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def paste(x, patches, ys, xs):
    """x [B,3,S,S] float; patches [B,3,h,w]; pasted at (ys[b], xs[b]) with slicing."""
    out = x.clone()
    for b in range(len(x)):
        h, w = patches[b].shape[-2:]
        out[b, :, ys[b]:ys[b] + h, xs[b]:xs[b] + w] = patches[b]
    return out


def check(out, expected):
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-5)


def test_patch_side():
    assert [T.patch_side(s) for s in (224, 448, 112, 64, 37, 32, 8, 3)] == \
        [16, 32, 8, 8, 8, 8, 8, 3]


def test_uniform_and_normal_are_pure_and_well_spread():
    ids = np.arange(2000) * 7919 + 3
    u = T.uniform(5, 1, ids, 50)
    assert u.shape == (2000, 50) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - math.sqrt(1 / 12)) < 0.01
    np.testing.assert_array_equal(u[123:456], T.uniform(5, 1, ids[123:456], 50))  # per id
    np.testing.assert_array_equal(u[:, :10], T.uniform(5, 1, ids, 10))           # per counter
    assert not np.isin(u, T.uniform(6, 1, ids, 50)).any()                       # seed
    assert not np.isin(u, T.uniform(5, 2, ids, 50)).any()                       # stream
    z = T.normal(5, 2, ids, 100)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((np.abs(z) < 1).mean() - 0.6827) < 0.01


@pytest.mark.parametrize("name", ["badnet", "label-consistent"])
def test_badnet_noise_random_location(name):
    images, ids = images_ids()
    rows = torch.tensor([True, False, True, True, False, False, True])
    trig = make_trigger(name, image_size=S, seed=SEED)
    p = trig.patch_size
    assert p == 8
    out = trig.apply(images, ids, rows=rows, mean=MEAN, std=STD)
    x = images.float() / 255
    noise, (ys, xs) = trig.noise(ids.numpy()), trig.locations(ids.numpy())
    patches = x.mean((2, 3))[:, :, None, None] + noise          # CleanCLIP: mean + N(0,1)
    check(out, finish(paste(x, patches, ys, xs), rows, x))
    # locations: inside the image; the noise is N(0,1) per sample
    many = torch.arange(5000)
    ys, xs = trig.locations(many.numpy())
    assert ys.min() == 0 and xs.min() == 0 and ys.max() == S - p and xs.max() == S - p
    n = trig.noise(many.numpy())
    assert abs(n.mean()) < 0.02 and abs(n.std() - 1) < 0.02


@pytest.mark.parametrize("location", ["corner", "middle", "four-corners"])
def test_badnet_fixed_patch_locations(location):
    images, ids = images_ids()
    trig = make_trigger("badnet", image_size=S, seed=SEED, patch_content="fixed", patch_size=6,
                        location=location)
    out = trig.apply(images, ids, mean=MEAN, std=STD)
    x = images.float() / 255
    fixed = torch.from_numpy(T.uniform(SEED, T.STREAM_FIXED_PATCH, [0], 3 * 36)).float() \
        .reshape(3, 6, 6)
    corners = {"corner": [(S - 6, S - 6)], "middle": [((S - 6) // 2, (S - 6) // 2)],
               "four-corners": [(0, 0), (0, S - 6), (S - 6, 0), (S - 6, S - 6)]}[location]
    expected = x
    for y0, x0 in corners:
        expected = paste(expected, fixed.expand(B, 3, 6, 6), [y0] * B, [x0] * B)
    check(out, finish(expected))


def test_badnet_patch_from_image_file(tmp_path):
    from PIL import Image
    p = 5
    arr = np.random.default_rng(0).integers(0, 256, (p, p, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "patch.png")
    images, ids = images_ids()
    trig = make_trigger("badnet", image_size=S, seed=SEED, patch_size=p,
                        patch_content=str(tmp_path / "patch.png"), location="random")
    out = trig.apply(images, ids, mean=MEAN, std=STD)
    x = images.float() / 255
    patch = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    ys, xs = trig.locations(ids.numpy())
    check(out, finish(paste(x, patch.expand(B, 3, p, p), ys, xs)))


def test_blended_seeded_noise_and_file(tmp_path):
    from PIL import Image
    images, ids = images_ids()
    rows = torch.rand(B) > 0.5
    x = images.float() / 255
    trig = make_trigger("blended", image_size=S, seed=SEED)
    pattern = torch.from_numpy(T.uniform(SEED, T.STREAM_BLEND, [0], 3 * S * S)).float() \
        .reshape(3, S, S)
    check(trig.apply(images, ids, rows=rows, mean=MEAN, std=STD),
          finish(0.8 * x + 0.2 * pattern, rows, x))
    arr = np.random.default_rng(1).integers(0, 256, (S, S, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "hello_kitty.png")
    trig = make_trigger("blended", image_size=S, seed=SEED, alpha=0.3,
                        pattern=str(tmp_path / "hello_kitty.png"))
    pattern = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    check(trig.apply(images, ids, mean=MEAN, std=STD), finish(0.7 * x + 0.3 * pattern))


def test_wanet_matches_backdoorbench():
    images, ids = images_ids()
    rows = torch.rand(B) > 0.3
    trig = make_trigger("wanet", image_size=S, seed=SEED)
    out = trig.apply(images, ids, rows=rows, mean=MEAN, std=STD)
    # BackdoorBench (attack/wanet.py), with torch.rand(1, 2, k, k) replaced by the seeded draw
    k, s, grid_rescale, input_height = 4, 0.5, 1, S
    ins = torch.from_numpy(T.uniform(SEED, T.STREAM_WANET, [0], 2 * k * k)).float() \
        .reshape(1, 2, k, k) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise_grid = F.interpolate(ins, size=input_height, mode="bicubic",
                               align_corners=True).permute(0, 2, 3, 1)
    array1d = torch.linspace(-1, 1, steps=input_height)
    x, y = torch.meshgrid(array1d, array1d, indexing="ij")
    identity_grid = torch.stack((y, x), 2)[None, ...]
    grid_temps = (identity_grid + s * noise_grid / input_height) * grid_rescale
    grid_temps = torch.clamp(grid_temps, -1, 1)
    xf = images.float() / 255
    warped = F.grid_sample(xf, grid_temps.repeat(B, 1, 1, 1), align_corners=True)
    check(out, finish(warped, rows, xf))
    assert (out - finish(xf)).abs()[rows].max() > 0.01  # the warp moved pixels


def test_sig_formula():
    images, ids = images_ids()
    trig = make_trigger("sig", image_size=S, seed=SEED)
    out = trig.apply(images, ids, mean=MEAN, std=STD)
    pattern = torch.zeros(3, S, S)
    for j in range(S):
        pattern[:, :, j] = 40 / 255 * math.sin(2 * math.pi * j * 6 / S)
    x = images.float() / 255
    check(out, finish(x + pattern))


@pytest.mark.parametrize("suffix", [".png", ".pt"])
def test_badclip_patch_file_in_the_middle(tmp_path, suffix):
    patch = torch.rand(3, 5, 5)
    saved = save_patch(patch, tmp_path / f"patch{suffix}")
    loaded = load_patch(tmp_path / f"patch{suffix}")
    assert torch.equal(loaded, saved)  # lossless round trip of what is saved
    if suffix == ".pt":
        assert torch.equal(loaded, patch)
    else:
        assert (loaded - patch).abs().max() <= 0.5 / 255 + 1e-7
    images, ids = images_ids()
    trig = make_trigger("badclip", image_size=S, seed=SEED, patch_file=tmp_path / f"patch{suffix}")
    out = trig.apply(images, ids, mean=MEAN, std=STD)
    x = images.float() / 255
    m = (S - 5) // 2
    check(out, finish(paste(x, saved.expand(B, 3, 5, 5), [m] * B, [m] * B)))


@pytest.mark.parametrize("name", ["badnet", "blended", "wanet", "sig"])
def test_same_id_same_trigger_whatever_the_batch(name):
    """Epochs, workers and ranks see a sample in other batches, orders and processes."""
    images, ids = images_ids(b=12)
    trig = make_trigger(name, image_size=S, seed=SEED)
    full = trig.apply(images, ids, mean=MEAN, std=STD)
    perm = torch.randperm(12)
    check(trig.apply(images[perm], ids[perm], mean=MEAN, std=STD), full[perm])   # reshuffled
    for part in (slice(0, 5), slice(5, 12)):                                      # two ranks
        check(trig.apply(images[part], ids[part], mean=MEAN, std=STD), full[part])
    rebuilt = make_trigger(name, image_size=S, seed=SEED)                         # new process
    check(rebuilt.apply(images, ids, mean=MEAN, std=STD), full)
    rows = torch.arange(12) % 3 == 0                                              # other rows
    check(trig.apply(images, ids, rows=rows, mean=MEAN, std=STD)[rows], full[rows])


def test_badnet_different_ids_and_seeds_differ():
    images, ids = images_ids()
    one = images[:1].expand(B, 3, S, S).contiguous()  # the same image under 7 ids
    trig = make_trigger("badnet", image_size=S, seed=SEED)
    out = trig.apply(one, ids)
    for a in range(B):
        for b in range(a + 1, B):
            assert not torch.equal(out[a], out[b])
    other = make_trigger("badnet", image_size=S, seed=SEED + 1).apply(one, ids)
    assert all(not torch.equal(out[b], other[b]) for b in range(B))
    assert not torch.equal(make_trigger("blended", image_size=S, seed=1).pattern,
                           make_trigger("blended", image_size=S, seed=2).pattern)
    assert not torch.equal(make_trigger("wanet", image_size=S, seed=1).grid,
                           make_trigger("wanet", image_size=S, seed=2).grid)


def test_trigger_is_the_same_in_another_process():
    ids = [3, 17, 2 ** 62 + 5]
    code = ("import sys; sys.path.insert(0, '.');"
            "from abd_fast.attacks import make_trigger;"
            f"t = make_trigger('badnet', image_size={S}, seed={SEED});"
            f"ys, xs = t.locations({ids}); n = t.noise({ids});"
            "print(ys.tolist(), xs.tolist(), n.double().sum().item())")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env={"PYTHONHASHSEED": "123", "PATH": ""})
    trig = make_trigger("badnet", image_size=S, seed=SEED)
    ys, xs = trig.locations(ids)
    assert run.stdout.strip() == f"{ys.tolist()} {xs.tolist()} {trig.noise(ids).double().sum().item()}"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown attack 'badnets'"):
        make_trigger("badnets", image_size=S)
    with pytest.raises(ValueError, match="unknown option"):
        make_trigger("sig", image_size=S, alpha=0.2)
    with pytest.raises(ValueError, match="location"):
        make_trigger("badnet", image_size=S, location="left")
    with pytest.raises(ValueError, match="badclip-trigger"):
        make_trigger("badclip", image_size=S)
    with pytest.raises(FileNotFoundError, match="no such file"):
        make_trigger("blended", image_size=S, pattern="/nonexistent.png")
    images, ids = images_ids(s=32)
    with pytest.raises(ValueError, match="built for 37 px"):
        make_trigger("sig", image_size=S).apply(images, ids)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("name", ["badnet", "blended", "wanet", "sig", "badclip"])
def test_every_backend_gives_the_reference(name, backend):
    dev = device_of(backend)
    images, ids = images_ids()
    rows = torch.tensor([True, False, True, True, False, True, False])
    opts = {"patch": torch.rand(3, 5, 5)} if name == "badclip" else {}
    trig = make_trigger(name, image_size=S, seed=SEED, **opts)
    ref = trig.apply(images, ids, rows=rows, mean=MEAN, std=STD, backend="reference")
    out = trig.apply(images.to(dev), ids.to(dev), rows=rows.to(dev), mean=MEAN, std=STD,
                     backend=backend)
    check(out.cpu(), ref)
