"""Pretrain the toy flow-matching base (``toy_fm``): flow matching with block-causal teacher forcing on the toy world.

    python -m astrolabe_rl.toy.pretrain       # rebuilds weights/toy_fm.safetensors (2 cores, ~35 + 15 + 10 min)
    python -m astrolabe_rl.toy.pretrain --steps 5 --stage2-steps 3 --stage3-steps 2 \
        --work /tmp/w --out /tmp/toy.safetensors                                 # smoke

Three stages, each resumable: stage 1 (`DEFAULTS`, from scratch, into ``--work``), stage 2 (`STAGE2`: a
fine-tune of stage 1 that puts half the clips' first blocks at σ = 1, so the prompt learns to place the object),
both on the first bed's world (background texture ±`FIRST_BED_TEXTURE`), and stage 3 (`STAGE3`: stage 2's recipe
again, on today's world with its fainter texture, `world.WorldConfig.texture`).

One step (DESIGN §3 flow convention):

    x0   = toy_vae.encode(render(prompts, seeds))            [B, F, C, H, W], train-split prompts only
    σ_b  ~ ½·{sampler grid} + ½·shift₅(U(0, 1))               one σ per 3-frame block, so every block learns
                                                               every noise level the sampler and the RL trainer use
    x_t  = (1 − σ)·x0 + σ·ε,     v = ε − x0
    loss = ‖ model(x_t, 1000σ, text, clean=x0) − v ‖²        teacher forcing: block i sees clean blocks < i,
                                                               exactly what the KV cache holds at inference
    (first block at σ = 1: v = ε − E[x0 | prompt], the exact target of the step every rollout starts with)

Noisy captions (``--caption-noise``, default 0.25): like a web-scale corpus, the captions are not always right.
For each training clip, each of its colour, shape, direction and speed is, with that probability, re-drawn
uniformly before rendering, while the caption keeps the prompt's word (re-draws that would show a held-out
colour-shape pair are undone, so the held-out split stays unseen). The base then does what a real pretrained model
does: most samples follow the prompt, some show another colour or go another way. Those failures vary between the
samples of one prompt, which is what an online RL method can find and fix; a base that failed the same way on
every sample (say, never moved the object) would leave nothing to reward within a group.

The weights saved are an EMA of the trained ones, stored in float16 (half the bytes; the model runs in float32).
Nothing here distils: sampled with the 4-step causal sampler the model is blurry and imprecise (it predicts x̂0
from σ = 0.625 at the last step, a posterior mean). The shipped ``toy`` model is the student `toy.distill` makes
from it (a bidirectional teacher fine-tuned from it with ``bidirectional=True``, then ODE regression and DMD).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from astrolabe_rl.models.families import get_family
from astrolabe_rl.models.schedule import shift_sigma, sigma_of
from astrolabe_rl.models.wan import CausalWan
from astrolabe_rl.toy import vae, world
from astrolabe_rl.toy.model import FM_WEIGHTS, load_toy_model, save_weights, toy_config, toy_geometry
from astrolabe_rl.toy.text import ToyTextEncoder

DEFAULTS = dict(steps=2400, batch=16, lr=1e-3, warmup=50, weight_decay=0.01, ema=0.995, seed=0, caption_noise=0.25)
# Stage 2 fine-tunes stage 1 with half the clips' first blocks at σ = 1. Stage 1 draws the first block's σ like
# every other block's, and teacher-forced blocks 2.. can read the motion off their clean context without the
# prompt, so the only place the direction and speed words must be read, the first block at high σ, gets a sliver
# of the loss: stage 1 alone put its first block 5.4 px from E[x0 | prompt] on *train* prompts and its samples
# moved in a random direction (oracle direction 0.20 on the dev split); these 1000 steps bring 1.7 px and 0.66
# (0.80 for the student distilled from it).
STAGE2 = dict(steps=1000, lr=3e-4, warmup=50, ema=0.99, seed=1, first_block_sigma1=0.5)
# Stages 1 and 2 render the first bed's world, whose background texture is ±0.06; stage 3 fine-tunes stage 2 on
# today's world (`world.WORLD.texture`, ±0.02), the same steps as stage 2. Why the world changed (issue 27): the
# students drew that texture cell by cell with a seam at every 8-pixel token, a background residual (0.05) that
# alone kept render-likeness under 0.3 whatever the objects; a fainter texture keeps the background word's pattern
# and grey level, and asks for less of a 4-layer model.
FIRST_BED_TEXTURE = 0.06
STAGE3 = dict(steps=600, lr=3e-4, warmup=50, ema=0.99, seed=3, first_block_sigma1=0.5)
NOISY_SLOTS = ("colour", "shape", "direction", "speed")  # the attributes the text and motion rewards judge


def sample_sigmas(batch: int, blocks: int, grid: tuple[float, ...], shift: float, g: torch.Generator) -> Tensor:
    """``[batch, blocks]`` noise levels: half from the sampler's grid, half ``shift(U(0, 1))`` (floor 1e-3)."""
    from_grid = torch.tensor(grid, dtype=torch.float64)[torch.randint(len(grid), (batch, blocks), generator=g)]
    u = torch.rand(batch, blocks, generator=g, dtype=torch.float64)
    smooth = shift_sigma(u, shift).clamp_min(1e-3)
    return torch.where(torch.rand(batch, blocks, generator=g) < 0.5, from_grid, smooth)


