"""The Astrolabe training recipe: online forward-process RL (NFT) for a distilled AR video model.

One epoch is one optimiser step as released (`reference/astrolabe.md` §2.2, DESIGN §3; ``train.update_passes``
takes several over the same rollouts, each followed by the sync):

    plan      = sampler.epoch_plan(epoch)                 P prompts × K candidates, spread over the ranks
    reference_phase(...)                                   train.reference=dynamic: re-copy the reference from θ?
    batch     = rollout_phase(...)                         θ_old samples clean latents x0 [n, F, C, H, W]; each
                                                           micro-batch is decoded and sent to the scorer
    scores    = score_phase(...)                           every reward raw (+ monitors)
    adv       = advantage_phase(...)                       gather, combine, A = (R − mean_group)/(std + 1e-4), r
    kl_mask   = regularize_phase(...)                      which samples the KL covers (all, or the selective set)
    stats     = update_phase(...)                          per micro-batch: σ, ε, x_t, 3 passes, NFT loss; one step
    sync_phase(...)                                        θ_old ← η·θ_old + (1 − η)·θ ; EMA (+ the EMA references)
    evaluate / log / checkpoint

``train.mode=streaming`` swaps two phases for their long-video forms (`train.streaming`): the rollout rolls each
prompt's history once and samples K candidates of one window, of which only the window is decoded and scored, and
the update's passes see the history as detached K/V.

`train` runs `setup`, the epochs and `teardown`; a caller that needs to act around them (the toy demo films the
base before training and the EMA after) passes `Callbacks` rather than copying the loop. Everything that touches
torch.distributed lives in `train.dist`; this file reads like the algorithm.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from astrolabe_rl.algo.advantages import group_advantages, group_reward_stats, optimality_probability
from astrolabe_rl.algo.nft import kl_term, nft_objective
from astrolabe_rl.algo.regularize import (
    RegularizerState,
    adapt_rho,
    mean_non_negative,
    next_threshold,
    select,
    should_reset,
    uncertainty,
)
from astrolabe_rl.algo.sync import ema_decay, old_decay
from astrolabe_rl.config import CRITICAL_KEYS, Config, TrainConfig, dump_yaml, to_dict
from astrolabe_rl.models.build import ModelIO, ModelSource, load_model_io
from astrolabe_rl.models.families import Family, SamplerConfig, get_family
from astrolabe_rl.models.schedule import renoise, sigma_of, x0_from_velocity
from astrolabe_rl.models.wan import CausalWan
from astrolabe_rl.policy import Policy
from astrolabe_rl.rewards.async_ import AsyncScorer
from astrolabe_rl.rewards.base import (FailureReport, Reward, RewardFailureError, build_reward, check_failures,
                                      check_reward, score_all)
from astrolabe_rl.rewards.combine import combine_rewards
from astrolabe_rl.rollout import BlockTrace, PromptSwitch, rollout, rollout_window
from astrolabe_rl.train import dist
from astrolabe_rl.train.checkpoint import (
    RunDirError,
    RunDirLock,
    capture_rng,
    check_resume_compatible,
    claim_run_dir,
    load_resume,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from astrolabe_rl.train.logging import RunLogger, progress, write_atomic
from astrolabe_rl.train.streaming import (WindowPasses, commit_history, decode_window, pixel_frame, window_frames,
                                         window_start)

RELEASE_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # the unwarped DMD list the released trainer re-noises at


# ------------------------------------------------------------------------------------------------ state


@dataclass
class World:
    """Everything built once per run (by `setup`, by keyword), plus the step and epoch counters."""

    cfg: Config
    ctx: dist.DistContext
    family: Family
    sampler: SamplerConfig
    num_frames: int  # latent frames per video
    io: ModelIO  # the base DiT (inside `policy`), the text encoder and the decoder
    policy: Policy
    train_model: torch.nn.Module  # the DDP/FSDP-wrapped DiT for the θ pass (== policy.model in one process)
    optimizer: torch.optim.Optimizer
    rewards: dict[str, Reward]
    weights: dict[str, float]
    monitors: dict[str, Reward]
    eval_monitors: dict[str, Reward]  # scored by `evaluate` only (eval.monitors)
    scorer: AsyncScorer  # rewards + monitors, in the background when rewards.async_scoring
    prompts: list[str]
    eval_prompts: list[str]
    sampler_plan: dist.GroupSampler
    logger: RunLogger
    reference: tuple[str, ...]  # `Policy.use` names whose mean x̂0 is the KL's reference (`reference_adapters`)
    reg: RegularizerState  # selective KL's ρ and buffer, the dynamic reference's threshold and last copy
    step: int = 0
    epoch: int = 0


@dataclass
class Callbacks:
    """Hooks around `train`'s loop (each optional): ``on_start(world)`` after setup (and resume), ``on_epoch(world,
    metrics)`` after each epoch, ``on_end(world)`` after the last epoch, before teardown."""

    on_start: Callable[[World], None] | None = None
    on_epoch: Callable[[World, dict[str, float]], None] | None = None
    on_end: Callable[[World], None] | None = None


@dataclass
class Batch:
    """This rank's rollouts of one epoch."""

    latents: Tensor  # [n, F, C, H, W] clean endpoints
    text: Tensor  # [n, L, D] text embeddings
    prompt_ids: Tensor  # [n] long, the group ids
    global_index: Tensor  # [n] long, position in the epoch's global batch
    seeds: list[int]
    prompts: list[str]
    pending: list[Future | "WindowScore"]  # the scorer's results, one per micro-batch: .result() -> {name: [b]}
    first_videos: Tensor | None  # decoded videos of the first micro-batch [b, T, 3, H, W], for logging
    windows: list["Window"] | None = None  # train.mode=streaming: the prompts' histories and window starts
    inputs: Tensor | None = None  # train.noise=rollout: the sampler's noisy inputs [n, S, F, C, H, W] at its S steps
    timesteps: tuple[float, ...] = ()  # train.noise=rollout: the S timesteps of ``inputs``


@dataclass
class Window:
    """Streaming: the samples ``rows`` (a slice of the batch) are K candidates of the window starting at latent frame
    ``start`` of one prompt's video, whose clean history is ``history [1, start, C, h, w]``; ``Batch.text`` holds the
    video's first prompt."""

    rows: slice
    start: int
    history: Tensor
    seed: int  # seeds the context noise of the history's re-commits (families with a context timestep > 0)
    switches: dict[int, Tensor]  # a multi-prompt video's later prompts: {latent frame: text [1, L, D]}


# ------------------------------------------------------------------------------------------------ setup


def _device_and_dtype(cfg: Config, ctx: dist.DistContext) -> tuple[torch.device, torch.dtype]:
    device = ctx.device if cfg.model.device == "auto" else torch.device(cfg.model.device)
    if cfg.model.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.model.dtype)


def _read_prompts(path: str | None, inline: list[str], what: str) -> list[str]:
    from astrolabe_rl.models.text import read_prompt_file

    return list(inline) if path is None else read_prompt_file(path, f"{what} file")


