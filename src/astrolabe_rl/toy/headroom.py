"""What a reward can buy before RL: the statistics of K base samples per prompt, scored by the demo's rewards and
the oracle (`bench/headroom.py` runs them on a toy family; the demo's ``rl_minus_best_of_4`` uses `best_of_n`).

A group is one prompt's K samples; every score here is ``[P, K]`` (P prompts × K samples, sample k of prompt i
drawn with the noise seed `noise_seed(i, k)`, the one the demo's `held_out_videos` uses for (prompt i, seed k)):

* `best_of_n`: reranking. The judge's value of the sample that ``select`` ranks highest among the first n of each
  group; with ``select`` the training total and ``judge`` the oracle it is what best-of-n by the reward buys on the
  oracle, the bar RL must beat (DESIGN §4: "RL is judged against reranking").
* `within_group_spearman`: does the reward order a prompt's samples the way the oracle does? GRPO/NFT advantages
  are within-group, so this (not a correlation over all samples, which prompt difficulty inflates) is what tells
  whether the reward's gradient points at the oracle.
* `group_sds`: the within-group spread is what a group advantage can see; the between-group spread is prompt
  difficulty, which it cancels.
* `pairwise_rms`: within-prompt pixel diversity, beside the same for the world's renders: a mode-seeking base with
  no diversity leaves nothing to rerank or reinforce.

`sample_groups` and `score_groups` draw and score the groups of a toy family as the demo does (its config's rewards,
its training total, `toy.oracle.oracle_scores`). Nothing here trains or selects a checkpoint: reading the oracle of
base samples is measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

ORACLE_PARTS = ("oracle", "agreement", "render")  # the oracle's headline and its two halves (`toy.oracle`)


def noise_seed(prompt_index: int, draw: int) -> int:
    """The noise seed of draw ``draw`` of held-out prompt ``prompt_index``: the demo's `held_out_videos` samples
    (prompt i, eval seed s) with ``noise_seed(i, s)``, so every tool that samples a prompt's k-th draw shares its
    noise. Unique for prompt indices below 10 000."""
    if not 0 <= prompt_index < 10_000 or draw < 0:
        raise ValueError(f"noise seeds are defined for prompt indices in [0, 10000) and draws >= 0; "
                         f"got prompt {prompt_index}, draw {draw}")
    return 10_000 * draw + prompt_index


# ------------------------------------------------------------------------------------------------ statistics


def _check_groups(name: str, x: Tensor) -> None:
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be scores [P, K] (P prompts × K samples); got {tuple(x.shape)}")


def best_of_n(select: Tensor, judge: Tensor, n: int) -> Tensor:
    """Reranking: ``judge [P, K]``'s value of the sample with the highest ``select [P, K]`` among the first ``n`` of
    each group -> ``[P]``. Ties go to the earliest sample, so best-of-1 is sample 0 and a constant ``select`` never
    buys anything."""
    _check_groups("select", select)
    if select.shape != judge.shape:
        raise ValueError(f"select {tuple(select.shape)} and judge {tuple(judge.shape)} must be the same [P, K]")
    return judge.gather(1, best_of_n_index(select, n)[:, None]).squeeze(1)


def best_of_n_index(select: Tensor, n: int) -> Tensor:
    """The index ``[P]`` (int64) of the sample with the highest ``select [P, K]`` among the first ``n`` of each group,
    the earliest on ties (see `best_of_n`)."""
    _check_groups("select", select)
    if not 1 <= n <= select.shape[1]:
        raise ValueError(f"best-of-n needs 1 <= n <= K = {select.shape[1]} samples per prompt; got n = {n}")
    head = select[:, :n]
    if not torch.isfinite(head).all():
        raise ValueError("select holds NaN or inf scores (a reward failed?); rerank only finite scores")
    return (head == head.max(dim=1, keepdim=True).values).float().argmax(dim=1)  # argmax of a 0/1 row: its first 1


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 1..K along the last dimension of ``x [..., K]``, tied values sharing the mean of their ranks."""
    below = (x[..., None, :] < x[..., :, None]).sum(-1)
    tied = (x[..., None, :] == x[..., :, None]).sum(-1)
    return (below + (tied + 1) / 2).to(torch.float64)