def training_sigmas(batch: int, blocks: int, grid: tuple[float, ...], shift: float, g: torch.Generator,
                    uniform_share: float = 0.0, first_block_sigma1: float = 0.0) -> Tensor:
    """``[batch, blocks]`` σ of one pretraining step: `sample_sigmas`, then ``uniform_share`` of the clips
    σ ~ U(0, 1) on every block, then ``first_block_sigma1`` of the clips' first blocks at σ = 1 (with more than one
    block). An option at 0 draws nothing, so a recipe without it keeps the data stream it was built with."""
    sig = sample_sigmas(batch, blocks, grid, shift, g)
    if uniform_share > 0:
        uniform = torch.rand(batch, blocks, generator=g, dtype=torch.float64).clamp_min(1e-3)
        sig = torch.where(torch.rand(batch, 1, generator=g) < uniform_share, uniform, sig)
    if first_block_sigma1 > 0 and blocks > 1:
        pure = torch.rand(batch, generator=g) < first_block_sigma1
        sig[:, 0] = torch.where(pure, torch.ones_like(sig[:, 0]), sig[:, 0])
    return sig


@functools.cache
def _train_prompts() -> frozenset[str]:
    """The train split as a set, built once: `miscaption` checks every re-drawn clip against it, every step."""
    return frozenset(world.split("train"))


def miscaption(prompts: list[str], noise: float, g: torch.Generator) -> list[str]:
    """What each clip shows when its caption is ``prompts[i]``: each of `NOISY_SLOTS` re-drawn uniformly with
    probability ``noise`` (possibly to the same word); a result in the held-out split falls back to the caption."""
    train, words = _train_prompts(), dict(world.SLOTS)
    shown = []
    for prompt in prompts:
        spec = world.parse_prompt(prompt).__dict__.copy()
        for name in NOISY_SLOTS:
            options = list(words[name])
            # both numbers are drawn either way, so the generator's stream does not depend on ``noise``
            redraw = float(torch.rand((), generator=g)) < noise
            pick = int(torch.randint(len(options), (), generator=g))
            if redraw:
                spec[name] = options[pick]
        other = world.Spec(**spec).prompt
        shown.append(other if other in train else prompt)
    return shown


def batch_of(step: int, batch: int, seed: int, prompts: list[str], noise: float, g: torch.Generator,
             long_frames: int = 0, scene: world.WorldConfig | None = None) -> tuple[list[int], Tensor]:
    """Caption indices drawn uniformly from ``prompts`` and their clips' latents ``[B, F, C, H, W]`` (`miscaption`).

    ``long_frames > 0``: each clip is instead a window of ``world.WORLD.frames`` frames, at an offset drawn
    uniformly in ``[0, long_frames − frames]``, of a long bouncing video (`world.render_long`): the object anywhere
    in the frame, bouncing off the borders, which the centred clips never show. ``scene``: the world's
    `WorldConfig` to render (default `world.WORLD`; the first stages of the shipped base used a stronger texture)."""
    scene = scene or world.WORLD
    picks = torch.randint(len(prompts), (batch,), generator=g).tolist()
    seeds = [seed * 1_000_003 + step * batch + i for i in range(batch)]
    shown = miscaption([prompts[i] for i in picks], noise, g)
    if not long_frames:
        return picks, vae.encode(world.render(shown, seeds, scene))
    n = scene.frames
    offsets = torch.randint(long_frames - n + 1, (batch,), generator=g).tolist()
    clips = [world.render_long([[(0, p)]], [s], o + n, world=scene)[:, o:] for p, s, o in zip(shown, seeds, offsets)]
    return picks, vae.encode(torch.cat(clips))


