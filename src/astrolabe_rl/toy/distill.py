"""Distil the shipped toy student the way Self-Forcing does it (`reference/distillation.md`, `ar_models.md` §2.5–§2.7).

    python -m astrolabe_rl.toy.distill --compare      # rebuilds weights/toy.safetensors (~15 min, 2 cores)
    python -m astrolabe_rl.toy.distill --long --compare   # extends it into weights/toy_long.safetensors (~8 min on one thread)
    python -m astrolabe_rl.toy.distill --smoke --work /tmp/d --out /tmp/student.safetensors      # a few steps each

Three stages, each resumable (an interrupted run started again with the same arguments continues where it stopped):

1. **Teacher.** A bidirectional many-step flow model: `toy.pretrain` with one σ per clip and one attention block
   spanning the clip, fine-tuned from the flow-matching base ``toy_fm`` (its weights already know the world; the
   fine-tune changes what each frame may attend to, and half its clips take σ ~ U(0, 1) so that the teacher is
   accurate at the low σ its score is queried at). Written to ``WORK/teacher.safetensors``.
2. **Initialisation.** Default: teacher forcing. The student starts from ``toy_fm``, which *is* a
   teacher-forcing init (block-causal flow matching with clean context). With ``--ode-train-steps N > 0``:
   CausVid's ODE regression on top: the teacher's Euler ODE (``--ode-steps`` on the shift-5 grid) maps noise to x0,
   the states at the student's grid σ ∈ {1, .9375, .8333, .625} are kept, and the student learns each block's
   map state → ODE x0 under the teacher-forcing mask:  L = ‖x_σ − σ·v_θ(x_σ) − x0_ODE‖². (On 2 cores the
   teacher's short fine-tune leaves noise in its ODE samples, which ODE regression copies into the student: the
   default skips it.)
3. **DMD** on the student's own autoregressive rollouts (Self-Forcing). Per iteration:
   * roll out: each block is denoised against a KV cache of the student's own clean outputs; one exit step
     k ~ U{0..3} (the same for every block) runs with gradient, earlier steps and every cache commit without;
   * critic (fake score, initialised from the teacher, bidirectional): flow matching on the detached rollout
     ``‖f_ψ(x_t) − (ε − x̂)‖²`` with σ = shift₅(U(0.02, 0.98)); every iteration;
   * generator, every ``--critic-ratio``-th iteration: ``x_t = (1−σ)·x̂ + σ·ε``; x0_real, x0_fake from teacher
     and critic without gradient; ``g = (x0_fake − x0_real) / mean|x̂ − x0_real|`` (per sample);
     ``L_G = ½·mean‖x̂ − sg(x̂ − g)‖²`` (its gradient w.r.t. x̂ is g/numel);
   * Adam β = (0, 0.999), an EMA of the generator from ``--ema-start``; the EMA is what ships.

Every draw (prompts, noise, exit steps, σ) comes from one generator seeded by ``--seed``; the state file holds it,
so a resumed run continues the same stream. Prompts are the train split only: held-out pairs stay unseen.
The record (``OUT.json``) holds the recipe, each stage's loss curve and its wall time; ``--compare`` adds the
student's, the base's and the renders' oracle figures on the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from astrolabe_rl.models.families import get_family
from astrolabe_rl.models.schedule import renoise, shift_sigma, sigma_of, x0_from_velocity
from astrolabe_rl.models.wan import CausalWan
from astrolabe_rl.rewards import pixel
from astrolabe_rl.toy import pretrain as pt
from astrolabe_rl.toy import vae, world
from astrolabe_rl.toy.model import FM_WEIGHTS, LONG_WEIGHTS, WEIGHTS, load_toy_model, save_weights
from astrolabe_rl.toy.text import ToyTextEncoder

# Sized for 2 shared CPU cores (about 15 minutes): the teacher is a short bidirectional fine-tune of the fm base,
# the rates are above Self-Forcing's (2e-6 / 4e-7 for 1.3B at batch 64; a generator rate of 1e-4 filled the
# student's backgrounds with texture), the critic ratio 3 instead of 5 and the EMA shorter (0.99 over 600 generator
# steps there; 0.95 over 100 here), as a 4-layer toy in minutes needs.
DEFAULTS = dict(
    seed=0, teacher_steps=150, teacher_lr=3e-4, batch=16, ode_pairs=128, ode_steps=16, ode_train_steps=0,
    ode_lr=2e-4, dmd_iters=300, dmd_batch=6, lr_gen=2e-5, lr_critic=1e-4, critic_ratio=3, ema=0.95, ema_start=60,
    long_frames=0,
)
# `--long`: the Self-Forcing++ / LongLive extension of the shipped student to long rollouts (`toy_long`). The teacher
# is re-tuned on windows of long bouncing videos (the clip teacher never saw an object near a border), then DMD runs
# on windows of the student's own rollouts of up to `long_frames` latent frames through the rolling cache + sink.
# Rollouts stop at 27 frames (3 windows), so later positions stay unseen. Measured (`toy_long.json`,
# long_comparison): its render-likeness falls a little after the first window (0.18 -> 0.14-0.16 of 45 frames) while
# prompt agreement stays flat (0.55-0.70); the decay is mild, and its objects drift less than the world's.
LONG = dict(long_frames=27, teacher_steps=150, dmd_iters=240, dmd_batch=4, ema_start=60, ode_train_steps=0)
SMOKE = dict(teacher_steps=3, ode_pairs=8, ode_steps=8, ode_train_steps=3, dmd_iters=6, ema_start=2, batch=4,
             dmd_batch=2)
SMOKE_LONG = SMOKE | dict(long_frames=15, ode_train_steps=0)
T_RANGE = (0.02, 0.98)  # DMD / critic timesteps u ~ U(T_RANGE), then shifted (Self-Forcing's min/max step)


def _frames() -> int:
    return world.WORLD.frames


def teacher_velocity(model: CausalWan, x: Tensor, sigma: Tensor, text) -> Tensor:
    """Bidirectional velocity ``[B, F, C, H, W]`` at per-sample ``sigma [B]``: one attention block over the clip."""
    return model(x, (sigma * 1000.0).double(), text, frames_per_block=x.shape[1])


def grid_sigmas() -> tuple[float, ...]:
    """The student's few-step σ grid (1, .9375, .8333, .625 for the toy family's shift-5 warped steps)."""
    return tuple(float(sigma_of(t)) for t in get_family("toy").sampler.steps.timesteps)


@torch.no_grad()
def ode_pairs(teacher: CausalWan, text: Tensor, noise: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """The teacher's Euler ODE from ``noise [B, F, C, H, W]``: states at the student's grid ``[B, S, F, C, H, W]``
    and the final x0 ``[B, F, C, H, W]``.

    The grid is σ_i = shift₅(1 − i/steps), i = 0..steps (σ = 0 last); ``steps`` must be a multiple of the student's
    4 raw steps (1000, 750, 500, 250), so its states are exactly on the ODE's grid.
    """
    raw = get_family("toy").sampler.steps
    n_student = len(raw.timesteps)
    if steps % n_student:
        raise ValueError(f"--ode-steps must be a multiple of {n_student} (the student's steps); got {steps}")
    kv = teacher.encode_text(text)
    x, states = noise.clone(), []
    for i in range(steps):
        s, s_next = shift_sigma(1 - i / steps, raw.shift), shift_sigma(1 - (i + 1) / steps, raw.shift)
        if i % (steps // n_student) == 0:
            states.append(x.clone())
        v = teacher_velocity(teacher, x, torch.full((x.shape[0],), s), kv)
        x = (x.double() + (s_next - s) * v.double()).float()
    return torch.stack(states, dim=1), x


def ode_loss(student: CausalWan, states: Tensor, x0: Tensor, text: Tensor, which: Tensor) -> Tensor:
    """CausVid's regression: block j of sample b starts from ODE state ``which[b, j]``; ``‖x̂0 − x0_ODE‖²``."""
    b, _, f = states.shape[:3]
    fpb = get_family("toy").sampler.frames_per_block
    sig = torch.tensor(grid_sigmas(), dtype=torch.float64)[which].repeat_interleave(fpb, dim=1)  # [B, F]
    idx = which.repeat_interleave(fpb, dim=1)  # [B, F]
    x_t = states[torch.arange(b)[:, None], idx, torch.arange(f)[None, :]]  # [B, F, C, H, W]
    v = student(x_t, sig * 1000.0, text, frames_per_block=fpb, clean=x0, t_clean=0.0)
    return (x0_from_velocity(x_t, v, sig.float()) - x0).square().mean()