class Spearman(NamedTuple):
    """A within-group rank correlation: ``rho`` the mean over the groups where both scores vary (NaN when none),
    ``used`` those groups, ``skipped`` the groups where either score is constant (no ranking to compare)."""

    rho: float
    used: int
    skipped: int


def within_group_spearman(a: Tensor, b: Tensor) -> Spearman:
    """The mean over groups of Spearman's rank correlation of ``a [P, K]`` and ``b [P, K]`` within each group (the
    Pearson correlation of their `average_ranks`); groups where either has zero spread are skipped and counted."""
    _check_groups("a", a)
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be the same [P, K]")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    va, vb = (ra * ra).sum(dim=1), (rb * rb).sum(dim=1)
    ok = (va > 0) & (vb > 0)
    rho = (ra * rb).sum(dim=1)[ok] / (va[ok] * vb[ok]).sqrt()
    used = int(ok.sum())
    return Spearman(float(rho.mean()) if used else math.nan, used, int((~ok).sum()))


def group_sds(x: Tensor) -> tuple[float, float]:
    """``x [P, K]`` -> (within-group sd, between-group sd): the root of the mean within-group variance (K − 1
    denominator; NaN for K = 1), and the sd of the P group means (P − 1 denominator; NaN for P = 1)."""
    _check_groups("x", x)
    x = x.double()
    within = float(x.var(dim=1, correction=1).mean().sqrt()) if x.shape[1] > 1 else math.nan
    between = float(x.mean(dim=1).std(correction=1)) if x.shape[0] > 1 else math.nan
    return within, between


def pairwise_rms(videos: Tensor) -> Tensor:
    """Within-prompt pixel diversity: ``videos [P, K, T, 3, H, W]`` -> ``[P]``, the mean over a prompt's K(K−1)/2
    pairs of samples of their RMS pixel distance (the world's renders of one prompt differ by jitter and texture
    phase; a mode-seeking model repeats one picture and scores near 0)."""
    if videos.dim() != 6 or videos.shape[1] < 2:
        raise ValueError(f"need videos [P, K, T, 3, H, W] with K >= 2 samples a prompt; got {tuple(videos.shape)}")
    flat = videos.double().flatten(2)  # [P, K, D]
    rms = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(flat.shape[-1])  # [P, K, K]
    i, j = torch.triu_indices(flat.shape[1], flat.shape[1], offset=1)
    return rms[:, i, j].mean(dim=1).float()


def headroom_stats(scores: dict[str, Tensor], select: str = "total", judge: str = "oracle/oracle",
                   ns: Sequence[int] = (2, 4, 8), correlate: Sequence[str] = ()) -> dict[str, Any]:
    """The statistics of one split from ``scores`` (name -> ``[P, K]``, `score_groups`' output):

    * ``mean``, ``sd_within``, ``sd_between``: per score (`group_sds`; None where undefined);
    * ``spearman``: for each name in ``correlate`` (default: every non-oracle score), its within-group Spearman with
      the oracle and with its ``agreement`` and ``render`` parts (``{"oracle": rho, ...}``; None where no group
      has spread in both), and ``spearman_skipped``: the groups skipped per pair (a constant score in the group);
    * ``best_of``: the mean ``judge`` of best-of-n for n in ``ns`` (those ≤ K; n = 1 always: one sample), chosen
      by ``select`` (the training total) and by the judge itself (the oracle's own ceiling for n samples).
    """
    k = scores[judge].shape[1]
    names = list(correlate) or [n for n in scores if not n.startswith("oracle/")]
    out: dict[str, Any] = {"mean": {}, "sd_within": {}, "sd_between": {}, "spearman": {}, "spearman_skipped": {}}
    for name, x in scores.items():
        within, between = group_sds(x)
        out["mean"][name], out["sd_within"][name], out["sd_between"][name] = (
            _round(float(x.double().mean())), _round(within), _round(between))
    for name in names:
        fits = {part: within_group_spearman(scores[name], scores[f"oracle/{part}"]) for part in ORACLE_PARTS}
        out["spearman"][name] = {part: _round(f.rho) for part, f in fits.items()}
        out["spearman_skipped"][name] = {part: f.skipped for part, f in fits.items()}
    sizes = [1, *[n for n in ns if 1 < n <= k]]
    out["best_of"] = {by: {str(n): _round(float(best_of_n(scores[by], scores[judge], n).mean())) for n in sizes}
                      for by in (select, judge)}
    return out