def model_source(cfg: Config) -> ModelSource:
    """Where the run's weights come from (`models.build`, the builder every command uses)."""
    m = cfg.model
    return ModelSource(checkpoint=m.checkpoint, lora=m.lora, wan_dir=m.wan_dir, init_seed=m.init_seed, vae=m.vae,
                       trust_checkpoint=m.trust_checkpoint)


def reference_adapters(cfg: Config) -> tuple[str, ...]:
    """The adapters whose mean x̂0 is the KL's reference (``train.reference``): the bare base model, one copy of θ
    re-taken by the dynamic rule, or one EMA of θ per ``regularize.ema_decays``."""
    if cfg.train.reference == "base":
        return ("base",)
    if cfg.train.reference == "dynamic":
        return ("ref",)
    return tuple(f"ref_ema{i}" for i in range(len(cfg.regularize.ema_decays)))


def setup(cfg: Config) -> World:
    """Build the world: distributed context, model + adapters, optimiser, rewards, prompts, logger, resume.

    What can be checked without building anything is checked first (`preflight`), then the run folder is claimed
    (`claim_run_dir`), so a second run into it fails before anything is built; nothing is written into it (the
    logger's files) before the checkpoint to resume from has loaded, so a run that fails to start leaves the folder
    as it found it. The logger holds the lock and gives it up when it closes (`teardown`, or here if setup fails).
    """
    preflight(cfg)
    ctx = dist.init_distributed(None if cfg.model.device == "auto" else cfg.model.device)
    lock = _claim_run_dir(cfg, ctx)
    try:
        return _build(cfg, ctx, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def preflight(cfg: Config) -> None:
    """The checks that need no model: prompt files, rewards and their keywords, the epoch plan, the checkpoint to
    resume from and the adapter to start from; each raises a ValueError (or FileNotFoundError) saying what to
    change, before the run folder is touched."""
    from astrolabe_rl.errors import path_problem

    prompts = _read_prompts(cfg.data.train_prompts, cfg.data.prompts, "data.train_prompts")
    _read_prompts(cfg.data.eval_prompts, cfg.data.eval_inline, "data.eval_prompts")
    dist.GroupSampler(len(prompts), cfg.rollout.prompts_per_epoch, cfg.rollout.candidates, 1, 0, cfg.train.seed)
    for item in cfg.rewards.components:
        check_reward(item.name, item.kwargs)
    for name in (*cfg.rewards.monitors, *cfg.eval.monitors):
        check_reward(name)
    resolve_resume(Path(cfg.run_dir), cfg.checkpoint.resume)
    if cfg.lora.init and not Path(cfg.lora.init).is_dir() and path_problem(cfg.lora.init, "lora.init"):
        raise FileNotFoundError(path_problem(cfg.lora.init, "lora.init"))


def _claim_run_dir(cfg: Config, ctx: dist.DistContext) -> RunDirLock | None:
    """Rank 0 takes the run folder (lock, fresh-run check, overwrite); every rank raises if it could not, so no rank
    waits at a collective for one that stopped."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = claim_run_dir(cfg.run_dir, resume=cfg.checkpoint.resume, overwrite=cfg.checkpoint.overwrite)
        except RunDirError as e:
            error = str(e)
    errors = [e for e in dist.all_gather_object(ctx, error) if e]
    if errors:
        raise RunDirError(errors[0])
    return lock


def _build(cfg: Config, ctx: dist.DistContext, lock: RunDirLock | None) -> World:
    device, dtype = _device_and_dtype(cfg, ctx)
    family = get_family(cfg.model.family)
    num_frames = cfg.rollout.num_frames or family.horizon_frames
    streaming = cfg.train.mode == "streaming"

    io = load_model_io(family, model_source(cfg), device, dtype)
    io.model.gradient_checkpointing = cfg.model.gradient_checkpointing
    io.model.attn_backend = cfg.model.attn_backend
    compile_ = {"auto": None, "on": True, "off": False}[cfg.model.compile]
    reference = reference_adapters(cfg)
    policy = Policy(io.model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets,
                    seed=dist.mix_seed(cfg.train.seed, "lora-init"), compile_sampling=compile_,
                    extra_adapters=[a for a in reference if a != "base"])
    io.model.compile_blocks(compile_)
    if cfg.lora.init:
        policy.load_adapter(cfg.lora.init)
        for name in policy.extra_adapters:  # a moving reference starts where θ starts
            policy.copy_(name, "default")
    # streaming passes call the DiT's cached modes, not its wrapped forward, so DDP's hooks never fire: its gradients
    # are averaged by hand (`update_phase`). FSDP2 shards the blocks in place and reduces in their own hooks, which
    # every entry into a block fires, cached modes included.
    strategy = "none" if streaming and cfg.dist.strategy == "ddp" else cfg.dist.strategy
    train_model = dist.wrap_model(policy.model, ctx, strategy)
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(),
        lr=cfg.train.lr,
        betas=tuple(cfg.train.adam_betas),
        eps=cfg.train.adam_eps,
        weight_decay=cfg.train.weight_decay,
    )

    rewards = {item.name: build_reward(item.name, **item.kwargs) for item in cfg.rewards.components}
    monitors = {name: build_reward(name) for name in cfg.rewards.monitors}
    prompts = _read_prompts(cfg.data.train_prompts, cfg.data.prompts, "data.train_prompts")
    resume = load_resume(Path(cfg.run_dir), cfg.checkpoint.resume, rank=ctx.rank,
                         warn=lambda m: print(m, file=sys.stderr, flush=True) if ctx.is_main else None)
    if resume is not None:
        check_resume_compatible(with_defaults(resume[1]["config"]), to_dict(cfg), CRITICAL_KEYS,
                                cfg.checkpoint.force_resume)
    world = World(
        cfg=cfg, ctx=ctx, family=family, num_frames=num_frames, io=io,
        sampler=family.sampler_for(cfg.streaming.video_frames if streaming else num_frames),
        policy=policy, train_model=train_model, optimizer=optimizer, rewards=rewards,
        weights={item.name: item.weight for item in cfg.rewards.components}, monitors=monitors,
        eval_monitors={name: build_reward(name) for name in cfg.eval.monitors},
        scorer=AsyncScorer({**rewards, **monitors}, enabled=cfg.rewards.async_scoring, on_error=None),
        prompts=prompts, eval_prompts=_read_prompts(cfg.data.eval_prompts, cfg.data.eval_inline, "data.eval_prompts"),
        sampler_plan=dist.GroupSampler(len(prompts), cfg.rollout.prompts_per_epoch, cfg.rollout.candidates,
                                       ctx.world_size, ctx.rank, cfg.train.seed),
        logger=RunLogger(Path(cfg.run_dir), tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                         wandb_project=cfg.log.wandb_project, config=to_dict(cfg), is_main=ctx.is_main, owner=lock),
        reference=reference,
        reg=RegularizerState(rho=cfg.regularize.rho, threshold=cfg.regularize.reset_threshold),
    )
    _resume(world, resume)
    return world


def with_defaults(saved: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint's config laid over today's defaults (``to_dict(Config())``): a field added since the checkpoint
    was written reads as its default, which is what the saving run computed with, so resuming it is refused only
    for values that really changed."""
    out = dict(to_dict(Config()) if defaults is None else defaults)
    for key, value in saved.items():
        out[key] = with_defaults(value, out[key]) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resume(world: World, resume: tuple[Path, dict[str, Any]] | None) -> None:
    """Put a loaded checkpoint's state (`load_resume`: its path and state) into the world; None: a fresh start."""
    cfg = world.cfg
    if resume is None:
        if cfg.checkpoint.resume is not None:  # resume=auto before the first checkpoint: the run starts over
            world.logger.rewind(0, epoch=0)
        return
    path, state = resume
    world.policy.load_state_dict(state["policy"])
    world.optimizer.load_state_dict(state["optimizer"])
    dist.shard_optimizer_state_(world.optimizer)
    world.step, world.epoch = state["trainer"]["step"], state["trainer"]["epoch"]
    world.sampler_plan.load_state_dict(state["trainer"]["sampler"])
    if "regularizer" in state["trainer"]:
        world.reg = RegularizerState.from_state_dict(state["trainer"]["regularizer"])
    restore_rng(state["rng"])
    world.logger.rewind(world.step, epoch=world.epoch)  # what was logged after the checkpoint is logged again
    if world.ctx.is_main:
        print(f"resumed from {path} at step {world.step}")


# ------------------------------------------------------------------------------------------------ phases


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def sample_videos(world: World, model: CausalWan, text: Tensor, seeds: list[int],
                  inputs: list[tuple[Tensor, tuple[float, ...]]] | None = None
                  ) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Sample one video per (text embedding ``[n, L, D]``, seed) with the family's own few-step sampler (CFG-free)
    in micro-batches of ``rollout.micro_batch``, and decode each: yields ``(slice into the n, latents [b, F, C, h, w],
    videos [b, T, 3, H, W] float in [0, 1])`` as each micro-batch is ready. Training, evaluation and the demo sample
    here; the caller encodes the prompts once and keeps the embeddings for what follows (the update, the KL).
    With an ``inputs`` list, each micro-batch's sampler inputs ``[b, S, F, C, h, w]`` and their S timesteps
    (`trajectory`) are appended to it."""
    for sl in _chunks(text.shape[0], world.cfg.rollout.micro_batch):
        out = rollout(model, text[sl], num_frames=world.num_frames, latent_hw=world.family.latent_hw,
                      sampler=world.sampler, seeds=seeds[sl], record=inputs is not None)
        if inputs is not None:
            inputs.append(trajectory(out.traces))
        yield sl, out.latents, world.io.decode(out.latents).float()


def trajectory(traces: list[BlockTrace]) -> tuple[Tensor, tuple[float, ...]]:
    """The blocks' recorded sampler inputs as one clip per step: ``[B, S, F, C, H, W]`` and the S timesteps.

    Step k of every block is taken at the same timestep, so a family whose first block samples on another list
    (Causal Forcing++'s few-step models) cannot be trained this way: the error says so."""
    steps = {t.timesteps for t in traces}
    if len(steps) != 1:
        raise ValueError(f"train.noise=rollout needs one step list for every block; this sampler uses {sorted(steps)}: "
                         "use train.noise=fresh")
    return torch.cat([t.inputs for t in traces], dim=2), traces[0].timesteps


def rollout_phase(world: World, plan: list[dist.Sample]) -> Batch:
    """θ_old samples every planned video, in micro-batches, through `Policy.sampling_model` (θ_old merged into a
    plain DiT in the base's dtype: rollouts cost what the bare model costs, which is what `bench/rollout.py` times).

    Each micro-batch is decoded and handed to the scorer at once, so with ``rewards.async_scoring`` the rewards of
    micro-batch k run while micro-batch k+1 is sampled.
    """
    prompts = [world.prompts[s.prompt_id] for s in plan]
    seeds = [s.seed_for_noise for s in plan]
    text = world.io.encode(prompts)
    latents, pending, first_videos = [], [], None
    inputs: list[tuple[Tensor, tuple[float, ...]]] | None = [] if world.cfg.train.noise == "rollout" else None
    for sl, lat, videos in sample_videos(world, world.policy.sampling_model(), text, seeds, inputs):
        latents.append(lat)
        first_videos = videos if first_videos is None else first_videos
        pending.append(world.scorer.submit(videos, prompts[sl]))
    device = latents[0].device
    return Batch(
        latents=torch.cat(latents),
        text=text,
        prompt_ids=torch.tensor([s.prompt_id for s in plan], device=device),
        global_index=torch.tensor([s.global_index for s in plan], device=device),
        seeds=seeds,
        prompts=prompts,
        pending=pending,
        first_videos=first_videos,
        inputs=None if inputs is None else torch.cat([x for x, _ in inputs]),
        timesteps=inputs[0][1] if inputs else (),
    )


def streaming_rollout_phase(world: World, plan: list[dist.Sample]) -> Batch:
    """``train.mode=streaming``: per prompt of this rank, θ_old rolls the history up to the window start once and its
    candidates sample the window from that exact cache (`rollout_window`, ``rollout.micro_batch`` at a time); only
    the window is decoded (`decode_window`) and sent to the scorer. The window start is drawn per epoch or per prompt
    (``streaming.per``), the history's noise per (epoch, prompt), so every rank holding part of a group rolls the same
    history.

    A prompt line may be a schedule, ``scene one [10s] | scene two`` (`generate.parse_prompt_line`, LongLive's
    interactive setting): the prompt switches at the scene starts, with the family's re-cache, in the history or in
    the window; the window is scored against the scene(s) it shows (`WindowScore`: a window straddling a switch is
    scored part by part, weighted by frames).
    """
    from astrolabe_rl.generate import parse_prompt_line, switch_frames

    cfg, st = world.cfg, world.cfg.streaming
    lines = [world.prompts[s.prompt_id] for s in plan]
    seeds = [s.seed_for_noise for s in plan]
    model = world.policy.sampling_model()
    latents, texts, pending, windows, first_videos = [], [], [], [], None
    for rows in _groups(plan):
        scenes = parse_prompt_line(lines[rows.start])
        frames = switch_frames(scenes, world.sampler, st.video_frames, world.family.temporal_stride)
        scene_text = world.io.encode([sc.prompt for sc in scenes])  # [n_scenes, L, D]
        switches = [PromptSwitch(f, scene_text[i : i + 1]) for i, f in enumerate(frames) if i]
        slot = plan[rows.start].global_index // cfg.rollout.candidates
        start = window_start(st, world.sampler, dist.mix_seed(
            cfg.train.seed, "window", world.epoch, *((slot,) if st.per == "prompt" else ())))
        seed = dist.mix_seed(cfg.train.seed, "history", world.epoch, slot)
        n = rows.stop - rows.start
        out = rollout_window(model, scene_text[:1], start=start, window=st.window, latent_hw=world.family.latent_hw,
                             sampler=world.sampler, history_seeds=[seed], seeds=seeds[rows], candidates=n,
                             switches=switches, micro_batch=cfg.rollout.micro_batch)
        parts = window_scenes(frames, [sc.prompt for sc in scenes], start, st.window, world.family.temporal_stride)
        owner = torch.zeros(n, dtype=torch.long)
        for sl in _chunks(n, cfg.rollout.micro_batch):
            videos = decode_window(world.io.decoder, out.history, out.latents[sl], owner[sl], st.decode_warmup)
            first_videos = videos if first_videos is None else first_videos
            pending.append(WindowScore([(world.scorer.submit(videos[:, a:b], [prompt] * videos.shape[0]), b - a)
                                        for a, b, prompt in parts]))
        latents.append(out.latents)
        texts.append(scene_text[:1].expand(n, -1, -1))
        windows.append(Window(rows, start, out.history, seed, {sw.frame: sw.text for sw in switches}))
    device = latents[0].device
    return Batch(
        latents=torch.cat(latents), text=torch.cat(texts), seeds=seeds, prompts=lines,
        prompt_ids=torch.tensor([s.prompt_id for s in plan], device=device),
        global_index=torch.tensor([s.global_index for s in plan], device=device),
        pending=pending, first_videos=first_videos, windows=windows,
    )


def window_scenes(starts: list[int], prompts: list[str], start: int, window: int,
                  temporal_stride: int) -> list[tuple[int, int, str]]:
    """The scenes a window shows, as ``(first, end, prompt)`` ranges of its decoded frames: scene ``i`` runs from
    latent frame ``starts[i]`` to the next start; the window holds latent frames ``[start, start + window)``, decoded
    to ``temporal_stride`` pixel frames each (the video's first latent frame to one)."""
    def pixel(latent: int) -> int:  # the window's first decoded frame of this absolute latent frame
        return pixel_frame(latent, temporal_stride) - pixel_frame(start, temporal_stride)

    ends = [*starts[1:], start + window]
    return [(pixel(max(a, start)), pixel(min(b, start + window)), prompt)
            for a, b, prompt in zip(starts, ends, prompts) if a < start + window and b > start]


@dataclass
class WindowScore:
    """The scores of a window's videos from the parts it was scored in: ``(future, frames)`` per scene part; the
    result is every score's frame-weighted mean over the parts (one part: that part's scores)."""

    parts: list[tuple[Future, int]]

    def result(self) -> dict[str, Tensor]:
        got = [(f.result(), n) for f, n in self.parts]
        total = sum(n for _, n in got)
        return {k: sum(r[k] * (n / total) for r, n in got) for k in got[0][0]}


def _groups(plan: list[dist.Sample]) -> list[slice]:
    """The runs of consecutive samples of one prompt in this rank's plan (its groups, or parts of them)."""
    cuts = [i for i in range(1, len(plan)) if plan[i].prompt_id != plan[i - 1].prompt_id]
    return [slice(a, b) for a, b in zip([0, *cuts], [*cuts, len(plan)])]


def score_phase(world: World, batch: Batch) -> tuple[dict[str, Tensor], dict[str, Tensor], FailureReport]:
    """Collect every reward (raw) and every monitor of the batch: ``{name: [n]}`` each, NaN where a reward failed
    on a sample (NaN, ±inf or an exception), and the failures of every rank (failed share, first error)."""
    results = [f.result() for f in batch.pending]
    device = batch.latents.device

    def cat(names: dict[str, Reward]) -> dict[str, Tensor]:
        return {k: torch.cat([r[k] for r in results]).to(device) for k in names}

    report = FailureReport()
    for part in dist.all_gather_object(world.ctx, world.scorer.drain_failures()):
        report = report.merge(part)
    return cat(world.rewards), cat(world.monitors), report


def check_rewards(world: World, report: FailureReport, epoch: int) -> None:
    """Failures are loud: a warning on rank 0 in every epoch that has one (naming the reward and its first error),
    and a clear stop when an optimised reward fails on more than ``rewards.max_failed_frac`` of the samples."""
    message = report.warning(epoch)
    if message and world.ctx.is_main:
        print(message, file=sys.stderr, flush=True)
    check_failures(report, world.cfg.rewards.max_failed_frac, names=world.rewards,
                   abort=world.cfg.rewards.on_error == "abort")


@dataclass
class Advantages:
    r: Tensor  # [n] optimality probability of this rank's samples
    keep: Tensor  # [n] bool: False for dropped samples (reward failed, on_error=drop)
    usable: Tensor  # [N] bool over the whole epoch (every rank): the combined reward is finite
    adv: Tensor  # [n]
    total: Tensor  # [n] combined reward
    norm: dict[str, Tensor]  # [n] per reward, the values actually summed
    metrics: dict[str, float]
    scores: dict[str, Tensor]  # [N] every reward raw, the whole epoch (every rank)
    groups: Tensor  # [N] prompt ids, the whole epoch
    mine: Tensor  # [N] bool: this rank's samples, in its own order


def advantage_phase(world: World, batch: Batch, scores: dict[str, Tensor]) -> Advantages:
    """Gather every rank's rewards, combine them, and turn them into group advantages and r (released defaults).

    A = (R − mean_group R) / (std_global R + 1e-4),   r = clip(½ + clip(A, ±c)/(2c), 0, 1).
    The group is the prompt id; statistics are over the whole epoch (all ranks), then each rank keeps its slice.
    """
    ctx, cfg = world.ctx, world.cfg
    gather = lambda x: dist.all_gather_cat(ctx, x)  # noqa: E731
    all_scores = {k: gather(v.float()) for k, v in scores.items()}
    groups = gather(batch.prompt_ids)
    order = gather(batch.global_index)
    total, norm = combine_rewards(all_scores, world.weights, groups, mode=cfg.rewards.combine)
    failed = ~torch.isfinite(total)
    if failed.any() and cfg.rewards.on_error == "abort":  # `check_rewards` stops first, with the reward's own error
        bad = [name for name, v in all_scores.items() if name in world.weights and not torch.isfinite(v).all()]
        raise RewardFailureError(f"reward {', '.join(bad)} failed on {int(failed.sum())} samples and "
                                 "rewards.on_error=abort; set rewards.on_error=zero or drop to train on the rest")
    adv = group_advantages(total, groups, std=cfg.train.adv_std)
    r = optimality_probability(torch.nan_to_num(adv, nan=0.0), cfg.train.adv_clip)  # failed: A = 0, r = ½
    mine = torch.isin(order, batch.global_index)  # this rank's slice, in its own order (contiguous chunk)
    metrics = {"reward/total": _nanmean(total), "adv/abs_mean": _nanmean(adv.abs()),
               "adv/r_at_bounds": float(((r == 0) | (r == 1)).float().mean()),
               "reward/failed_frac": float(failed.float().mean())}
    for k, v in group_reward_stats(total, groups).items():
        metrics[f"reward/group_{k}"] = float(v)
    for name in all_scores:
        metrics[f"reward/{name}/raw"] = _nanmean(all_scores[name])
        metrics[f"reward/{name}/norm"] = _nanmean(norm[name])
    keep = ~failed[mine] if cfg.rewards.on_error == "drop" else torch.ones_like(failed[mine])
    return Advantages(r[mine], keep, ~failed, adv[mine], total[mine], {k: v[mine] for k, v in norm.items()}, metrics,
                      all_scores, groups, mine)


def regularize_phase(world: World, adv: Advantages) -> tuple[Tensor, dict[str, float]]:
    """Which of this rank's samples the KL covers, ``[n]`` bool: every one (``regularize.mode=uniform``), or the
    selective set (`algo.regularize`): U from the main and auxiliary rewards over the epoch's samples (gathered by
    `advantage_phase`), ρ adapted on this epoch's mean disagreement, then the top ρ of U ≥ 0."""
    reg, rcfg = world.reg, world.cfg.regularize
    if rcfg.mode == "uniform":
        return torch.ones_like(adv.r, dtype=torch.bool), {}
    u = uncertainty(adv.scores[rcfg.main], [adv.scores[a] for a in rcfg.auxiliary], sign=rcfg.sign,
                    measure=rcfg.measure, group_ids=adv.groups)
    mean_pos = mean_non_negative(u)
    reg.rho, reg.buffer = adapt_rho(reg.rho, mean_pos, reg.buffer, rcfg.rho_min, rcfg.rho_max, rcfg.rho_buffer)
    mask, tau = select(u, reg.rho)
    metrics = {"reg/kl_frac": float(mask.float().mean()), "reg/rho": reg.rho, "reg/tau": tau,
               "reg/u_pos_mean": mean_pos, "reg/u_pos_frac": float((u >= 0).float().mean())}
    return mask[adv.mine], metrics


def reference_phase(world: World) -> dict[str, float]:
    """``train.reference=dynamic``, at the start of an epoch: hard-copy θ into the reference when the last step's
    selected KL passed the threshold, or more than ``regularize.reset_max_gap`` epochs passed since the last copy;
    after a copy the threshold moves with the gap between the two copies (released rules, `algo.regularize`)."""
    reg, rcfg = world.reg, world.cfg.regularize
    if world.cfg.train.reference != "dynamic":
        return {}
    gap = world.epoch - reg.last_reset
    reset = should_reset(reg.last_kl, reg.threshold, gap, rcfg.reset_max_gap)
    if reset:
        world.policy.copy_("ref", "default")
        reg.threshold = next_threshold(reg.threshold, gap, rcfg.reset_clamp, high=rcfg.reset_threshold_max,
                                       long_gap=rcfg.reset_max_gap)
        reg.last_reset, reg.resets = world.epoch, reg.resets + 1
    return {"reg/ref_reset": float(reset), "reg/ref_resets": float(reg.resets), "reg/ref_threshold": reg.threshold,
            "reg/ref_gap": float(world.epoch - reg.last_reset)}


def _train_sigmas(world: World, generator: torch.Generator) -> float:
    """One σ per micro-batch, shared by every frame (released), from the configured set."""
    choice = world.cfg.train.sigmas
    if choice == "uniform":
        return max(float(torch.rand((), generator=generator)), 1e-3)
    if choice == "sampler_grid":
        grid = tuple(sigma_of(t) for t in world.sampler.steps.timesteps)
    else:  # release_grid, or without its σ = 1, where fresh noise holds nothing of the endpoint it is regressed on
        grid = RELEASE_SIGMAS if choice == "release_grid" else RELEASE_SIGMAS[1:]
    return grid[int(torch.randint(len(grid), (), generator=generator))]


def _sample_noise(like: Tensor, seeds: list[int]) -> Tensor:
    """Per-sample ε from per-sample seeds (drawn on ``like``'s device: no host copy), so the training noise does not
    depend on the batch split."""
    def draw(seed: int) -> Tensor:
        g = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randn(like.shape[1:], generator=g, dtype=torch.float32, device=like.device)

    return torch.stack([draw(s) for s in seeds]).to(like.dtype)


def micro_step(
    policy: Policy,
    train_model: torch.nn.Module,
    sampler: SamplerConfig,
    tcfg: TrainConfig,
    x0: Tensor,
    text: Tensor,
    r: Tensor,
    keep: Tensor,
    sigma: float,
    noise: Tensor | None,
    reference: Sequence[str] = ("base",),
    kl_mask: Tensor | None = None,
    window: WindowPasses | None = None,
    x_t: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The three passes on one micro-batch and the NFT objective (before accumulation scaling).

    x0 ``[b, F, C, H, W]`` clean endpoints, r ``[b]``; the clip is noised at one σ:
    x_t = (1 − σ)·x0 + σ·ε, and x̂0 = x_t − σ·v̂ for θ (grad, through ``train_model``), θ_old and the reference
    (no grad: the mean x̂0 of the ``reference`` adapters, `reference_adapters`). ``kl_mask [b]`` bool picks the
    samples the KL covers (None: all). ``tcfg.context`` picks the released noisy block-causal layout or the clean
    teacher-forcing one; with ``window`` (streaming) x0 is a window whose passes see the history as detached K/V and
    the window's earlier blocks clean (`train.streaming.WindowPasses`); its ``overlap`` frames (the history's last,
    already committed) are trained with it: the NFT loss covers the window, and θ's x̂0 of the overlap is pulled to
    the committed frames, ``boundary_weight·‖x̂0_θ − x0‖²`` (logged as ``boundary``); ``noise`` then covers both.
    ``x_t`` (``train.noise=rollout``) replaces the forward-noised input: the sampler's own input at σ (``noise`` is
    then unused). With ``tcfg.norm_guard`` the velocity-norm hinge against the reference is added (`nft_objective`).
    """
    lead = 0 if window is None or window.overlap is None else window.overlap.shape[1]
    window_x0 = x0
    if lead:
        x0 = torch.cat([window.overlap.expand(x0.shape[0], -1, -1, -1, -1).to(x0.dtype), x0], dim=1)
    if x_t is None:
        x_t = renoise(x0, sigma, noise)
    t = sigma * 1000.0
    layout = dict(
        frames_per_block=sampler.frames_per_block,
        first_block_frames=sampler.first_block_frames,
        policy=sampler.cache,
        clean=x0 if tcfg.context == "clean" else None,
        t_clean=sampler.steps.context_timestep,
    )

    def velocity(model: torch.nn.Module) -> Tensor:
        return model(x_t, t, text, **layout) if window is None else window.velocity(dist.unwrap(model), x_t, t, text, x0)

    with torch.no_grad():
        with policy.use("old") as model:
            x0_old = x0_from_velocity(x_t, velocity(model), sigma)
        v_ref = None
        if tcfg.kl_weight > 0 or tcfg.norm_guard > 0:
            for name in reference:
                with policy.use(name) as model:
                    v = velocity(model)
                v_ref = v if v_ref is None else v_ref + v
            v_ref = v_ref / len(reference)  # x̂0 is affine in v: the mean velocity gives the mean x̂0
    v_theta = velocity(train_model)
    x0_theta = x0_from_velocity(x_t, v_theta, sigma)
    x0_ref = None if v_ref is None or tcfg.kl_weight == 0 else x0_from_velocity(x_t, v_ref, sigma)
    loss, stats = nft_objective(
        x0_theta[:, lead:], x0_old[:, lead:], None if x0_ref is None else x0_ref[:, lead:], window_x0, r,
        beta=tcfg.beta, kl_weight=tcfg.kl_weight, form=tcfg.loss_form, adv_clip=tcfg.adv_clip, kl_mask=kl_mask,
        sample_weight=keep.float(), v_theta=v_theta[:, lead:],
        v_ref=None if v_ref is None else v_ref[:, lead:], guard_weight=tcfg.norm_guard,
    )
    if lead:
        boundary = (x0_theta[:, :lead].float() - x0[:, :lead].float()).square().mean()
        loss = loss + window.boundary_weight * boundary
        stats.update(boundary=boundary.detach(), loss=loss.detach())
    return loss, stats


def update_phase(world: World, batch: Batch, adv: Advantages, kl_mask: Tensor,
                 epoch: int, pass_index: int = 0) -> tuple[bool, dict[str, float]]:
    """Accumulate the NFT gradient over every micro-batch, then one clipped AdamW step; ``kl_mask [n]`` bool: the
    samples the KL covers (`regularize_phase`). ``pass_index`` (0 to ``train.update_passes`` − 1) gives each pass
    over the same rollouts its own σ and noise draws.

    The input of a micro-batch is the released forward noising at one σ of ``train.sigmas``, or with
    ``train.noise=rollout`` the sampler's own inputs at one of its steps, drawn the same way (`Batch.inputs`).

    Returns whether the optimiser stepped (not when the gradient is non-finite, or when no sample of the epoch has
    a usable reward: nothing to learn from) and the metrics: every statistic of the objective as ``loss/<name>``
    (mean over micro-batches), the policy loss per training σ as ``loss_sigma/<σ>`` (σ to two decimals; quarters
    of (0, 1] for ``train.sigmas=uniform``), the training σ, the gradient norm, and ``reg/kl_selected``: the KL
    averaged over every selected sample of every rank (what the dynamic reference's reset rule reads).
    """
    cfg = world.cfg
    world.optimizer.zero_grad(set_to_none=True)
    if not bool(adv.usable.any()):
        _warn_main(world.ctx, f"no sample of epoch {epoch} has a usable reward: no optimiser step")
        return False, {"train/skipped_step": 1.0}
    chunks = _chunks(batch.latents.shape[0], cfg.rollout.micro_batch) if batch.windows is None else [
        slice(w.rows.start + sl.start, w.rows.start + sl.stop)  # streaming: a micro-batch never mixes histories
        for w in batch.windows for sl in _chunks(w.rows.stop - w.rows.start, cfg.rollout.micro_batch)]
    sums: dict[str, Tensor | float] = {}
    selected = torch.zeros(2, dtype=torch.float64, device=batch.latents.device)  # Σ KL over selected, count
    old_history: dict[str, Any] = {}  # streaming, history_kv=old: θ_old's history cache of the current window
    order = batch.global_index.tolist()  # one host read per epoch, not per micro-step
    by_sigma: dict[str, list] = {}  # σ label -> [Σ policy loss, micro-batches]
    passes = (pass_index,) if pass_index else ()  # pass 0 keeps the single-pass draws
    for i, sl in enumerate(chunks):
        g = torch.Generator().manual_seed(dist.mix_seed(cfg.train.seed, "sigma", epoch, *passes, order[sl][0]))
        x_t = None
        if batch.inputs is None:
            sigma = _train_sigmas(world, g)
            seeds = [dist.mix_seed(cfg.train.seed, "train-noise", epoch, *passes, j) for j in order[sl]]
        else:  # train.noise=rollout: one of the sampler's own steps
            k = int(torch.randint(len(batch.timesteps), (), generator=g))
            sigma, x_t = sigma_of(batch.timesteps[k]), batch.inputs[sl, k]
        window = _window_passes(world, batch, sl, old_history)
        lead = 0 if window is None or window.overlap is None else window.overlap.shape[1]
        noise = None if x_t is not None else _sample_noise(
            batch.latents[sl].new_empty(sl.stop - sl.start, lead + batch.latents.shape[1], *batch.latents.shape[2:]),
            seeds)
        with dist.no_sync(world.train_model, enabled=i < len(chunks) - 1):
            loss, stats = micro_step(
                world.policy, world.train_model, world.sampler, cfg.train,
                batch.latents[sl], batch.text[sl], adv.r[sl], adv.keep[sl], sigma, noise,
                reference=world.reference, kl_mask=kl_mask[sl], window=window, x_t=x_t,
            )
            (loss / len(chunks)).backward()
        if "kl_selected" in stats:
            count = kl_mask[sl].sum()
            selected += torch.stack([stats["kl_selected"] * count, count]).double()
        for k, v in {**stats, "sigma": sigma}.items():  # device sums: read once, after the last micro-step
            sums[k] = sums.get(k, 0.0) + v / len(chunks)
        label = f"q{min(int(sigma * 4 - 1e-9), 3) + 1}" if cfg.train.sigmas == "uniform" and x_t is None else f"{sigma:.2f}"
        acc = by_sigma.setdefault(label, [0.0, 0])
        acc[0], acc[1] = acc[0] + stats["policy_loss"], acc[1] + 1
    if batch.windows is not None and not dist.is_sharded(world.train_model):
        dist.average_gradients_(world.ctx, world.policy.trainable_parameters())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(world.policy.trainable_parameters(), cfg.train.grad_clip))
    sums = {k: float(v) for k, v in sums.items()}
    stepped = math.isfinite(grad_norm) or not cfg.train.skip_nonfinite
    if stepped:
        world.optimizer.step()
    else:
        _warn_main(world.ctx, f"non-finite gradient (norm {grad_norm}) at epoch {epoch}: optimiser step skipped")
        world.optimizer.zero_grad(set_to_none=True)
    metrics = {f"loss/{k}": v for k, v in sums.items() if k != "sigma"}
    metrics.update({f"loss_sigma/{label}": float(total) / n for label, (total, n) in by_sigma.items()})
    metrics.update({"train/sigma": sums["sigma"], "train/grad_norm": grad_norm, "train/skipped_step": float(not stepped)})
    if cfg.train.kl_weight > 0:
        total, count = dist.all_reduce_sum(world.ctx, selected).tolist()
        metrics["reg/kl_selected"] = total / count if count else 0.0
    return stepped, metrics


def _window_passes(world: World, batch: Batch, rows: slice, memo: dict[str, Any]) -> WindowPasses | None:
    """Streaming: the history of the micro-batch ``rows`` (one prompt's window) as each pass will see it; with
    ``streaming.history_kv=old`` θ_old's commit of it, shared by the three passes and made once per window (θ_old
    does not move during the update): ``memo`` keeps the last window's, the micro-batches of a window being adjacent."""
    if batch.windows is None:
        return None
    w = next(w for w in batch.windows if w.rows.start <= rows.start < w.rows.stop)
    st = world.cfg.streaming
    lead = min(st.overlap, w.start)  # the first window has no history to overlap
    passes = WindowPasses(w.history[:, : w.start - lead], w.start - lead, world.sampler, world.family.latent_hw,
                          seeds=[w.seed], switches=w.switches,
                          overlap=w.history[:, w.start - lead :] if lead else None, boundary_weight=st.boundary_weight)
    if world.cfg.streaming.history_kv == "old":
        if memo.get("window") is not w:
            with world.policy.use("old") as model:
                memo.update(window=w, cache=commit_history(
                    model, passes.history, batch.text[rows.start : rows.start + 1], world.sampler,
                    world.family.latent_hw, passes.seeds, lead + batch.latents.shape[1], w.switches))
        passes.shared = memo["cache"].take(torch.zeros(rows.stop - rows.start, dtype=torch.long))
    return passes


def sync_phase(world: World) -> None:
    """θ_old ← η·θ_old + (1 − η)·θ with the configured decay schedule; EMA of θ for evaluation and export; with
    ``train.reference=ema_ensemble`` each reference EMA ← d·EMA + (1 − d)·θ at its own decay d."""
    t = world.cfg.train
    world.policy.soft_update("old", old_decay(world.step, t.old_decay, t.old_decay_rate, t.old_decay_max))
    world.policy.update_ema(ema_decay(world.step - 1, world.cfg.train.ema_decay))  # n updates done before
    if t.reference == "ema_ensemble":
        for name, decay in zip(world.reference, world.cfg.regularize.ema_decays):
            world.policy.soft_update(name, decay)


@torch.no_grad()
def evaluate(world: World) -> dict[str, float]:
    """Held-out prompts at fixed seeds with the EMA weights; every reward and monitor, and sample videos.

    Every rank generates an equal share (padded, so sharded FSDP2 models see the same number of forwards on every
    rank); scores are gathered and rank 0 writes the videos of its share.

    ``train.mode=streaming`` scores the videos (``rollout.num_frames`` latent frames, through the family's rolling
    cache) window by window, as the rewards see clips: consecutive windows of ``streaming.window`` latent frames;
    ``eval/<kind>/<name>`` is the mean over the windows, ``eval/last_window/<kind>/<name>`` the last window's, where
    a long rollout decays first. Its KL to the base is measured on the first window.
    """
    cfg, ctx = world.cfg, world.ctx
    jobs = [(p, seed * 100_003 + i) for seed in cfg.eval.seeds for i, p in enumerate(world.eval_prompts)]
    share = -(-len(jobs) // ctx.world_size)
    mine = (jobs + jobs[-1:] * (share * ctx.world_size - len(jobs)))[ctx.rank * share : (ctx.rank + 1) * share]
    scorers = {**world.rewards, **world.monitors, **world.eval_monitors}
    streaming = cfg.train.mode == "streaming"
    # the decoded-frame ranges scored separately: the whole clip, or each window of a streaming run's videos
    windows = [(0, None)]
    if streaming:
        windows = window_frames(world.num_frames, cfg.streaming.window, world.family.temporal_stride) or windows
    local: dict[str, list[Tensor]] = {name: [] for name in scorers}
    last: dict[str, list[Tensor]] = {name: [] for name in scorers}
    written = 0
    kl: list[Tensor] = []
    prompts = [p for p, _ in mine]
    # sampled as training samples (the EMA merged into the sampling copy); the KL is measured on the adapter itself
    # (`kl_to_base` runs policy.model, which holds the EMA meanwhile): two different modules, one streaming loop
    with world.policy.ema_sampling_model() as model, world.policy.ema_weights():
        text = world.io.encode(prompts)
        for sl, latents, videos in sample_videos(world, model, text, [s for _, s in mine]):
            per_window = [score_all(scorers, videos[:, a:b], prompts[sl])[0] for a, b in windows]
            got = {name: torch.stack([w[name] for w in per_window]).mean(0) for name in per_window[0]}
            for name, v in got.items():
                local[name].append(v.to(latents.device))
                last[name].append(per_window[-1][name].to(latents.device))
            if cfg.eval.kl_sigmas:
                first = latents[:, : cfg.streaming.window] if streaming else latents
                kl.append(kl_to_base(world, first, text[sl], [s for _, s in mine[sl]]))
            for j in range(videos.shape[0]):
                if ctx.is_main and written < cfg.eval.videos:
                    caption = {name: float(v[j]) for name, v in got.items()}
                    world.logger.log_video(f"eval/{written:02d}", videos[j], world.step, caption=caption)
                    written += 1
    metrics = {}
    for prefix, table in (("eval", local), *((("eval/last_window", last),) if streaming else ())):
        for name, parts in table.items():
            values = dist.all_gather_cat(ctx, torch.cat(parts))[: len(jobs)]  # drop the padding
            kind = "reward" if name in world.rewards else "monitor"
            metrics[f"{prefix}/{kind}/{name}"] = _nanmean(values)
        metrics[f"{prefix}/reward/total"] = sum(world.weights[n] * metrics[f"{prefix}/reward/{n}"]
                                                for n in world.rewards)
    if kl:
        metrics["eval/kl_base"] = _nanmean(dist.all_gather_cat(ctx, torch.cat(kl))[: len(jobs)])
    return metrics


@torch.no_grad()
def kl_to_base(world: World, x0: Tensor, text: Tensor, seeds: list[int]) -> Tensor:
    """The KL surrogate ‖x̂0_θ − x̂0_ref‖² of the current weights (EMA during `evaluate`) to the base, per sample
    ``[b]``, averaged over the fixed σ set ``eval.kl_sigmas`` with noise seeded per sample: the training KL is
    measured at whichever σ an epoch drew, this one is comparable across epochs. x0 ``[b, F, C, H, W]``."""
    layout = dict(frames_per_block=world.sampler.frames_per_block, first_block_frames=world.sampler.first_block_frames,
                  policy=world.sampler.cache)
    total = torch.zeros(x0.shape[0], device=x0.device)
    for k, sigma in enumerate(world.cfg.eval.kl_sigmas):
        noise = _sample_noise(x0, [dist.mix_seed(s, "kl-base", k) for s in seeds])
        x_t = renoise(x0, sigma, noise)
        x0_now = x0_from_velocity(x_t, world.policy.model(x_t, sigma * 1000.0, text, **layout), sigma)
        with world.policy.use("base") as ref:
            x0_ref = x0_from_velocity(x_t, ref(x_t, sigma * 1000.0, text, **layout), sigma)
        total += kl_term(x0_now, x0_ref)
    return total / len(world.cfg.eval.kl_sigmas)


# ------------------------------------------------------------------------------------------------ helpers


def _nanmean(x: Tensor) -> float:
    x = x.float()
    finite = x[torch.isfinite(x)]
    return float(finite.mean()) if finite.numel() else float("nan")


def _warn_main(ctx: dist.DistContext, msg: str) -> None:
    if ctx.is_main:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def _table_rows(batch: Batch, scores: dict[str, Tensor], adv: Advantages) -> list[dict[str, Any]]:
    rows = []
    for i, prompt in enumerate(batch.prompts):
        row = {"prompt": prompt, "seed": batch.seeds[i], "group": int(batch.prompt_ids[i]),
               "advantage": float(adv.adv[i]), "r": float(adv.r[i]), "reward": float(adv.total[i])}
        for name, v in scores.items():
            row[f"{name}/raw"] = float(v[i])
            row[f"{name}/norm"] = float(adv.norm[name][i])
        rows.append(row)
    return rows


def save(world: World) -> None:
    state = {
        "policy": world.policy.state_dict(),
        "optimizer": dist.full_state(world.optimizer.state_dict()),  # whole tensors under FSDP2 too
        "trainer": {"step": world.step, "epoch": world.epoch, "sampler": world.sampler_plan.state_dict(),
                    "regularizer": world.reg.state_dict()},
        "rng": capture_rng(),
    }
    save_checkpoint(
        Path(world.cfg.run_dir), world.step, state, config=to_dict(world.cfg), keep_last=world.cfg.checkpoint.keep_last,
        rank=world.ctx.rank, barrier=lambda: dist.barrier(world.ctx),
        export=world.policy.save_adapter,  # the EMA adapter in peft format: each checkpoint is an adapter folder
    )


def export_adapter(world: World) -> None:
    """``run_dir/adapter``: the EMA adapter in peft format (for ``--adapter`` and ``astrolabe merge-lora``), each file
    replaced atomically. Written at the end of `train`, also when a finished run is resumed, so it always matches the
    run's last state."""
    if world.ctx.is_main:
        world.policy.save_adapter(Path(world.cfg.run_dir) / "adapter")


# ------------------------------------------------------------------------------------------------ loop


def run_epoch(world: World) -> dict[str, float]:
    """One epoch: rollout, score, advantage, then ``train.update_passes`` × (update, sync) (released: one optimiser
    step); then eval, log, checkpoint."""
    cfg, ctx = world.cfg, world.ctx
    epoch = world.epoch
    device = world.policy.model.device
    t0 = time.perf_counter()
    plan = world.sampler_plan.epoch_plan(epoch)
    reg_metrics = reference_phase(world)
    batch = (streaming_rollout_phase if cfg.train.mode == "streaming" else rollout_phase)(world, plan)
    t1 = time.perf_counter()
    scores, monitors, failures = score_phase(world, batch)
    check_rewards(world, failures, epoch)
    t2 = time.perf_counter()
    adv = advantage_phase(world, batch, scores)
    kl_mask, selection = regularize_phase(world, adv)
    per_pass = []
    for p in range(cfg.train.update_passes):
        stepped, pass_metrics = update_phase(world, batch, adv, kl_mask, epoch, p)
        world.reg.last_kl = pass_metrics.get("reg/kl_selected")
        per_pass.append(pass_metrics)
        if stepped:
            world.step += 1
            sync_phase(world)  # θ moved: θ_old and the EMA follow
    metrics = {k: sum(m[k] for m in per_pass if k in m) / sum(k in m for m in per_pass)
               for k in dict.fromkeys(k for m in per_pass for k in m)}  # each metric's mean over the passes
    if world.reg.last_kl is not None:
        metrics["reg/kl_selected"] = world.reg.last_kl  # the last pass's: what the reset rule reads
    t3 = time.perf_counter()
    world.epoch = epoch + 1

    metrics.update(adv.metrics)
    metrics.update({**reg_metrics, **selection})
    metrics.update(failures.metrics())
    for name, v in monitors.items():
        metrics[f"monitor/{name}"] = float(dist.all_reduce_mean(ctx, torch.tensor(_nanmean(v), device=device)))
    metrics.update({"perf/rollout_s": t1 - t0, "perf/reward_s": t2 - t1, "perf/train_s": t3 - t2,
                    "perf/videos_per_s": len(plan) * ctx.world_size / (t3 - t0),
                    "perf/peak_mem": _peak_mem_gb(device), "train/epoch": float(world.epoch)})
    last = world.epoch == cfg.train.epochs
    if world.eval_prompts and (last or (cfg.eval.every and world.epoch % cfg.eval.every == 0)):
        metrics.update(evaluate(world))
    world.logger.log(metrics, world.step)
    if cfg.log.table:
        rows = dist.all_gather_object(ctx, _table_rows(batch, scores, adv))
        world.logger.log_table("rollouts", [r for part in rows for r in part], world.step)
    if batch.first_videos is not None and epoch == 0:
        world.logger.log_video("rollout/first", batch.first_videos[0], world.step)
    if cfg.checkpoint.every and (world.epoch % cfg.checkpoint.every == 0 or last):
        save(world)
    return metrics


def teardown(world: World, failing: bool = False) -> None:
    """Undo `setup` in reverse: plots, the scorer's threads, the logger's files, the process group.

    Every step runs whatever the others do. Plots are a convenience: one that cannot be drawn (a full disk) is a
    warning. Another step's error is raised after the rest ran, unless the run is already ``failing``: then it is a
    warning too, and the error that stopped the run is the one reported."""
    def plots() -> None:
        if world.cfg.log.plots:
            try:
                world.logger.plot()
            except Exception as e:  # noqa: BLE001 - a missing figure never fails a run nor hides why it failed
                _warn_line(world.ctx, f"could not draw the plots of {world.cfg.run_dir}: {_reason(e)}")

    first: Exception | None = None
    for step in (plots, world.scorer.close, world.logger.close, dist.shutdown):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - finish tearing down, then report
            if failing:
                _warn_line(world.ctx, f"while stopping after an error: {_reason(e)}")
            first = first or e
    if first is not None and not failing:
        raise first


def _reason(error: BaseException) -> str:
    from astrolabe_rl.errors import user_message

    return user_message(error) or f"{type(error).__name__}: {error}"


def _warn_line(ctx: dist.DistContext, message: str) -> None:
    if ctx.is_main:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def train(cfg: Config, callbacks: Callbacks | None = None) -> dict[str, float]:
    """Run the recipe from scratch or from ``checkpoint.resume``; returns the last epoch's metrics."""
    callbacks = callbacks or Callbacks()
    world = setup(cfg)
    failing = True
    try:
        if world.ctx.is_main:
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            write_atomic(Path(cfg.run_dir) / "config.yaml", dump_yaml(cfg).encode())
        if callbacks.on_start:
            callbacks.on_start(world)
        bar = progress(cfg.train.epochs, "epochs", is_main=world.ctx.is_main) if cfg.log.progress else None
        if bar is not None:
            bar.update(world.epoch)  # a resumed run starts part-way
        metrics: dict[str, float] = {}
        while world.epoch < cfg.train.epochs:
            metrics = run_epoch(world)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/total', float('nan')):.4g}",
                                kl=f"{metrics.get('loss/kl', 0.0):.3g}")
            if callbacks.on_epoch:
                callbacks.on_epoch(world, metrics)
        if bar is not None:
            bar.close()
        export_adapter(world)
        if callbacks.on_end:
            callbacks.on_end(world)
        failing = False
    finally:
        teardown(world, failing=failing)
    return metrics