@functools.lru_cache(maxsize=None)
def prompt_mean(prompt: str, noise: float, samples: int = 64, scene: world.WorldConfig | None = None) -> Tensor:
    """``E[x0 | caption]`` ``[F, C, H, W]``: a Monte-Carlo mean over ``samples`` seeds and caption errors.

    Computed on first use and kept (a short run pays only for the captions it draws); its own generator, seeded by
    the caption, makes it independent of the order in which captions come up."""
    seeds = [2**40 + j for j in range(samples)]  # far from the training seeds
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:7], "little"))
    return vae.encode(world.render(miscaption([prompt] * samples, noise, g), seeds, scene or world.WORLD)).mean(0)


def flow_loss(model: CausalWan, x0: Tensor, text: Tensor, sigma_blocks: Tensor, noise: Tensor,
              mean: Tensor | None = None) -> Tensor:
    """Teacher-forced velocity MSE; ``sigma_blocks [B, blocks]`` is repeated over each block's frames.

    ``mean`` (``E[x0 | prompt]`` per sample): where the *first* block is at σ = 1 its input is pure noise and it
    has no context, so the best velocity is exactly ``ε − E[x0 | prompt]``; that target replaces the one-sample
    ``ε − x0`` there. Same optimum, none of the sample's variance, and it is the step every rollout starts with.
    """
    fpb = x0.shape[1] // sigma_blocks.shape[1]
    sigma = sigma_blocks.repeat_interleave(fpb, dim=1)  # [B, F]
    s = sigma[:, :, None, None, None].to(x0.dtype)
    x_t = (1 - s) * x0 + s * noise
    # one block spanning the clip is bidirectional attention (the teacher): no block sees clean context then
    clean = x0 if sigma_blocks.shape[1] > 1 else None
    v = model(x_t, sigma * 1000.0, text, frames_per_block=fpb, clean=clean, t_clean=0.0)
    target = noise - x0
    if mean is not None:
        pure = (sigma_blocks[:, 0] == 1.0)[:, None, None, None, None]
        first = torch.where(pure, noise[:, :fpb] - mean[:, :fpb], target[:, :fpb])
        target = torch.cat([first, target[:, fpb:]], dim=1)
    return (v.float() - target).square().mean()


