"""The oracle: fit each video to the world's parameters, score prompt agreement and render-likeness. Never trained on.

The world is known exactly (`toy.world`), so a generated video can be explained by the render that fits it best:

    colour      the palette colour nearest the object's mean core colour (pixels with object mask > 0.9)
    direction,  the grammar velocity (4 directions × 2 speeds) nearest the least-squares slope of the object's
    speed       per-frame centroids, c_t ≈ c_0 + t·v, over the frames where the object is present
    start       c_0 of that line, refined by a local search (±1 px, then ±0.25 px) on the object-layer residual
    shape, size the (shape, size) template whose render along that path best matches the video
    background  the pattern family (stripes, checks, ripples) whose parametric fit to the static background
                (per-pixel temporal median of the uncovered pixels) has the lowest residual; each family is
                grey + a·pattern + a faint R/B tint (G untinted), fitted by least squares over the pattern's
                phase and amplitude a (any texture strength, `world.WorldConfig.texture`) and a grid of its
                angle (stripes) or centre (ripples)

The best-fitting clean render is ``alpha·colour + (1 − alpha)·background_fit``; its RMS distance to the video is
the **residual** (pixel units): a clean render scores 0.0005–0.003 (the fit's angle / centre grids and the
1/1024 quantisation), while noise, blur, token-grid patterns, blobs, drift and flicker all raise it. A video in
which the object shows in fewer than two frames fails every object attribute.

Scores (`oracle_scores`), every one ``[B]``:

| name                     | meaning                                                                          |
|--------------------------|----------------------------------------------------------------------------------|
| colour, shape, size,     | 1 where the fitted attribute equals the prompt's, else 0                         |
| direction, speed,        |                                                                                  |
| background               |                                                                                  |
| position                 | 1 where the fitted start lies in the world's jitter box around the prompt's path |
|                          | (±JITTER_ALONG along, ±JITTER_ACROSS across, plus `POSITION_TOL`)                |
| agreement                | mean of the seven above                                                          |
| residual                 | RMS(video − best-fitting render); lower is better                                |
| residual_object,         | the same over pixels near the fitted object / the rest                           |
| residual_background      |                                                                                  |
| render                   | exp(−residual / `RESIDUAL_SCALE`) in (0, 1]                                       |
| oracle                   | ½·agreement + ½·render: the headline; the world's own renders score 0.96–0.99    |

Windows of long videos (`window_scores`, every score ``[B, n]``, one column per window of `WORLD.frames`): each
window is fitted with ``fit_video(..., bounce=True)``: the object may start anywhere and bounce off the borders
like `world.render_long`'s, so its path is the `fold` of a line into the centre's range ``[r + 1, size − r − 1]``;
the velocity is the signed grammar velocity whose folded path from the first centroid fits the centroids best, and
the start is searched along the folded path. The names are those above, and mean the same except:

| name                     | in a window                                                                      |
|--------------------------|----------------------------------------------------------------------------------|
| direction                | 1 where the fitted velocity lies on the prompt's axis (horizontal for left and   |
|                          | right, vertical for up and down), either sign: the bounces so far set the sign   |
| position                 | 1 where the fitted path's across-motion coordinate stays within                  |
|                          | ±(JITTER_ACROSS + `POSITION_TOL`) of the frame's centre line in every frame: the |
|                          | object must not drift sideways; along the motion it may be anywhere              |

The world's own long renders score agreement 1 in every window and render 0.92–0.99, as their clips do.

"oracle gap closed" = (after − base) / (renders − base), with ``renders = oracle_scores(world.render(...))``
on the same prompts (`render_ceiling`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from astrolabe_rl.toy import world
from astrolabe_rl.toy.rewards import PRESENT, object_mask
from astrolabe_rl.toy.world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS, WORLD, shape_alpha

ATTRIBUTES = ("colour", "shape", "size", "direction", "speed", "background", "position")
RESIDUAL_SCALE = 0.03  # pixels: a residual this large (i.i.d. noise of std 0.03, a blurred edge) scores e^-1
POSITION_TOL = 0.5  # pixels of slack around the world's start-jitter box
_GREY = (0.40, 0.50, 0.45)  # the background families' grey levels (world._background)
_K = 2 * math.pi / 12.0  # the backgrounds' wavenumber (12 px wavelength)
_VELOCITIES = [(d, s, (dx * v, dy * v)) for d, (dx, dy) in DIRECTIONS.items() for s, v in SPEEDS.items()]
_CLASSES = [(shape, size) for shape in SHAPES for size in SIZES]


# ------------------------------------------------------------------------------------------------ background


def _pattern_bases(size: int) -> list[Tensor]:
    """Candidate pattern bases ``[M, P, H·W]`` per family: P basis images whose span holds every phase.

    stripes: sin/cos of k·(x cos a + y sin a) for 33 angles a over the world's [0.6, 1.0] (+ margin);
    checks: the four products of sin/cos(kx) and sin/cos(ky) (the pattern's two phases, relaxed to their span);
    ripples: sin/cos of k·r around 33×33 centres on the world's [12, 20]² (+ margin).
    """
    c = torch.arange(size, dtype=torch.float64) + 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    angles = torch.linspace(0.55, 1.05, 33, dtype=torch.float64)
    proj = x[None] * torch.cos(angles)[:, None, None] + y[None] * torch.sin(angles)[:, None, None]
    stripes = torch.stack([torch.sin(_K * proj), torch.cos(_K * proj)], dim=1)
    sx, cx, sy, cy = torch.sin(_K * x), torch.cos(_K * x), torch.sin(_K * y), torch.cos(_K * y)
    checks = torch.stack([sx * sy, sx * cy, cx * sy, cx * cy])[None]
    centres = torch.linspace(11.5, 20.5, 33, dtype=torch.float64)
    ccx, ccy = torch.meshgrid(centres, centres, indexing="ij")
    r = torch.sqrt((x[None] - ccx.flatten()[:, None, None]) ** 2 + (y[None] - ccy.flatten()[:, None, None]) ** 2)
    ripples = torch.stack([torch.sin(_K * r), torch.cos(_K * r)], dim=1)
    return [b.flatten(2) for b in (stripes, checks, ripples)]


_BASES: dict[int, list[Tensor]] = {}


def fit_background(bg: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fit a static background ``bg [3, H, W]`` on the ``valid [H, W]`` pixels with each pattern family.

    Per family and candidate (angle / centre), least squares for the model
    ``bg_c = grey + tint_c + Σ_p a_p·basis_p`` with tint_G = 0 (the world tints only R and B).
    Returns the best family's index, its fitted image ``[3, H, W]`` and every family's RMS residual ``[3]``.
    """
    size = bg.shape[-1]
    if size not in _BASES:
        _BASES[size] = _pattern_bases(size)
    v = valid.flatten().double()  # [HW]
    n = 3 * v.sum().clamp_min(1)
    target = bg.double().flatten(1).clone()  # [3, HW]
    best, rms = None, []
    for kind, bases in enumerate(_BASES[size]):
        m, p, _ = bases.shape
        r = target.clone()
        r[1] -= _GREY[kind]  # the G channel has no tint: its level is the family's grey
        # normal equations of [pattern (shared by the channels) | R offset | B offset], built per block
        bv = bases * v  # [M, P, HW]
        gram = torch.zeros(m, p + 2, p + 2, dtype=torch.float64)
        gram[:, :p, :p] = 3 * bv @ bases.transpose(1, 2)
        gram[:, :p, p] = gram[:, p, :p] = gram[:, :p, p + 1] = gram[:, p + 1, :p] = bv.sum(-1)
        gram[:, p, p] = gram[:, p + 1, p + 1] = v.sum()
        rhs = torch.cat([bv @ r.sum(0), (v * r[0]).sum().expand(m, 1), (v * r[2]).sum().expand(m, 1)], dim=1)
        coef = torch.linalg.solve(gram + 1e-9 * torch.eye(p + 2, dtype=torch.float64), rhs[..., None])[..., 0]
        # squared error over the valid pixels = r'r − 2·coef'rhs + coef'G coef (no fitted image per candidate)
        err = ((v * r.square()).sum() - 2 * (coef * rhs).sum(-1) + (coef[:, None] @ gram @ coef[..., None])[:, 0, 0])
        j = int(err.argmin())
        pattern = coef[j, :p] @ bases[j]  # [HW]
        image = pattern.expand(3, -1) + torch.tensor([coef[j, p], 0.0, coef[j, p + 1]], dtype=torch.float64)[:, None]
        image[1] += _GREY[kind]
        rms.append(float((err[j].clamp_min(0) / n).sqrt()))
        if best is None or rms[-1] < best[2]:
            best = (kind, image.view(3, size, size), rms[-1])
    return torch.tensor(best[0]), best[1].float(), torch.tensor(rms)


# ------------------------------------------------------------------------------------------------ object


def _line_fit(centre: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares ``c_t = c0 + t·v`` over the present frames: ``[T, 2]``, ``[T]`` -> c0 ``[2]``, v ``[2]``."""
    t = torch.arange(centre.shape[0], dtype=torch.float64)
    w = present.double()
    if w.sum() < 2:  # one frame or none: no motion to read
        c0 = (centre.double() * w[:, None]).sum(0) / w.sum().clamp_min(1)
        return c0 if w.sum() > 0 else torch.full((2,), WORLD.size / 2, dtype=torch.float64), torch.zeros(2)
    tm = (w * t).sum() / w.sum()
    cm = (w[:, None] * centre.double()).sum(0) / w.sum()
    v = (w[:, None] * (t - tm)[:, None] * (centre.double() - cm)).sum(0) / (w * (t - tm) ** 2).sum()
    return cm - tm * v, v


def fold(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """Reflect unfolded coordinates ``x`` into ``[lo, hi]``: the bounce of `world.render_long`, elementwise.

    A triangle wave of period ``2·(hi − lo)``: ``x`` is kept on ``[lo, hi]``, mirrored on ``[hi, 2·hi − lo]``, and
    so on periodically.
    For a linear unfolded path ``x_t = c + t·v`` starting inside ``[lo, hi]`` (and ``|v| < hi − lo``) this is the
    position render_long reaches by stepping ``pos += v`` and reflecting ``pos = 2·bound − pos`` (flipping v) each
    time it leaves the interval. ``x`` any shape; ``lo``, ``hi`` floats or tensors broadcastable to it, ``lo < hi``.
    """
    span = hi - lo
    return lo + span - (torch.remainder(x - lo, 2 * span) - span).abs()


def _fold_sign(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """The slope of `fold` at ``x`` (same shape): +1 on its rising branches (``x − lo`` mod ``2·(hi − lo)`` at most
    ``hi − lo``, so an object just arriving at ``hi`` still moves up, as in render_long), −1 on the falling ones."""
    span = hi - lo
    return torch.where(torch.remainder(x - lo, 2 * span) <= span, 1.0, -1.0).to(x.dtype)


def _path(start: Tensor, vel: Tensor, frames: int, lo: Tensor | float, hi: Tensor | float, bounce: bool) -> Tensor:
    """Centres ``[..., T, 2]`` of an object starting at ``start [..., 2]`` with velocity ``vel [2]`` (float64):
    the line ``start + t·vel`` or, with ``bounce``, its `fold` into ``[lo, hi]`` (broadcastable to ``[..., 1, 1]``)."""
    t = torch.arange(frames, dtype=torch.float64)
    line = start.double()[..., None, :] + t[:, None] * vel.double()
    return fold(line, lo, hi) if bounce else line


def _bounce_fit(centre: Tensor, present: Tensor, lo: Tensor, hi: Tensor) -> tuple[int, Tensor]:
    """The motion of a bouncing object from its centroids ``centre [T, 2]`` over the ``present [T]`` frames.

    Velocity: every signed grammar velocity v is tried from the first present frame f (centroid c_f) with every
    class's bounds ``lo, hi [K]``, along the folded path ``fold(c_f + (t − f)·v, lo, hi)``; the v whose best path
    has the least squared centroid error wins. Starts: per class, each present centroid is unfolded onto the branch
    of the fold that path takes there (a reflection is its own inverse) and moved back by t·v; the mean over the
    present frames is the unfolded start (for a line, `fit_video`'s mean of ``c_t − t·v``).
    Returns v's index in `_VELOCITIES` and the starts ``[K, 2]`` (float64); without a present frame the first
    velocity and the frame's centre.
    """
    frames, k = centre.shape[0], lo.shape[0]
    if not bool(present.any()):
        return 0, torch.full((k, 2), WORLD.size / 2, dtype=torch.float64)
    f = int(present.double().argmax())
    c, w = centre.double(), present.double()
    vels = torch.tensor([v for _, _, v in _VELOCITIES], dtype=torch.float64)  # [V, 2]
    t = torch.arange(frames, dtype=torch.float64)[:, None]  # [T, 1]
    lo, hi = lo[:, None, None, None], hi[:, None, None, None]  # [K, 1, 1, 1]
    paths = fold(c[f] + (t - f) * vels[:, None], lo, hi)  # [K, V, T, 2]
    err = ((paths - c).square().sum(-1) * w).sum(-1)  # [K, V]
    j = int(err.min(dim=0).values.argmin())
    line = c[f] + (t - f) * vels[j]  # [T, 2]: the unfolded path through c_f
    lo, span = lo[:, 0], (hi - lo)[:, 0]  # [K, 1, 1]
    turns = torch.floor((line - lo) / (2 * span))  # [K, T, 2]: whole periods before frame t
    falling = line - lo - 2 * span * turns > span
    unfolded = torch.where(falling, 2 * lo + 2 * span * (turns + 1) - c, c + 2 * span * turns)
    return j, ((unfolded - t * vels[j]) * w[:, None]).sum(1) / w.sum()


def _object_layer(shape: int, radius: float, centres: Tensor, size: int) -> Tensor:
    """Coverage ``[T, H, W]`` of a shape of ``radius`` at ``centres [T, 2]`` (pixels)."""
    frames = centres.shape[0]
    return shape_alpha(torch.full((frames,), shape), centres, torch.full((frames,), radius, dtype=torch.float64),
                       size).float()


def _compose(alpha: Tensor, rgb: Tensor, bg: Tensor) -> Tensor:
    """``alpha [..., T, H, W]``, ``rgb [3]``, ``bg [3, H, W]`` -> render ``[..., T, 3, H, W]`` on the world's
    1/1024 grid."""
    a = alpha.unsqueeze(-3)
    video = a * rgb[:, None, None] + (1 - a) * bg
    return torch.round(video * world.QUANT) / world.QUANT


_CROP = 20  # pixels: a bouncing window's search box per frame, the largest object (7.7 px from its centre) ± the
# search's reach (1.2 px) with a pixel to spare


def _crops(guide: Tensor, video: Tensor, bg_fit: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per class and frame, a `_CROP`² box around the guide centres ``guide [K, T, 2]`` (kept inside the frame).

    ``video [T, 3, H, W]``; ``bg_fit [3, H, W]``: the fitted background. Returns the boxes' corners ``[K, T, 2]``
    (x, y; long), the video's and the background's crops ``[K, T, 3, S, S]``, and per class the squared error of the
    render without the object outside the boxes ``[K]`` (float64), which every candidate near the guide shares:
    adding it makes the crop errors of different classes comparable.
    """
    frames, _, _, size = video.shape
    corner = (torch.floor(guide) - (_CROP // 2 - 1)).clamp(0, size - _CROP).long()
    span = torch.arange(_CROP)
    rows = (corner[..., 1, None] + span)[..., :, None]  # [K, T, S, 1]
    cols = (corner[..., 0, None] + span)[..., None, :]  # [K, T, 1, S]
    t = torch.arange(frames)[:, None, None]
    cut = lambda x: x.permute(0, 2, 3, 1)[t, rows, cols].permute(0, 1, 4, 2, 3)  # noqa: E731  [T, 3, H, W] -> crops
    bare = torch.round(bg_fit * world.QUANT) / world.QUANT  # what `_compose` draws where the object is not
    sq = (bare - video).double().square()
    outside = sq.sum() - cut(sq).sum(dim=(1, 2, 3, 4))
    return corner, cut(video), cut(bg_fit.expand_as(video)), outside


def _candidate_errors(shape_ids: Tensor, radii: Tensor, centres: Tensor, rgb: Tensor, bg_fit: Tensor, video: Tensor,
                      crops: tuple[Tensor, Tensor, Tensor, Tensor] | None) -> Tensor:
    """Mean squared error ``[K, N]`` of the render of each candidate path ``centres [K, N, T, 2]`` (class k's shape
    and radius) against ``video [T, 3, H, W]``: over whole frames, or, with `_crops` of the same K classes, inside
    the boxes plus the error outside them (equal up to rounding while every candidate stays inside its boxes)."""
    k, n, frames = centres.shape[:3]
    size = video.shape[-1]
    ids, rad = shape_ids[:, None, None].expand(k, n, frames).flatten(), radii[:, None, None].expand(k, n, frames)
    if crops is None:
        alpha = shape_alpha(ids, centres.reshape(-1, 2), rad.flatten(), size).float().view(k, n, frames, size, size)
        return (_compose(alpha, rgb, bg_fit) - video).square().mean(dim=(2, 3, 4, 5))
    corner, video_crop, bg_crop, outside = crops
    local = (centres - corner[:, None]).reshape(-1, 2)
    alpha = shape_alpha(ids, local, rad.flatten(), _CROP).float().view(k, n, frames, _CROP, _CROP)
    sq = (_compose(alpha, rgb, bg_crop[:, None]) - video_crop[:, None]).square().sum(dim=(2, 3, 4, 5))
    return ((sq.double() + outside[:, None]) / video.numel()).float()


def fit_video(video: Tensor, bounce: bool = False) -> dict:
    """Fit one video ``[T, 3, H, W]`` to the world's parameters; returns them and the best-fitting render.

    Keys: found (the object shows in ≥ 2 frames), colour, shape, size, direction, speed, background (grammar
    words), start (x, y) ``[2]``, path (the fitted centres) ``[T, 2]``, render ``[T, 3, H, W]`` and the RMS
    residuals (all, object, background).

    ``bounce=False`` fits a clip of `world.render`: a straight path. ``bounce=True`` fits a window of
    `world.render_long` (``boundary="bounce"``) that may start anywhere and bounce off the borders: a candidate
    (start c, signed velocity v, class radius r) moves along ``fold(c + t·v, r + 1, size − r − 1)`` per axis; the
    velocity is chosen by the centroids' error to that folded path, the start searched along it, and start,
    direction and speed are the object's at the window's first frame (a bounce flips the sign later).
    """
    v = video.float().clamp(0, 1)
    frames, _, size, _ = v.shape
    mask = object_mask(v[None])[0]  # [T, H, W]
    mass = mask.sum(dim=(-2, -1))
    expected = min(float(shape_alpha(torch.tensor([i]), torch.full((1, 2), size / 2.0, dtype=torch.float64),
                                     torch.tensor([r], dtype=torch.float64), size).sum())
                   for i in range(len(SHAPES)) for r in SIZES.values())
    present = mass >= PRESENT * expected
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    centre = torch.stack([(mask.sum(-2) * coords).sum(-1), (mask.sum(-1) * coords).sum(-1)], -1) / mass.clamp_min(
        1e-6)[:, None]
    radii = torch.tensor([SIZES[sz] for _, sz in _CLASSES], dtype=torch.float64)
    lo, hi = radii + 1, size - radii - 1  # [K]: each class's range of centres, where a bouncing object turns
    if bounce:
        j, starts = _bounce_fit(centre, present, lo, hi)
        vel = torch.tensor(_VELOCITIES[j][2], dtype=torch.float64)
    else:
        c0, slope = _line_fit(centre, present)
        d, s, vel = min(_VELOCITIES, key=lambda c: (slope[0] - c[2][0]) ** 2 + (slope[1] - c[2][1]) ** 2)
        vel = torch.tensor(vel, dtype=torch.float64)
        c0 = (centre.double() - torch.arange(frames, dtype=torch.float64)[:, None] * vel)[present].mean(0) if bool(
            present.any()) else c0
        starts = c0.double()[None].expand(len(_CLASSES), 2)

    core = (mask > 0.9)[:, None].expand_as(v)
    obj_rgb = v[core].view(-1).new_tensor(0.0)
    if bool(core.any()):
        obj_rgb = torch.stack([v[:, ch][core[:, ch]].median() for ch in range(3)])
    else:
        obj_rgb = (v * mask[:, None]).sum(dim=(0, 2, 3)) / mask.sum().clamp_min(1e-6)
    colour = min(COLOURS, key=lambda c: float((torch.tensor(COLOURS[c]) - obj_rgb).square().sum()))
    rgb = torch.tensor(COLOURS[colour])

    # static background: per-pixel temporal median of the frames where the (dilated) object is absent
    near = F.max_pool2d(mask[:, None], 5, stride=1, padding=2)[:, 0] > 0.02  # [T, H, W]
    free = ~near
    bg_frames = torch.where(free[:, None], v, torch.nan)
    bg = torch.nan_to_num(torch.nanmedian(bg_frames, dim=0).values, nan=0.0)  # [3, H, W]
    kind, bg_fit, _ = fit_background(bg, free.any(0))

    # every (shape, size) class at once; the start is searched coarse-to-fine around the centroid path
    shape_ids = torch.tensor([SHAPES.index(sh) for sh, _ in _CLASSES])
    steps = torch.arange(-2, 3, dtype=torch.float64)
    offsets = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).view(-1, 2)  # [25, 2]
    classes = torch.arange(len(_CLASSES))
    # a bouncing window's object may be anywhere: its candidates are drawn in boxes around their class's first
    # guess (2.5x faster); a clip keeps the whole-frame search, so clip fits are unchanged bit for bit
    crops = None
    if bounce:
        crops = _crops(_path(starts, vel, frames, lo[:, None, None], hi[:, None, None], True), v, bg_fit)
    for stage, step in enumerate((0.4, 0.15, 0.05)):
        cands = starts[:, None] + step * offsets[None]  # [K, 25, 2]
        k = cands.shape[0]
        centres = _path(cands, vel, frames, lo[:, None, None, None], hi[:, None, None, None], bounce)  # [K, 25, T, 2]
        errs = _candidate_errors(shape_ids, radii, centres, rgb, bg_fit, v, crops)  # [K, 25]
        starts = cands[torch.arange(k), errs.argmin(dim=1)]
        if stage == 0:  # only the two best-fitting classes are refined
            keep = errs.min(dim=1).values.argsort()[:2]
            classes, shape_ids, radii, starts = classes[keep], shape_ids[keep], radii[keep], starts[keep]
            lo, hi = lo[keep], hi[keep]
            crops = tuple(x[keep] for x in crops) if crops is not None else None
    best = int(errs.min(dim=1).values.argmin())
    (shape_name, size_w), start = _CLASSES[int(classes[best])], starts[best]
    shape_i = SHAPES.index(shape_name)
    path = _path(start, vel, frames, lo[best], hi[best], bounce)  # [T, 2]
    if bounce:  # the object's velocity and place at the window's first frame
        vel = vel * _fold_sign(start, lo[best], hi[best])
        d, s, _ = next(c for c in _VELOCITIES if c[2] == tuple(vel.tolist()))
        start = path[0]
    alpha = _object_layer(shape_i, SIZES[size_w], path, size)
    render = _compose(alpha, rgb, bg_fit)
    sq = (render - v).square()
    near_fit = (F.max_pool2d(alpha[:, None], 3, stride=1, padding=1)[:, 0] > 0.0)[:, None].expand_as(sq)
    return {
        "found": int(present.sum()) >= 2, "colour": colour, "shape": SHAPES[shape_i], "size": size_w, "direction": d, "speed": s,
        "background": BACKGROUNDS[int(kind)], "start": start.float(), "path": path.float(), "render": render,
        "residual": float(sq.mean().sqrt()),
        "residual_object": float(sq[near_fit].mean().sqrt()) if bool(near_fit.any()) else 0.0,
        "residual_background": float(sq[~near_fit].mean().sqrt()),
    }


def _position_ok(start: Tensor, spec: world.Spec) -> bool:
    """Whether the fitted start lies in the world's jitter box around the prompt's nominal start."""
    for axis, vel in enumerate(spec.velocity):
        nominal = WORLD.size / 2 - vel * (WORLD.frames - 1) / 2
        box = (world.JITTER_ALONG if vel else world.JITTER_ACROSS) + POSITION_TOL
        if abs(float(start[axis]) - nominal) > box:
            return False
    return True


def _score_row(fit: dict, spec: world.Spec, direction: bool, position: bool) -> dict[str, float]:
    """One video's scores (the module table) from its `fit_video` fit, given the direction and position verdicts."""
    row = {a: float(fit[a] == getattr(spec, a) and (fit["found"] or a == "background"))
           for a in ATTRIBUTES if a != "position"}
    row["direction"] = float(fit["found"] and direction)
    row["position"] = float(fit["found"] and position)
    row["agreement"] = sum(row[a] for a in ATTRIBUTES) / len(ATTRIBUTES)
    for key in ("residual", "residual_object", "residual_background"):
        row[key] = fit[key]
    row["render"] = math.exp(-fit["residual"] / RESIDUAL_SCALE)
    row["oracle"] = 0.5 * row["agreement"] + 0.5 * row["render"]
    return row


def _check(videos: Tensor, prompts: list[str]) -> None:
    if videos.dim() != 5 or videos.shape[2] != 3 or videos.shape[-2:] != (WORLD.size, WORLD.size):
        raise ValueError(f"the oracle scores toy-world videos [B, T, 3, {WORLD.size}, {WORLD.size}]; "
                         f"got {tuple(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos")


def oracle_scores(videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
    """Fit every video ``[B, T, 3, H, W]`` (in [0, 1]) and score it against its prompt; see the module table.

    Returns name -> ``[B]`` float32 for each of `ATTRIBUTES`, ``agreement``, the three residuals, ``render``
    and the headline ``oracle``.
    """
    _check(videos, prompts)
    rows = []
    for video, prompt in zip(videos.detach().cpu(), prompts):
        spec, fit = world.parse_prompt(prompt), fit_video(video)
        rows.append(_score_row(fit, spec, fit["direction"] == spec.direction, _position_ok(fit["start"], spec)))
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in rows[0]}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the oracle on one torch thread: its fits are many small tensor operations, which two threads on busy
    cores slow down several-fold (16 long videos: 8 s on one thread, 60 s on two while training shares the CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def window_scores(videos: Tensor, prompts: list[str], window: int = WORLD.frames) -> dict[str, Tensor]:
    """Score the windows of one-scene long videos ``[B, T, 3, H, W]`` (in [0, 1]) against their prompts.

    The videos are cut into ``n = T // window`` windows (a last partial one is dropped), each fitted by
    `fit_video` with ``bounce=True`` and scored as in `oracle_scores`, except ``direction`` (the fitted velocity
    lies on the prompt's axis, either sign: bounces flip it) and ``position`` (the fitted path never leaves the
    across-motion jitter band); see the module table. Returns the same names as `oracle_scores`, each ``[B, n]``
    float32.
    """
    _check(videos, prompts)
    if window < 2:
        raise ValueError(f"window must be >= 2 frames (a velocity needs two); got {window}")
    n = videos.shape[1] // window
    if n == 0:
        raise ValueError(f"videos of {videos.shape[1]} frames hold no whole window of {window} frames; "
                         f"pass a smaller window or longer videos")
    band = world.JITTER_ACROSS + POSITION_TOL
    rows = []
    for video, prompt in zip(videos.detach().cpu(), prompts):
        spec = world.parse_prompt(prompt)
        axis = 0 if spec.velocity[0] else 1  # the prompt's axis of motion; the other one must stay put
        for k in range(n):
            fit = fit_video(video[k * window:(k + 1) * window], bounce=True)
            on_axis = DIRECTIONS[fit["direction"]][axis] != 0
            in_band = bool(((fit["path"][:, 1 - axis] - WORLD.size / 2).abs() <= band).all())
            rows.append(_score_row(fit, spec, on_axis, in_band))
    return {key: torch.tensor([r[key] for r in rows], dtype=torch.float32).view(len(prompts), n) for key in rows[0]}


def render_ceiling(prompts: list[str], seeds: list[int]) -> dict[str, Tensor]:
    """`oracle_scores` of the world's own renders of ``prompts`` (the ceiling of "oracle gap closed")."""
    return oracle_scores(world.render(prompts, seeds), prompts)


def gap_closed(after: float, base: float, ceiling: float) -> float:
    """``(after − base) / (ceiling − base)``: the share of the base's distance to the renders that a run closed."""
    if ceiling - base <= 0:
        raise ValueError(f"the base ({base:.4f}) is not below the ceiling ({ceiling:.4f}); the gap is undefined")
    return (after - base) / (ceiling - base)


def within_prompt_diversity(videos: Tensor, samples_per_prompt: int) -> Tensor:
    """How much the K samples of each prompt differ: per-pixel std over the K samples, averaged over pixels.

    ``videos [P·K, T, 3, H, W]`` with the K samples of a prompt adjacent -> ``[P]``. The world's renders of one
    prompt (K seeds) differ only by their jitter and texture phase; a mode-seeking model repeats one composition.
    """
    k = samples_per_prompt
    if k < 2 or videos.shape[0] % k:
        raise ValueError(f"need K ≥ 2 samples per prompt and a batch divisible by K; got K={k}, batch {videos.shape[0]}")
    return videos.float().unflatten(0, (-1, k)).std(dim=1, correction=0).mean(dim=(1, 2, 3, 4))


# ------------------------------------------------------------------------------------------------ degradations


def degrade(videos: Tensor, kind: str, seed: int = 0, strength: float = 1.0) -> Tensor:
    """Damaged copies of videos ``[B, T, 3, H, W]`` in [0, 1], the failure modes the oracle and `toy_quality`
    must rank below the renders:

    * ``blur``: a 5×5 binomial blur (std ≈ 1 px) per frame;
    * ``noise``: i.i.d. Gaussian pixel noise of std 0.03 (the hack of the sharpness proxy);
    * ``grid``: an 8-pixel token-grid pattern (the 2×2-latent-patch seams of the toy DiT): ±0.04 on the first and
      last row and column of every 8×8 tile;
    * ``blob``: the object smeared into a soft blob about 1.5–1.8× its size (its mask dilated by 3 px and
      blurred, filled with its mean colour).

    ``strength`` scales the damage (noise std, grid amplitude, blur mix, blob growth).
    """
    v = videos.float()
    b, t, c, h, w = v.shape
    if kind == "blur":
        k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
        k = (k1[:, None] * k1[None]).expand(c, 1, 5, 5).contiguous()
        blurred = F.conv2d(F.pad(v.reshape(b * t, c, h, w), (2, 2, 2, 2), mode="replicate"), k, groups=c)
        out = torch.lerp(v, blurred.view_as(v), min(strength, 1.0))
    elif kind == "noise":
        g = torch.Generator().manual_seed(seed)
        out = v + 0.03 * strength * torch.randn(v.shape, generator=g).to(v.device)
    elif kind == "grid":
        pos = torch.arange(h, device=v.device) % 8
        edge = ((pos == 0) | (pos == 7)).float()
        pattern = torch.maximum(edge[:, None], edge[None, :]) * 2 - 1  # +1 on tile borders, -1 inside
        out = v + 0.04 * strength * pattern * (pattern > 0)
    elif kind == "blob":
        mask = object_mask(v).flatten(0, 1)[:, None]  # [B·T, 1, H, W]
        grow = 2 * round(3 * strength) + 1  # dilating by 3 px makes a radius-4 object radius 7 (1.75×)
        k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=v.device) / 16
        soft = F.max_pool2d(mask, grow, stride=1, padding=grow // 2)
        soft = F.conv2d(F.pad(soft, (2, 2, 2, 2), mode="replicate"), (k1[:, None] * k1[None])[None, None])
        soft = soft.view(b, t, 1, h, w).clamp(0, 1)
        m = mask.view(b, t, 1, h, w)
        rgb = (v * m).sum(dim=(1, 3, 4)) / m.sum(dim=(1, 3, 4)).clamp_min(1e-6)  # [B, 3]
        out = torch.lerp(v, rgb[:, None, :, None, None].expand_as(v), soft)
    else:
        raise ValueError(f"unknown degradation {kind!r}; use blur, noise, grid or blob")
    return out.clamp(0, 1)
