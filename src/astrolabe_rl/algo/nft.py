"""The forward-process (negative-aware fine-tuning) loss and the KL term, as pure functions.

Equations (DESIGN §3; reference/astrolabe.md §2.2 steps 7-8; reference/nft.md §1.2 and §5):

    x̂0⁺ = β·x̂0_θ + (1−β)·x̂0_old                      implicit positive policy
    x̂0⁻ = (1+β)·x̂0_old − β·x̂0_θ                      implicit negative policy
    ℓ_i = r_i·w⁺_i·‖x̂0⁺_i − x0_i‖² + (1−r_i)·w⁻_i·‖x̂0⁻_i − x0_i‖²     (‖·‖² = mean over non-batch dims)
    L_policy = S · mean_i ℓ_i

    form="release"      (Astrolabe): w⁺ = w⁻ = 1, S = 1.
    form="diffusionnft" (upstream):  w± = 1 / max(mean|x̂0± − x0|, 1e-5), detached, float64;  S = adv_clip / β.

Tensors: x̂0_θ, x̂0_old, x̂0_ref, x0 are ``[B, F, C, H, W]`` (any ``[B, ...]`` works), r is ``[B]``. x̂0_old, x0 and
r are treated as constants (detached here, whatever the caller passes); only x̂0_θ carries gradient.

Gradient facts the tests pin (reference/nft.md §1.2):
* On-policy (x̂0_θ = x̂0_old), ∂L/∂x̂0_θ ∝ (2r − 1)·(x̂0_old − x0), so r ≡ ½ gives exactly zero policy gradient, and
  the ``diffusionnft`` gradient equals 2·Ā·w·(x̂0_old − x0)/(B·numel) for every β.
* Off-policy (θ ≠ θ_old, e.g. when the old policy lags, η > 0) r = ½ is *not* neutral: the loss then has a
  proximal pull ∝ β²·(x̂0_θ − x̂0_old) toward the old policy.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

LossForm = Literal["release", "diffusionnft"]
_WEIGHT_FLOOR = 1e-5  # upstream's floor on the adaptive weight's denominator


def _mean_per_sample(x: Tensor) -> Tensor:
    """``[B, ...]`` -> ``[B]``: mean over every non-batch dim."""
    return x.flatten(1).mean(dim=1)


def _check(x0_theta: Tensor, x0_old: Tensor, x0_clean: Tensor, r: Tensor, beta: float) -> None:
    if x0_theta.dim() < 2:
        raise ValueError(f"x0 predictions must be batched [B, F, C, H, W]; got shape {tuple(x0_theta.shape)}")
    if x0_old.shape != x0_theta.shape or x0_clean.shape != x0_theta.shape:
        raise ValueError(
            f"x0_theta {tuple(x0_theta.shape)}, x0_old {tuple(x0_old.shape)} and x0_clean {tuple(x0_clean.shape)} "
            "must have the same shape (the three passes run on the same x_t)"
        )
    if r.shape != x0_theta.shape[:1]:
        raise ValueError(f"r must be [B] = ({x0_theta.shape[0]},); got {tuple(r.shape)}")
    if not 0 < beta:
        raise ValueError(f"beta (the NFT mixing coefficient, release 0.1) must be > 0; got {beta}")


def adaptive_weight(err: Tensor) -> Tensor:
    """DiffusionNFT's self-normalised weight  w = 1 / max(mean|err|, 1e-5)  per sample, ``[B, ...]`` -> ``[B]``.

    Computed in float64 without grad, so it rescales the step without adding a gradient path of its own.
    """
    with torch.no_grad():
        return 1.0 / err.detach().double().abs().flatten(1).mean(dim=1).clamp_min(_WEIGHT_FLOOR)


def nft_loss(
    x0_theta: Tensor,
    x0_old: Tensor,
    x0_clean: Tensor,
    r: Tensor,
    beta: float = 0.1,
    form: LossForm = "release",
    adv_clip: float = 5.0,
    sample_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """NFT policy loss (see the module docstring for the equation and both forms).

    x0_theta: ``[B, F, C, H, W]`` x̂0 of the trained policy (with grad). x0_old: same shape, x̂0 of the old policy.
    x0_clean: same shape, the rollout's clean latents x0. r: ``[B]`` optimality probability in [0, 1] (NaN only
    where sample_weight is 0: drop failed samples that way, or set their r to ½). beta: NFT β (release 0.1). adv_clip: c in
    r = ½ + clip(A, ±c)/(2c); only the ``diffusionnft`` scale S = c/β uses it.
    sample_weight: optional ``[B]`` non-negative per-sample weights (e.g. 0 = a failed reward to drop). The loss
    is then (1/B)·Σ_i s_i·ℓ_i, normalised by B and not by Σ s, so that averaging micro-batch losses still
    equals one big batch; where s_i = 0, r_i may be NaN.
    Returns the scalar loss (float32) and detached float32 diagnostics, each averaged over the samples with
    s_i > 0 (all samples without weights): ``policy_loss`` (the loss itself), ``unweighted_policy_loss`` (ℓ with
    w = 1, S = 1), ``pos_loss`` / ``neg_loss`` (‖x̂0± − x0‖²), ``old_deviate`` (‖x̂0_θ − x̂0_old‖²), ``x0_norm``
    (‖x0‖²), ``r_mean``, and for ``diffusionnft`` ``weight_pos`` / ``weight_neg`` (w±).
    """
    _check(x0_theta, x0_old, x0_clean, r, beta)
    if form not in ("release", "diffusionnft"):
        raise ValueError(f"form must be 'release' (Astrolabe) or 'diffusionnft' (upstream NFT); got {form!r}")
    keep = _sample_weight(sample_weight, r)
    r = torch.where(keep > 0, r.detach().float(), 0.5)  # a dropped sample's r may be NaN; 0·NaN would poison
    if torch.isnan(r).any():
        raise ValueError("r contains NaN (a failed reward): give it sample_weight 0 or set r = 0.5 before the loss")
    # Work in fp32 even when the passes ran in bf16: the branch errors are small differences of large latents.
    e = x0_old.detach().float() - x0_clean.detach().float()  # error of the old policy, a constant
    d = x0_theta.float() - x0_old.detach().float()  # the policy's move, the only gradient path
    # x̂0⁺ − x0 = e + β·d and x̂0⁻ − x0 = e − β·d: algebraically the module-docstring definitions, but written so
    # that at θ = θ_old (d = 0) both branches are bit-identical and r = ½ cancels exactly.
    err_pos, err_neg = e + beta * d, e - beta * d
    pos, neg = _mean_per_sample(err_pos.square()), _mean_per_sample(err_neg.square())
    unweighted = r * pos + (1 - r) * neg
    if form == "release":
        per_sample = unweighted
    else:
        w_pos, w_neg = adaptive_weight(err_pos).float(), adaptive_weight(err_neg).float()
        per_sample = (r * w_pos * pos + (1 - r) * w_neg * neg) * (adv_clip / beta)
    loss = (keep * per_sample).mean()
    with torch.no_grad():
        avg = lambda x: (keep * x.detach()).sum() / keep.sum().clamp_min(1e-12)  # noqa: E731
        stats = {
            "policy_loss": loss.detach(),
            "unweighted_policy_loss": avg(unweighted),
            "pos_loss": avg(pos),
            "neg_loss": avg(neg),
            "old_deviate": avg(_mean_per_sample(d.square())),
            "x0_norm": avg(_mean_per_sample(x0_clean.float().square())),
            "r_mean": avg(r),
        }
        if form == "diffusionnft":
            stats["weight_pos"], stats["weight_neg"] = avg(w_pos), avg(w_neg)
    return loss, stats


def _sample_weight(sample_weight: Tensor | None, r: Tensor) -> Tensor:
    """Validated ``[B]`` float32 weights (ones when None)."""
    if sample_weight is None:
        return torch.ones(r.shape, dtype=torch.float32, device=r.device)
    if sample_weight.shape != r.shape:
        raise ValueError(f"sample_weight must be [B] = {tuple(r.shape)}; got {tuple(sample_weight.shape)}")
    w = sample_weight.detach().float()
    if not (torch.isfinite(w) & (w >= 0)).all():
        raise ValueError("sample_weight must be finite and ≥ 0 (use 0 to drop a sample, 1 to keep it)")
    return w


def kl_term(x0_theta: Tensor, x0_ref: Tensor) -> Tensor:
    """KL surrogate  ‖x̂0_θ − x̂0_ref‖²  per sample: ``[B, ...]`` x2 -> ``[B]`` float32 (x̂0_ref is detached)."""
    if x0_theta.shape != x0_ref.shape:
        raise ValueError(f"x0_theta {tuple(x0_theta.shape)} and x0_ref {tuple(x0_ref.shape)} must match")
    return _mean_per_sample((x0_theta.float() - x0_ref.detach().float()).square())


def _rms(x: Tensor) -> Tensor:
    return _mean_per_sample(x.float().square()).sqrt()


def norm_guard(v_theta: Tensor, v_ref: Tensor) -> Tensor:
    """NormGuard's velocity-norm hinge per sample,  max(0, rms(v_θ) − rms(v_ref))²:  ``[B, ...]`` x2 -> ``[B]`` float32.

    rms is the root mean square over the non-batch dims (``[B, F, C, H, W]`` velocities at the same x_t); v_ref is
    detached. NFT-style losses inflate ‖v_θ‖ over the reference's and rescaling at inference does not undo it
    (reference/distilled_rl.md §1a, NormGuard), so the hinge acts only while θ's velocity is the larger: zero loss
    and zero gradient below the reference's norm.
    """
    if v_theta.shape != v_ref.shape:
        raise ValueError(f"v_theta {tuple(v_theta.shape)} and v_ref {tuple(v_ref.shape)} must match")
    return (_rms(v_theta) - _rms(v_ref.detach())).clamp_min(0).square()


def nft_objective(
    x0_theta: Tensor,
    x0_old: Tensor,
    x0_ref: Tensor | None,
    x0_clean: Tensor,
    r: Tensor,
    beta: float = 0.1,
    kl_weight: float = 1e-4,
    form: LossForm = "release",
    adv_clip: float = 5.0,
    kl_mask: Tensor | None = None,
    sample_weight: Tensor | None = None,
    v_theta: Tensor | None = None,
    v_ref: Tensor | None = None,
    guard_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Full micro-batch loss  L = L_policy + λ_KL · L_KL + λ_g · mean_i norm_guard_i  (DESIGN §3;
    reference/astrolabe.md §2.2 step 8, §4.2; the guard is beyond the release, `norm_guard`).

    L_KL = mean of ``kl_term`` over the samples selected by ``kl_mask`` (``[B]`` bool; None = all samples, the
    non-selective release). With a mask that selects nobody, L_KL = 0, as released. ``sample_weight`` weights the
    policy term only (see ``nft_loss``): the KL does not depend on the reward, so a sample whose reward failed
    is still a valid point to regularise at. ``x0_ref=None`` or
    ``kl_weight=0`` skips the reference entirely. Returns the scalar loss and the ``nft_loss`` stats plus
    ``kl`` (mean over all samples, for logging even where unselected), ``kl_selected`` (the L_KL used),
    ``kl_frac`` (share of samples selected) and ``loss``. With the velocities ``v_theta`` and ``v_ref`` (``[B, F, C,
    H, W]``, at the same x_t) it logs ``v_norm_ratio`` (mean rms(v_θ)/rms(v_ref)) and, with ``guard_weight`` > 0,
    adds the hinge (logged as ``norm_guard``).
    """
    loss, stats = nft_loss(
        x0_theta, x0_old, x0_clean, r, beta=beta, form=form, adv_clip=adv_clip, sample_weight=sample_weight
    )
    if v_theta is not None and v_ref is not None:
        with torch.no_grad():
            stats["v_norm_ratio"] = (_rms(v_theta) / _rms(v_ref).clamp_min(1e-12)).mean()
        if guard_weight > 0:
            guard = norm_guard(v_theta, v_ref).mean()
            loss = loss + guard_weight * guard
            stats["norm_guard"] = guard.detach()
    elif guard_weight > 0:
        raise ValueError("guard_weight > 0 needs both velocities, v_theta and v_ref")
    if x0_ref is None or kl_weight == 0:
        stats["loss"] = loss.detach()
        return loss, stats
    kl = kl_term(x0_theta, x0_ref)
    if kl_mask is None:
        kl_mask = torch.ones_like(kl, dtype=torch.bool)
    if kl_mask.shape != kl.shape or kl_mask.dtype != torch.bool:
        raise ValueError(f"kl_mask must be a bool [B] = ({kl.shape[0]},); got {kl_mask.dtype} {tuple(kl_mask.shape)}")
    m = kl_mask.float()
    kl_sel = (kl * m).sum() / m.sum().clamp_min(1.0)  # 0 when nobody is selected
    loss = loss + kl_weight * kl_sel
    stats.update(
        kl=kl.detach().mean(), kl_selected=kl_sel.detach(), kl_frac=m.mean(), loss=loss.detach()
    )
    return loss, stats