def _round(x: float, digits: int = 4) -> float | None:
    """Rounded for the JSON line; NaN (an undefined figure: one sample, or no group with spread) becomes None."""
    return None if math.isnan(x) else round(x, digits)


# ------------------------------------------------------------------------------------------------ sampling


@dataclass
class DemoScorer:
    """The demo's rewards, monitors and training-total weights (what `toy.demo.proxy_scores` reads)."""

    rewards: dict[str, Any]
    monitors: dict[str, Any]
    weights: dict[str, float]

    @classmethod
    def from_config(cls, cfg: Any) -> "DemoScorer":
        from astrolabe_rl.rewards.base import build_reward

        return cls({c.name: build_reward(c.name, **c.kwargs) for c in cfg.rewards.components},
                   {name: build_reward(name) for name in cfg.rewards.monitors},
                   {c.name: c.weight for c in cfg.rewards.components})


@torch.no_grad()
def sample_groups(io: Any, family: Any, prompts: list[str], k: int, num_frames: int, first_draw: int = 0,
                  micro_batch: int = 32) -> tuple[Tensor, list[list[int]]]:
    """K samples of every prompt from a built model (``io``: `models.build.ModelIO`, ``family``: its preset):
    videos ``[P, K, T, 3, H, W]`` in [0, 1] and the noise seeds ``[P][K]``, sample k of prompt i drawn with
    ``noise_seed(i, first_draw + k)`` (``first_draw = 0``: the demo's held-out draws), ``num_frames`` latent frames,
    with the family's own few-step sampler, ``micro_batch`` videos at a time."""
    from astrolabe_rl.rollout import rollout

    seeds = [[noise_seed(i, first_draw + j) for j in range(k)] for i in range(len(prompts))]
    flat_seeds = [s for row in seeds for s in row]
    text = io.encode([p for p in prompts for _ in range(k)])
    sampler = family.sampler_for(num_frames)
    videos = []
    for start in range(0, len(flat_seeds), micro_batch):
        out = rollout(io.model, text[start:start + micro_batch], num_frames=num_frames, latent_hw=family.latent_hw,
                      sampler=sampler, seeds=flat_seeds[start:start + micro_batch])
        videos.append(io.decode(out.latents).float().cpu())
    return torch.cat(videos).unflatten(0, (len(prompts), k)), seeds


def score_groups(scorer: DemoScorer, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """Every reward, monitor, the training ``total`` (`toy.demo.proxy_scores`) and every oracle figure
    (``oracle/<name>``, `toy.oracle.oracle_scores`) of ``videos [P, K, T, 3, H, W]`` -> name -> ``[P, K]``."""
    from astrolabe_rl.toy.demo import proxy_scores
    from astrolabe_rl.toy.oracle import one_thread, oracle_scores

    p, k = videos.shape[:2]
    flat, repeated = videos.flatten(0, 1), [q for q in prompts for _ in range(k)]
    with one_thread():
        oracle = oracle_scores(flat, repeated)
    got = {**proxy_scores(scorer, flat, repeated), **{f"oracle/{n}": v for n, v in oracle.items()}}
    return {name: v.float().cpu().view(p, k) for name, v in got.items()}


def split_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """The P prompts of a split: ``dev``/``test``: `toy.world.eval_prompts` (the demo's sets, balanced in motion; its
    first prompts are the demo's), ``train``: n prompts of the train split drawn without replacement by ``seed``."""
    from astrolabe_rl.toy import world

    if split == "train":
        pool = world.split("train")
        if not 1 <= n <= len(pool):
            raise ValueError(f"the train split has {len(pool)} prompts; ask for 1 to {len(pool)}, not {n}")
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
        return [pool[i] for i in order[:n]]
    return world.eval_prompts(n, split=split)