def self_forcing_rollout(student: CausalWan, text: Tensor, batch: int, exit_step: int, g: torch.Generator,
                         frames: int | None = None, family: str = "toy") -> Tensor:
    """The student's own autoregressive sample; returns its last ``world.frames`` latent frames ``[B, 9, C, H, W]``
    (the whole clip when ``frames`` is the clip's; `ar_models.md` §2.7).

    Each block: pure noise, the few-step sampler (x̂0 = x − σ·v, re-noise with fresh ε) up to ``exit_step``,
    whose x̂0 is the block's output; the block is then committed to the KV cache without gradient, so no gradient
    flows through the history. Only the returned window's exit calls keep gradients (when they are enabled): a
    longer rollout (``frames``, through ``family``'s cache, e.g. ``toy_long``'s rolling window + sink) is
    Self-Forcing++'s long rollout whose last window the teacher corrects.
    """
    fam = get_family(family)
    frames = frames or _frames()
    window_start = frames - _frames()
    steps = fam.sampler.steps.for_block(first=False)
    c, (hh, ww) = student.config.in_dim, fam.latent_hw
    cache = student.new_cache(batch, fam.latent_hw, frames, fam.sampler.cache)
    cache.text = student.encode_text(text)
    out = []
    for s, e in fam.sampler.block_bounds(frames):
        x = torch.randn(batch, e - s, c, hh, ww, generator=g)
        for k, t_k in enumerate(steps[: exit_step + 1]):
            with torch.set_grad_enabled(torch.is_grad_enabled() and k == exit_step and s >= window_start):
                x0 = x0_from_velocity(x, student.denoise(cache, x, t_k, start_frame=s), sigma_of(t_k))
            if k < exit_step:
                x = renoise(x0, sigma_of(steps[k + 1]), torch.randn(x.shape, generator=g))
        if s >= window_start:
            out.append(x0)
        student.commit(cache, x0.detach(), start_frame=s)
    return torch.cat(out, dim=1)


