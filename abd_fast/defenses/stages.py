"""The defense stages, run by the CLI (`python -m abd_fast.train uap|defend`) through the
shared training engine: each builds a loss function `loss_fn(model, batch, epoch)` for
abd_fast.engine.Trainer, so both get DDP, torch.compile, checkpoints with exact resume,
progress and metrics.

uap     trains ABD's UAP generator (AdvCLIP's GAN + the backdoor loss) against the frozen
        poisoned model; writes uap.pt, a PNG of clean vs perturbed images and eval.json
        (the poisoned model under the UAP: CA, and with a target the rate at which the UAP
        sends non-target images to it — how backdoor-like the UAP is).
defend  fine-tunes the poisoned model with FT, CleanCLIP, RoCLIP or ABD; eval.json with CA
        and the attack's ASR after the defense.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from abd_fast.engine import compile_module
from abd_fast.models import image_features, text_features, to_channels_last
from abd_fast.ops import normalize_images
from abd_fast.precision import channels_last, image_dtype

from . import objectives as obj
from .uap import (UAP, Discriminator, UAPGenerator, apply_uap, backdoor_loss,
                  discriminator_loss, generator_loss, uap_shape)
from .views import autoaugment, brighten, cross_augment, eda_view

METHODS = ("ft", "cleanclip", "roclip", "abd")


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _average_grads(module, world_size: int):
    """DDP's gradient averaging for a module trained outside the engine's wrapper."""
    if world_size > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world_size


# ---- uap -------------------------------------------------------------------------------------

def uap_stage(run, reference=None, steer=None) -> dict:
    """Trains the UAP generator against run.model (the poisoned CLIP, frozen). reference: the
    clean CLIP for the backdoor loss (frozen), or None: the poisoned model on the clean image
    stands in (recorded in eval.json). cfg["bd_loss"]: "paper" (ABD Eq. 2: the reference's
    features of the brightened clean image vs the poisoned encoder's of the adversarial
    image) or "differential" (both encoders on the same adversarial image; the cli's default
    sign -1 pushes the poisoned encoder's view away from the reference's: the UAP seeks
    what only the poisoned model responds to).
    steer: None, or (classifier [C, D], class index, notes for eval.json): our extension
    (`--steer scan`, not the paper's): a term lambda_steer * CE(100 * cos(E_p(x'), classifier), class) that steers the
    UAP toward a class, the scan's target-free suspected target. Returns the training
    summary."""
    cfg, info, device = run.cfg, run.info, run.info.device
    S, mode = run.spec.size, cfg["mode"]
    poisoned = _frozen(run.model)
    reference = _frozen(reference.to(device)) if reference is not None else None
    size = uap_shape(mode, S, cfg["patch_area"])[-1]
    gen = UAPGenerator(size, mode=mode, eps=cfg["eps"], seed=cfg["seed"])
    places = torch.Generator().manual_seed(cfg["seed"])  # random-place patches: new each step
    disc = Discriminator(S).to(device)
    if channels_last(cfg.get("precision")):
        for m in (poisoned, reference, disc):  # the Trainer lays out only the generator
            if m is not None:
                to_channels_last(m)
    betas = (0.5, 0.999)
    d_opt = torch.optim.Adam(disc.parameters(), lr=cfg["lr"], betas=betas)
    # The work is in the frozen image towers and the discriminator, not the generator (one
    # tiny map from a fixed z): --compile compiles those.
    encode = functools.partial(image_features, poisoned)
    encode_ref = encode if reference is None else functools.partial(image_features, reference)
    discriminate = disc
    if cfg.get("compile"):
        encode, encode_ref, discriminate = map(compile_module, (encode, encode_ref, disc))
    mean, std, tok = run.mean, run.std, run.tokenizer
    use_bd = not cfg["no_backdoor_loss"]
    differential = cfg["bd_loss"] == "differential"
    if use_bd and differential and reference is None:
        raise ValueError("--bd-loss differential compares the poisoned and the reference "
                         "encoders on the same adversarial image: give --reference-model")
    if steer is not None:
        steer_w, steer_c = steer[0].to(device).float(), int(steer[1])
    geometry = dict(mode=mode, image_size=S, area=cfg["patch_area"], eps=cfg["eps"],
                    place=cfg["patch_place"])

    def loss_fn(model, batch, epoch):
        images = batch.images.to(device, non_blocking=True)
        dtype = image_dtype(device)  # autocast's: the towers take the batch without a cast
        x = normalize_images(images, mean, std, out_dtype=dtype)
        x_adv = apply_uap(images, model(), mean=mean, std=std, out_dtype=dtype,
                          generator=places, **geometry)
        # Discriminator step (its own optimizer), then the generator's loss.
        d_opt.zero_grad(set_to_none=True)
        d_loss = discriminator_loss(discriminate(x), discriminate(x_adv.detach()))
        d_loss.backward()
        _average_grads(disc, info.world_size)
        d_opt.step()
        disc.clip_weights(0.01)
        with torch.no_grad():
            f_clean = encode(x)
            f_text = text_features(poisoned, tok(batch.captions).to(device))
            f_ref = None
            if use_bd and not differential:
                x_ref = normalize_images(brighten(images, cfg["brightness"]), mean, std,
                                         out_dtype=dtype)
                f_ref = encode_ref(x_ref)
        f_adv = encode(x_adv)
        if use_bd and differential:  # the reference on the same adversarial image
            f_ref = encode_ref(x_adv)
        bd = (backdoor_loss(f_ref, f_adv, tau=0.1, sign=cfg["backdoor_loss_sign"],
                            pairing=cfg["backdoor_loss_pairing"]) if use_bd else None)
        loss, _ = generator_loss(discriminate(x_adv), x_adv, x, f_clean, f_adv, f_text,
                                 backdoor=bd, lambda_bd=cfg["lambda_bd"])
        if steer is not None:
            logits = 100.0 * f_adv.float() @ steer_w.T
            loss = loss + cfg["lambda_steer"] * F.cross_entropy(
                logits, torch.full((len(logits),), steer_c, device=device))
        return loss

    summary = run.fit(loss_fn, run.train_loader(), f"uap ({mode})", module=gen,
                      optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=cfg["lr"],
                                                           betas=betas),
                      schedule="constant", extra={"discriminator": disc, "d_optimizer": d_opt},
                      compile=False)
    gen.eval()
    with torch.no_grad():
        uap = UAP(gen().cpu(), **geometry)
    evaluation = run.eval_loader()
    if info.is_main:
        from pathlib import Path
        out = Path(cfg["output"])
        uap.save(out / "uap.pt")
        _save_examples(evaluation, uap, out / "uap_examples.png")
        print(f"UAP ({mode}, {cfg['patch_place']}, {tuple(uap.perturbation.shape)}) -> "
              f"{out / 'uap.pt'}", flush=True)
    run.evaluate(evaluation, uap, reference_model=cfg.get("reference_model") or
                 "none: the poisoned model on the clean image stood in",
                 **({"steer": steer[2]} if steer is not None else {}))
    return summary


def _save_examples(loader, uap: UAP, path, n: int = 8):
    """PNG: clean eval images (top row) and the same images with the UAP (bottom row)."""
    import numpy as np
    from PIL import Image
    if loader is None:
        return
    batch = next(iter(loader))
    images = batch.images[:n]
    adv = uap.apply(images, batch.ids[:n])                # [0,1] floats, no normalization
    top = images.permute(0, 2, 3, 1).numpy()
    bottom = (adv.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.concatenate([np.concatenate(list(top), 1), np.concatenate(list(bottom), 1)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST) \
        .save(path)


# ---- defend ----------------------------------------------------------------------------------

def defense_loss(run, method: str, *, uap: UAP | None = None, eda=None, bank=None):
    """loss_fn(model, batch, epoch) of a defense (objectives in abd_fast.defenses.objectives).
    One forward pass of the model over all the views of the batch."""
    cfg, info, device = run.cfg, run.info, run.info.device
    mean, std, tok = run.mean, run.std, run.tokenizer
    c = obj.Contrastive(info.rank, info.world_size)
    lambdas = dict(lambda1=cfg["lambda1"], lambda2=cfg["lambda2"])

    def features(model, x, text_views):
        """Encodes x = [V image views of B images, view-major] and [views of B captions] in one
        call; returns the per-view image and text features."""
        B = len(text_views[0])
        t = tok([s for view in text_views for s in view]).to(device)
        img, txt, scale = model(x, t)
        return img.split(B), txt.split(B), scale

    def loss_fn(model, batch, epoch):
        images = batch.images.to(device, non_blocking=True)
        captions, ids = batch.captions, batch.ids
        dtype = image_dtype(device)  # autocast's: the tower takes the batch without a cast
        # Several image views are stacked as uint8 and normalized by one fused call that writes
        # the batch the model encodes (a torch.cat of fp32 views would cost more than the views).
        if method == "ft":
            (img,), (txt,), scale = features(
                model, normalize_images(images, mean, std, out_dtype=dtype), [captions])
            return obj.mmcl(img, txt, scale, c)
        if method == "cleanclip":
            x = normalize_images(torch.cat([images, autoaugment(images)]), mean, std,
                                 out_dtype=dtype)
            (img, img_aug), (txt, txt_aug), scale = features(
                model, x, [captions, eda_view(eda, captions, ids, epoch)])
            return obj.cleanclip_objective(img, txt, img_aug, txt_aug, scale, c=c, **lambdas)
        if method == "roclip":
            x_aug = normalize_images(cross_augment(images), mean, std, out_dtype=dtype)
            (img,), (txt,), scale = features(model, x_aug, [eda_view(eda, captions, ids, epoch)])
            loss = obj.roclip_objective(img, txt, scale, bank, epoch,
                                        break_epoch=cfg["break_epoch"], c=c, update=False)
            bank.update(_gathered(txt.detach(), info.world_size))
            return loss
        # abd: views [clean, clean + UAP] (--adv-view raw) or [clean, AutoAugment + UAP]
        if cfg["no_adv"]:
            x = normalize_images(images, mean, std, out_dtype=dtype)
        elif cfg.get("adv_view", "raw") == "raw":
            x = uap.clean_and_adversarial(images, mean=mean, std=std, out_dtype=dtype)
        else:  # one fused call on [clean; augmented], the UAP on the second half's rows
            B = images.shape[0]
            rows = torch.arange(2 * B, device=images.device) >= B
            x = uap.apply(torch.cat([images, autoaugment(images)]), torch.cat([ids, ids]),
                          rows=rows, mean=mean, std=std, out_dtype=dtype)
        text_views = [captions] + ([] if cfg["no_eda"] else [eda_view(eda, captions, ids, epoch)])
        imgs, txts, scale = features(model, x, text_views)
        return obj.abd_objective(imgs[0], txts[0], imgs[1] if len(imgs) > 1 else None,
                                 txts[1] if len(txts) > 1 else None, scale,
                                 objective=cfg["abd_objective"], c=c, **lambdas)
    return loss_fn


def _gathered(t, world_size: int):
    if world_size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def defend_stage(run, budget: dict | None = None) -> dict:
    """Fine-tunes run.model (the poisoned CLIP) with cfg["method"], then evaluates it;
    budget: the training budget's record (abd_fast.defenses.budget), stored in eval.json."""
    cfg = run.cfg
    method = cfg["method"]
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    uap = eda = bank = None
    extra = {}
    if method == "abd" and not cfg["no_adv"]:
        uap = UAP.load(cfg["uap"])
        if uap.image_size != run.spec.size:
            raise ValueError(f"--uap {cfg['uap']} was trained for {uap.image_size} px images, "
                             f"the model takes {run.spec.size} px")
    if method in ("cleanclip", "roclip") or (method == "abd" and not cfg["no_eda"]):
        from abd_fast.text import EDA
        eda = EDA(seed=cfg["seed"])
    if method == "roclip":
        with torch.no_grad():  # the joint embedding's dimension
            dim = run.model.encode_text(run.tokenizer(["a"]).to(run.info.device)).shape[-1]
        bank = obj.TextBank(cfg["bank_size"], dim, device=run.info.device)
        extra["text_bank"] = bank
    train = run.train_loader()
    summary = run.fit(defense_loss(run, method, uap=uap, eda=eda, bank=bank), train,
                      f"defend {method}", extra=extra)
    run.evaluate(run.eval_loader(), run.trigger(), **({"budget": budget} if budget else {}))
    return summary