@torch.no_grad()
def validation_loss(model: CausalWan, encoder: ToyTextEncoder, grid: tuple[float, ...], shift: float,
                    bidirectional: bool = False, scene: world.WorldConfig | None = None) -> float:
    """The loss on a fixed batch (64 train-split clips, fixed σ and ε): comparable across runs and checkpoints."""
    g = torch.Generator().manual_seed(12345)
    prompts = world.split("train")
    picks, x0 = batch_of(0, 64, 987, prompts, 0.0, g, scene=scene)  # clean captions: the world as it is
    sig = sample_sigmas(64, 1 if bidirectional else x0.shape[1] // 3, grid, shift, g)
    noise = torch.randn(x0.shape, generator=g)
    return float(flow_loss(model, x0, encoder([prompts[i] for i in picks]), sig, noise))


def pretrain(
    steps: int, batch: int, lr: float, warmup: int, weight_decay: float, ema: float, seed: int, caption_noise: float,
    out: Path, log_every: int = 50, save_every: int = 100, bidirectional: bool = False, init: Path | None = None,
    mean_target: bool = True, uniform_sigma_share: float = 0.0, first_block_sigma1: float = 0.0,
    long_frames: int = 0, geometry: dict | None = None, texture: float | None = None,
) -> dict:
    """Train from scratch (or from the weights file ``init``) and write ``out`` (+ ``out.json`` with the recipe and
    results). Returns the record.

    ``bidirectional``: the distillation teacher (`toy.distill`): one σ per clip and one attention block spanning it
    (every frame sees every other), instead of one σ per 3-frame block under the block-causal teacher-forcing mask.
    ``mean_target``: the first block's σ = 1 target is ε − E[x0 | caption] (`prompt_mean`: 64 renders per caption
    on its first use, worth it over thousands of steps, not in a short fine-tune); off, it is the sample's ε − x0.
    ``uniform_sigma_share``: that share of the clips takes σ ~ U(0, 1) instead (the teacher's many-step ODE and
    DMD's score queries need accurate velocities at low σ, which the shifted grid rarely visits).
    ``first_block_sigma1``: that share of the clips puts their first block at σ = 1 (block-causal only): the one
    step of a rollout that sees neither context nor signal, where the prompt alone must place the object.
    ``long_frames``: train on windows of long bouncing videos up to that many frames (`batch_of`; the long
    teacher of `toy.distill --long`), not on the world's centred clips.
    ``geometry``: `WanConfig` fields that replace the ``toy`` preset's for a model trained from scratch (a bed being
    tried, e.g. ``{"patch_size": [1, 1, 1]}``); with ``init`` the geometry is the init file's.
    ``texture``: the background texture amplitude of the world rendered for training (default the world's own,
    `world.WORLD.texture`); stages 1 and 2 of the shipped base were trained on the first bed's 0.06.

    Every ``save_every`` steps the full state (weights, EMA, optimiser, schedule, data/noise generator, curve) goes
    to ``out.with_suffix(".state.pt")``; a run started with the same arguments resumes from it bit-exactly, so an
    interrupted CPU run loses at most ``save_every`` steps. The state file is removed at the end.
    """
    family = get_family("toy")
    scene = world.WORLD if texture is None else dataclasses.replace(world.WORLD, texture=texture)
    torch.manual_seed(seed)
    model = CausalWan(toy_config(init) if init is not None else toy_geometry(geometry or {}))
    if init is not None:
        model.load_state_dict(load_toy_model(init).state_dict())
    encoder = ToyTextEncoder()
    shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    # linear warm-up, then cosine to 10 %: a short run still ends on a low, stable learning rate
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))
    grid = tuple(float(sigma_of(t)) for t in family.sampler.steps.timesteps)
    shift, prompts = family.sampler.steps.shift, world.split("train")
    g = torch.Generator().manual_seed(seed)
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise is a probability; got {caption_noise}")
    run = {"step": 0, "running": None, "history": [], "wall": 0.0, "cpu": 0.0,
           "args": [steps, batch, lr, warmup, weight_decay, ema, seed, caption_noise, bidirectional,
                    None if init is None else str(init), mean_target, uniform_sigma_share, first_block_sigma1,
                    *([long_frames] if long_frames else []), *([geometry] if geometry else []),
                    *([texture] if texture is not None else [])]}
    state_file = out.with_suffix(".state.pt")
    if state_file.is_file():
        run = _resume(state_file, run, model, shadow, opt, sched, g)
    start, cpu = time.perf_counter() - run["wall"], time.process_time() - run["cpu"]
    for step in range(run["step"], steps):
        picks, x0 = batch_of(step, batch, seed, prompts, caption_noise, g, long_frames, scene)
        blocks = 1 if bidirectional else x0.shape[1] // family.sampler.frames_per_block
        sig = training_sigmas(batch, blocks, grid, shift, g, uniform_sigma_share, first_block_sigma1)
        loss = flow_loss(model, x0, encoder([prompts[i] for i in picks]), sig, torch.randn(x0.shape, generator=g),
                         torch.stack([prompt_mean(prompts[i], caption_noise, scene=scene) for i in picks])
                         if mean_target else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                shadow[k].lerp_(v, 1 - decay)
        value = float(loss.detach())
        run["running"] = value if run["running"] is None else 0.98 * run["running"] + 0.02 * value
        run.update(step=step + 1, wall=time.perf_counter() - start, cpu=time.process_time() - cpu)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            run["history"].append({"step": step + 1, "loss": round(run["running"], 5), "s": round(run["wall"], 1)})
            print(json.dumps(run["history"][-1]), file=sys.stderr, flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            torch.save({"run": run, "model": model.state_dict(), "shadow": shadow, "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "generator": g.get_state()}, state_file)
    model.load_state_dict(shadow)
    save_weights(model, out)
    record = {
        "seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "weight_decay": weight_decay,
        "ema": ema, "caption_noise": caption_noise, "noisy_slots": list(NOISY_SLOTS),
        "attention": "bidirectional" if bidirectional else "block-causal (3-frame blocks, teacher forcing)",
        "init": None if init is None else Path(init).name,
        "sigma_sampling": ("per clip" if bidirectional else "per 3-frame block")
        + ": 1/2 sampler grid, 1/2 shift5(U(0,1))"
        + (f"; a share {uniform_sigma_share} of the clips U(0,1) instead" if uniform_sigma_share else "")
        + (f"; a share {first_block_sigma1} of the clips' first blocks at sigma 1" if first_block_sigma1 else ""),
        "data": f"{world.WORLD.frames}-frame windows of long bouncing videos of up to {long_frames} frames"
        if long_frames else "the world's clips",
        "first_block_sigma1_target": "eps - E[x0 | caption] (64-sample mean over seeds and caption errors)"
        if mean_target else "eps - x0 (the sample's own)",
        "final_train_loss_smoothed": round(run["running"], 5),
        # measured on the saved float16 EMA weights, so a loaded model reproduces it
        "val_loss": round(validation_loss(load_toy_model(out), encoder, grid, shift, bidirectional, scene), 5),
        "wall_s": round(run["wall"], 1), "cpu_s": round(run["cpu"], 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": model.config.to_dict(), "world": scene.__dict__,
        "vae": {"factor": vae.FACTOR, "scale": vae.SCALE}, "train_prompts": len(prompts), "curve": run["history"],
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    state_file.unlink(missing_ok=True)
    return record


def _resume(path: Path, run: dict, model: CausalWan, shadow: dict, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, g: torch.Generator) -> dict:
    """Load a saved state into the fresh objects (in place) and return its progress record."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["run"]["args"] != run["args"]:
        raise ValueError(f"{path} was saved by a run with other arguments {state['run']['args']} (this run: "
                         f"{run['args']}); delete it to start over")
    model.load_state_dict(state["model"])
    for k, v in state["shadow"].items():
        shadow[k].copy_(v)
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    g.set_state(state["generator"])
    print(json.dumps({"resumed_at": state["run"]["step"]}), file=sys.stderr, flush=True)
    return state["run"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="stage-1 optimiser steps")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="clips per step")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="stage-1 peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--ema", type=float, default=DEFAULTS["ema"], help="stage-1 EMA decay of the saved weights")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="weights, data and noise seed of stage 1")
    p.add_argument("--caption-noise", type=float, default=DEFAULTS["caption_noise"],
                   help="probability that each of a clip's colour/shape/direction/speed differs from its caption")
    p.add_argument("--stage2-steps", type=int, default=STAGE2["steps"],
                   help="steps of stage 2, the first-block fine-tune (0: ship stage 1 as it is)")
    p.add_argument("--stage3-steps", type=int, default=STAGE3["steps"],
                   help="steps of stage 3, the fine-tune on today's world (0: ship stage 2, the first bed's world)")
    p.add_argument("--texture", type=float, default=FIRST_BED_TEXTURE,
                   help="background texture amplitude of the world stages 1 and 2 render (stage 3: the world's own)")
    p.add_argument("--geometry", type=json.loads, default=None,
                   help='JSON of WanConfig fields replacing the toy preset\'s for stage 1, e.g. \'{"patch_size": [1, 1, 1]}\'')
    p.add_argument("--work", type=Path, default=Path("runs/toy_pretrain"),
                   help="folder of the earlier stages' weights and every stage's state file (a rerun resumes from them)")
    p.add_argument("--out", type=Path, default=FM_WEIGHTS,
                   help="output .safetensors (a .json record is written next to it)")
    args = p.parse_args(argv)
    # the earlier stages write into --work and are skipped when their record is there (a rerun resumes); the last
    # writes --out and always runs (from its own state file, if any): a record already at --out (the shipped
    # weights', by default) is what it replaces, not a sign that it is done
    stages = ["stage1", *(["stage2"] if args.stage2_steps else []), *(["stage3"] if args.stage3_steps else [])]
    path = {name: args.out if name == stages[-1] else args.work / f"{name}.safetensors" for name in stages}
    done = lambda name: name != stages[-1] and path[name].with_suffix(".json").is_file()  # noqa: E731
    if not done("stage1"):
        pretrain(args.steps, args.batch, args.lr, args.warmup, args.weight_decay, args.ema, args.seed,
                 args.caption_noise, path["stage1"], geometry=args.geometry, texture=args.texture)
    for name, recipe, steps, texture in (("stage2", STAGE2, args.stage2_steps, args.texture),
                                         ("stage3", STAGE3, args.stage3_steps, None)):
        if name not in path or done(name):
            continue
        before = stages[stages.index(name) - 1]
        record = pretrain(steps, args.batch, recipe["lr"], recipe["warmup"], args.weight_decay, recipe["ema"],
                          recipe["seed"], args.caption_noise, path[name], init=path[before],
                          first_block_sigma1=recipe["first_block_sigma1"], texture=texture)
        record[before] = json.loads(path[before].with_suffix(".json").read_text())
        path[name].with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads(args.out.with_suffix(".json").read_text())
    print(json.dumps({k: v for k, v in record.items() if k not in ("curve", "model", *stages)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