def _perturb(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """σ = shift₅(U(0.02, 0.98)) per sample ``[B]``, ε, and ``x_t = (1−σ)·x + σ·ε``."""
    u = T_RANGE[0] + (T_RANGE[1] - T_RANGE[0]) * torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    sigma = shift_sigma(u, get_family("toy").sampler.steps.shift)
    eps = torch.randn(x.shape, generator=g)
    return sigma, eps, renoise(x, sigma, eps)


def dmd_loss(x_hat: Tensor, teacher: CausalWan, critic: CausalWan, text: Tensor,
             g: torch.Generator) -> tuple[Tensor, float]:
    """DMD generator loss ``½·mean‖x̂ − sg(x̂ − grad)‖²`` and the normaliser mean|x̂ − x0_real|
    (`distillation.md` §3)."""
    sigma, _, x_t = _perturb(x_hat.detach(), g)
    with torch.no_grad():
        x0_real = x0_from_velocity(x_t, teacher_velocity(teacher, x_t, sigma, text), sigma.float())
        x0_fake = x0_from_velocity(x_t, teacher_velocity(critic, x_t, sigma, text), sigma.float())
        norm = (x_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = (x0_fake - x0_real) / norm
    return 0.5 * (x_hat - (x_hat - grad).detach()).square().mean(), float(norm.mean())


def critic_loss(critic: CausalWan, x_hat: Tensor, text: Tensor, g: torch.Generator) -> Tensor:
    """The fake score's flow-matching loss on the student's detached samples: ``‖f_ψ(x_t) − (ε − x̂)‖²``."""
    sigma, eps, x_t = _perturb(x_hat.detach(), g)
    return (teacher_velocity(critic, x_t, sigma, text) - (eps - x_hat.detach())).square().mean()


def _trainable(path: Path) -> CausalWan:
    return load_toy_model(path).train().requires_grad_(True)


def _adam(model: CausalWan, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999))


def _log(entry: dict) -> None:
    print(json.dumps(entry), file=sys.stderr, flush=True)


def distill(args: argparse.Namespace) -> dict:
    """Run (or resume) the three stages and write the student to ``args.out`` with its record. Returns the record."""
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    recipe = {k: getattr(args, k) for k in DEFAULTS} | {"base": Path(args.base).name,
                                                        "teacher_init": Path(args.teacher_init).name}
    if args.long_frames and (args.long_frames % 3 or args.long_frames < _frames()):
        raise ValueError(f"--long-frames must be a multiple of 3 blocks' frames and ≥ {_frames()}; got {args.long_frames}")
    state_file = work / "distill.state.pt"
    t_start = time.perf_counter()

    # ---- 1. teacher (toy.pretrain, bidirectional; resumes through its own state file)
    teacher_path = work / "teacher.safetensors"
    if not teacher_path.with_suffix(".json").is_file():
        pt.pretrain(args.teacher_steps, args.batch, args.teacher_lr, warmup=min(50, args.teacher_steps),
                    weight_decay=0.01, ema=0.99, seed=args.seed, caption_noise=pt.DEFAULTS["caption_noise"],
                    out=teacher_path, bidirectional=True, init=Path(args.teacher_init), save_every=20, log_every=10,
                    mean_target=False, uniform_sigma_share=0.5, long_frames=args.long_frames)
    teacher_record = json.loads(teacher_path.with_suffix(".json").read_text())
    teacher = load_toy_model(teacher_path)
    encoder, prompts = ToyTextEncoder(), world.split("train")

    state = torch.load(state_file, weights_only=False) if state_file.is_file() else None
    if state is not None and state["recipe"] != recipe:
        raise ValueError(f"{state_file} was saved by a run with another recipe {state['recipe']} (this run: "
                         f"{recipe}); delete {work} to start over")
    g = torch.Generator().manual_seed(args.seed + 1)
    run = {"stage": "ode_data", "step": 0, "ode_curve": [], "dmd_curve": [], "wall": {}, "running": {}}
    if state is not None:
        run, _ = state["run"], g.set_state(state["generator"])
        _log({"resumed": run["stage"], "step": run["step"]})

    # ---- 2a. ODE pairs from the teacher (kept in the work folder); none for a teacher-forcing init
    pairs_file = work / "ode_pairs.pt"
    if args.ode_train_steps > 0 and not pairs_file.is_file():
        t0 = time.perf_counter()
        pg = torch.Generator().manual_seed(args.seed + 2)
        picks = torch.randint(len(prompts), (args.ode_pairs,), generator=pg).tolist()
        chunks = []
        for i in range(0, args.ode_pairs, 64):
            sel = picks[i:i + 64]
            noise = torch.randn(len(sel), _frames(), vae.CHANNELS, *get_family("toy").latent_hw, generator=pg)
            chunks.append(ode_pairs(teacher, encoder([prompts[j] for j in sel]), noise, args.ode_steps))
        torch.save({"picks": picks, "states": torch.cat([c[0] for c in chunks]).half(),
                    "x0": torch.cat([c[1] for c in chunks]).half(), "wall": time.perf_counter() - t0}, pairs_file)
    if args.ode_train_steps > 0:
        pairs = torch.load(pairs_file, weights_only=False)
        run["wall"]["ode_data"] = round(pairs["wall"], 1)

    student = _trainable(Path(args.base))
    critic = _trainable(teacher_path)
    opt_g, opt_c = _adam(student, args.ode_lr), _adam(critic, args.lr_critic)
    shadow = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if state is not None:
        student.load_state_dict(state["student"])
        critic.load_state_dict(state["critic"])
        opt_g.load_state_dict(state["opt_g"])
        opt_c.load_state_dict(state["opt_c"])
        shadow = state["shadow"]

    def save() -> None:
        torch.save({"recipe": recipe, "run": run, "generator": g.get_state(), "student": student.state_dict(),
                    "critic": critic.state_dict(), "opt_g": opt_g.state_dict(), "opt_c": opt_c.state_dict(),
                    "shadow": shadow}, state_file)

    # ---- 2b. ODE regression
    if run["stage"] == "ode_data":
        run["stage"], run["step"] = "ode", 0
    t0 = time.perf_counter() - run["wall"].get("ode", 0.0)
    fpb = get_family("toy").sampler.frames_per_block
    while run["stage"] == "ode" and run["step"] < args.ode_train_steps:
        sel = torch.randint(args.ode_pairs, (args.batch,), generator=g)
        which = torch.randint(len(grid_sigmas()), (args.batch, _frames() // fpb), generator=g)
        text = encoder([prompts[pairs["picks"][int(i)]] for i in sel])
        loss = ode_loss(student, pairs["states"][sel].float(), pairs["x0"][sel].float(), text, which)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_g.step()
        run["step"] += 1
        run["running"]["ode"] = _smooth(run["running"].get("ode"), float(loss.detach()))
        run["wall"]["ode"] = time.perf_counter() - t0
        if run["step"] % args.log_every == 0 or run["step"] == args.ode_train_steps:
            run["ode_curve"].append({"step": run["step"], "loss": round(run["running"]["ode"], 5),
                                     "s": round(run["wall"]["ode"], 1)})
            _log({"stage": "ode"} | run["ode_curve"][-1])
        if run["step"] % args.save_every == 0:
            save()
    if run["stage"] == "ode":
        run["stage"], run["step"] = "dmd", 0
        for group in opt_g.param_groups:
            group["lr"] = args.lr_gen
        opt_g.state.clear()  # fresh moments for the DMD objective
        shadow = {k: v.detach().clone() for k, v in student.state_dict().items()}
        save()

    # ---- 3. DMD on the student's own rollouts, critic alongside
    t0 = time.perf_counter() - run["wall"].get("dmd", 0.0)
    n_steps = len(get_family("toy").sampler.steps.timesteps)
    while run["stage"] == "dmd" and run["step"] < args.dmd_iters:
        it = run["step"]
        text = encoder([prompts[int(i)] for i in torch.randint(len(prompts), (args.dmd_batch,), generator=g)])
        exit_step = int(torch.randint(n_steps, (), generator=g))
        frames = None  # the clip; --long: a rollout of 3..long_frames/3 blocks, its last window trained
        if args.long_frames:
            fpb = get_family("toy").sampler.frames_per_block
            frames = fpb * int(torch.randint(_frames() // fpb, args.long_frames // fpb + 1, (), generator=g))
        generator_turn = it % args.critic_ratio == 0
        with torch.set_grad_enabled(generator_turn):
            x_hat = self_forcing_rollout(student, text, args.dmd_batch, exit_step, g, frames,
                                         "toy_long" if args.long_frames else "toy")
        if generator_turn:
            loss_g, norm = dmd_loss(x_hat, teacher, critic, text, g)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 10.0)
            opt_g.step()
            with torch.no_grad():
                decay = args.ema if it >= args.ema_start else 0.0  # before ema_start the EMA is a copy
                for k, v in student.state_dict().items():
                    shadow[k].lerp_(v, 1 - decay)
            run["running"]["norm"] = _smooth(run["running"].get("norm"), norm)
            run["running"]["sharp"] = _smooth(run["running"].get("sharp"),
                                              float(pixel.sharpness(vae.decode(x_hat.detach())).mean()))
        loss_c = critic_loss(critic, x_hat, text, g)
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 10.0)
        opt_c.step()
        run["running"]["critic"] = _smooth(run["running"].get("critic"), float(loss_c.detach()))
        run["step"] += 1
        run["wall"]["dmd"] = time.perf_counter() - t0
        if run["step"] % args.log_every == 0 or run["step"] == args.dmd_iters:
            run["dmd_curve"].append({"iter": run["step"], "critic_loss": round(run["running"]["critic"], 5),
                                     "dmd_norm": round(run["running"]["norm"], 5),
                                     "rollout_sharpness": round(run["running"]["sharp"], 6),
                                     "s": round(run["wall"]["dmd"], 1)})
            _log({"stage": "dmd"} | run["dmd_curve"][-1])
        if run["step"] % args.save_every == 0:
            save()

    student.load_state_dict(shadow)
    save_weights(student, out)
    record = {
        "kind": "DMD-distilled 4-step causal student (Self-Forcing recipe)" if not args.long_frames else
        f"the toy student extended to long rollouts (Self-Forcing++): DMD on the last {_frames()}-frame window of "
        f"its own rollouts of {_frames()}..{args.long_frames} latent frames through toy_long's rolling cache "
        f"({get_family('toy_long').sampler.cache}), teacher re-tuned on windows of long bouncing videos",
        "recipe": recipe,
        "teacher": {k: teacher_record.get(k) for k in ("steps", "lr", "attention", "init", "sigma_sampling", "data",
                                                        "caption_noise", "val_loss", "wall_s", "curve")},
        "student_init": "ODE regression on the teacher's ODE pairs" if args.ode_train_steps else
        f"the shipped clip student {Path(args.base).name}" if args.long_frames else
        "teacher forcing: the fm base (block-causal teacher-forced flow matching on the world's clips), no ODE stage",
        "ode_regression": {"pairs": args.ode_pairs, "teacher_ode_steps": args.ode_steps,
                           "student_grid_sigmas": [round(s, 5) for s in grid_sigmas()], "curve": run["ode_curve"]}
        if args.ode_train_steps else None,
        "dmd": {"t_range": T_RANGE, "adam_betas": [0.0, 0.999], "clip_grad_norm": 10.0, "curve": run["dmd_curve"],
                "generator_steps": math.ceil(args.dmd_iters / args.critic_ratio)},
        "wall_s": {k: round(v, 1) for k, v in run["wall"].items()} | {"teacher": teacher_record["wall_s"]},
        "this_session_wall_s": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": student.config.to_dict(), "world": world.WORLD.__dict__,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


@torch.no_grad()
def compare(weights: dict[str, Path], split: str = "test", prompts: int = 16, samples: int = 4) -> dict:
    """Each model's 4-step samples on ``prompts`` balanced prompts of ``split`` (``samples`` seeds each) and the
    world's renders of the same prompts, scored by the oracle and the proxies: name -> {figure: mean}.

    Figures: the oracle's (headline, agreement and each attribute, residual), ``diversity`` (`within_prompt_diversity`)
    and the rewards ``toy_quality``, ``toy_quality_hackable``, ``toy_motion``, ``toy_text``, ``toy_noise``.
    """
    from astrolabe_rl.rollout import rollout
    from astrolabe_rl.toy import oracle
    from astrolabe_rl.toy import rewards as R

    fam = get_family("toy")
    chosen = world.eval_prompts(prompts, split)
    batch = [p for p in chosen for _ in range(samples)]
    seeds = [7919 * i + j for i in range(len(chosen)) for j in range(samples)]
    videos = {"renders": world.render(batch, seeds)}
    for name, path in weights.items():
        z = rollout(load_toy_model(path), ToyTextEncoder()(chosen), num_frames=_frames(), latent_hw=fam.latent_hw,
                    sampler=fam.sampler, seeds=seeds, candidates=samples).latents
        videos[name] = vae.decode(z)
    out = {}
    for name, v in videos.items():
        scores = oracle.oracle_scores(v, batch)
        row = {k: float(x.mean()) for k, x in scores.items()}
        row["diversity"] = float(oracle.within_prompt_diversity(v, samples).mean())
        for reward, fn in (("toy_quality", R.quality), ("toy_quality_hackable", R.quality_hackable),
                           ("toy_motion", R.motion), ("toy_text", R.text_alignment), ("toy_noise", R.noise_level)):
            row[reward] = float(fn(v, batch).mean())
        out[name] = {k: round(x, 4) for k, x in row.items()}
    return {"split": split, "prompts": len(chosen), "samples_per_prompt": samples, "scores": out}


@torch.no_grad()
def compare_long(weights: dict[str, Path], frames: int = 45, prompts: int = 8, samples: int = 2) -> dict:
    """Each model's rollouts of ``frames`` latent frames through ``toy_long``'s rolling cache + sink, and the world's
    long renders, on balanced test-split prompts: per window of 9 frames, the window oracle
    (`oracle.window_scores`) and the rewards; over whole videos, the coherence. name -> {figure: [per window]}."""
    from astrolabe_rl.rollout import rollout
    from astrolabe_rl.toy import oracle
    from astrolabe_rl.toy import rewards as R

    fam, n = get_family("toy_long"), _frames()
    chosen = world.eval_prompts(prompts, "test")
    batch = [p for p in chosen for _ in range(samples)]
    seeds = [7919 * i + j for i in range(len(chosen)) for j in range(samples)]
    videos = {"renders": world.render_long([[(0, p)] for p in batch], seeds, frames)}
    for name, path in weights.items():
        z = rollout(load_toy_model(path), ToyTextEncoder()(chosen), num_frames=frames, latent_hw=fam.latent_hw,
                    sampler=fam.sampler, seeds=seeds, candidates=samples).latents
        videos[name] = vae.decode(z)
    out = {}
    for name, v in videos.items():
        row = {k: x.mean(0).tolist() for k, x in oracle.window_scores(v, batch, n).items()
               if k in ("oracle", "agreement", "render")}
        for reward, fn in (("toy_quality", R.quality), ("toy_motion_long", R.motion_long), ("toy_text", R.text_alignment)):
            row[reward] = [float(fn(v[:, k * n:(k + 1) * n], batch).mean()) for k in range(frames // n)]
        out[name] = {k: [round(x, 4) for x in xs] for k, xs in row.items()}
        out[name]["coherence"] = round(float(R.coherence(v, n).mean()), 4)
    return {"split": "test", "frames": frames, "prompts": len(chosen), "samples_per_prompt": samples, "windows": out}


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else 0.95 * old + 0.05 * new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in DEFAULTS.items():  # None: the mode's default (DEFAULTS, or LONG over them with --long)
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None, help=f"default {value}")
    p.add_argument("--long", action="store_true",
                   help="extend the shipped student to long rollouts (Self-Forcing++, `LONG`) into toy_long")
    p.add_argument("--base", type=Path, default=None,
                   help="student init: the fm base (default), or with --long the shipped clip student")
    p.add_argument("--teacher-init", type=Path, default=FM_WEIGHTS, help="the teacher's fine-tune starts here")
    p.add_argument("--work", type=Path, default=None,
                   help="teacher, ODE pairs and state file (default runs/toy_distill, runs/toy_distill_long)")
    p.add_argument("--out", type=Path, default=None,
                   help="the student's .safetensors (+ .json record; default the shipped toy or toy_long weights)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (checks the pipeline)")
    p.add_argument("--compare", action="store_true",
                   help="after distilling, score the student, the fm base and the renders on the oracle (test split) "
                        "and add the figures to the student's record")
    args = p.parse_args(argv)
    mode = DEFAULTS | (LONG if args.long else {}) | ((SMOKE_LONG if args.long else SMOKE) if args.smoke else {})
    for k, v in mode.items():
        if getattr(args, k) is None or (args.smoke and k in SMOKE):
            setattr(args, k, v)
    args.base = args.base or (WEIGHTS if args.long else FM_WEIGHTS)
    args.work = args.work or Path("runs/toy_distill_long" if args.long else "runs/toy_distill")
    args.out = args.out or (LONG_WEIGHTS if args.long else WEIGHTS)
    if args.smoke:
        args.log_every = args.save_every = 2
    record = distill(args)
    if args.compare and args.long:
        record["long_comparison"] = compare_long({"long_student": Path(args.out), "clip_student": Path(args.base)},
                                                 frames=15 if args.smoke else 45, prompts=4 if args.smoke else 8,
                                                 samples=1 if args.smoke else 2)
        Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record["long_comparison"]))
    elif args.compare:
        record["oracle_comparison"] = compare({"student": Path(args.out), "fm_base": Path(args.base)},
                                              prompts=8 if args.smoke else 16, samples=2 if args.smoke else 4)
        Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record["oracle_comparison"]))
    print(json.dumps({k: record[k] for k in ("recipe", "wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
