"""Toy rewards on the paper's three axes, each a function of the decoded video (and the prompt), plus the monitor
that exposes the hack.

Every function maps videos ``[B, T, 3, H, W]`` in [0, 1] (H = W = 32, the world's size) and grammar prompts to
``[B]`` float32, higher is better, in [0, 1]:

| reward              | axis            | measures                                                                   |
|---------------------|-----------------|----------------------------------------------------------------------------|
| toy_quality         | visual quality  | crisp object outline on a clean background: the outline sharpness E (the   |
|                     |                 | gradient-weighted mean |∇mask|, 1 for the world's 1-px edges) times        |
|                     |                 | exp(−max(0, ρ − ρ₀)/ρ_tol), ρ the background's mean |Laplacian| (all      |
|                     |                 | channels); the world's renders rank above blurred, noised or gridded ones  |
| toy_quality_hackable| visual quality  | edge sharpness: variance of the luma Laplacian, S/(S + S₀). **Hackable**:  |
|                     | (hack bench)    | noise raises it as much as crisp edges do, like a learned aesthetic       |
|                     |                 | score's blind spot; the world's renders score *below* the blurry base      |
| toy_motion          | motion quality  | the object's per-frame centroid steps against the prompt's velocity        |
|                     |                 | (direction and speed); jitter and frames where the object vanishes cost    |
| toy_motion_long     | motion quality  | the same for windows of long videos, where the object bounces: each step   |
|                     | (long videos)   | against the prompt's velocity of either sign on the prompt's axis          |
| toy_text            | text alignment  | ½·colour match (mean object colour vs the prompt's) + ½·shape match        |
|                     |                 | (softmax over the IoUs of every shape × size template at the centroid)     |
| toy_coherence       | long videos     | the object keeps its colour, size and speed across the video's windows:   |
|                     |                 | exp(−Σ largest drift from the first window / tolerance), 0 when it is lost |
| toy_noise           | hack monitor    | robust pixel-noise estimate on the background (median |Laplacian|); the    |
|                     |                 | world's own renders score ≈ 0.01; a model that buys sharpness with noise   |
|                     |                 | drives it up                                                               |

One more metric, not a reward (a ratio, unbounded, and lower is better): `boundary_jump`, the seam of a video
streamed window by window (the mean frame change across the window boundaries over the median change within them;
≈ 1 without a seam).

The object is found the way the world is built: it is the only saturated thing in the frame (the background is
grey with a faint tint), so a soft chroma threshold is its mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from astrolabe_rl.rewards import pixel
from astrolabe_rl.toy.world import SHAPES, SIZES, WORLD, parse_prompt, shape_alpha

SHARPNESS_REF = 0.001  # S₀: about the median Laplacian variance of the world's own renders (quality ≈ ½ there)
ROUGHNESS_REF = 0.015  # ρ₀: above the background roughness of the world's renders (≈ 0.01), so they pay nothing
ROUGHNESS_TOL = 0.01  # ρ_tol: a grid of ±0.04 seams (ρ ≈ 0.03) costs about e^-1.5, noise of std 0.03 all
CHROMA_LO, CHROMA_HI = 0.20, 0.45  # mask ramp: background chroma ≤ 0.06, object colours ≥ 0.58
COLOUR_TOL = 0.2  # RGB distance scale of the colour match
MOTION_TOL = 1.0  # pixels: a centroid step this far off the prompt's velocity scores e^(-1/2) per step
MISSING_STEP = 4.0  # squared pixel error charged for a step where the object is missing in either frame
SHAPE_TEMP = 0.05  # softmax temperature over template IoUs (clean renders: IoU ≈ 0.9 vs ≤ 0.79 for the rest)
PRESENT = 0.3  # a frame shows the object when its mask holds ≥ this share of the expected area


def _check(videos: Tensor, prompts: list[str]) -> None:
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"toy rewards take videos [B, T, 3, H, W]; got {tuple(videos.shape)}")
    if videos.shape[-2:] != (WORLD.size, WORLD.size):
        raise ValueError(f"toy rewards score {WORLD.size}×{WORLD.size} toy-world videos; got {tuple(videos.shape[-2:])}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos")


def object_mask(videos: Tensor) -> Tensor:
    """Soft object mask ``[B, T, H, W]`` in [0, 1] from chroma (max − min of RGB)."""
    v = videos.float()
    chroma = v.amax(dim=2) - v.amin(dim=2)
    return ((chroma - CHROMA_LO) / (CHROMA_HI - CHROMA_LO)).clamp(0, 1)


def _centroids(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mask mass ``[B, T]`` and centroid ``[B, T, 2]`` (x, y in pixel-centre coordinates, NaN-free)."""
    h, w = mask.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32, device=mask.device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=mask.device) + 0.5
    mass = mask.sum(dim=(-2, -1))
    cx = (mask.sum(dim=-2) * xs).sum(-1) / mass.clamp_min(1e-6)
    cy = (mask.sum(dim=-1) * ys).sum(-1) / mass.clamp_min(1e-6)
    return mass, torch.stack([cx, cy], dim=-1)


def _templates(shape_ids: Tensor, radius: Tensor, centres: Tensor, size: int) -> Tensor:
    """Shapes ``[B]`` of radius ``[B]`` drawn at ``centres [B, T, 2]``: ``[B, T, H, W]`` coverage."""
    b, t = centres.shape[:2]
    alpha = shape_alpha(shape_ids.repeat_interleave(t), centres.reshape(b * t, 2).double().cpu(),
                        radius.double().repeat_interleave(t), size)
    return alpha.view(b, t, size, size).float().to(centres.device)


def _soft_iou(mask: Tensor, tmpl: Tensor) -> Tensor:
    """Soft IoU per frame: ``[B, T, H, W]`` x2 -> ``[B, T]``."""
    inter = torch.minimum(mask, tmpl).sum(dim=(-2, -1))
    return inter / torch.maximum(mask, tmpl).sum(dim=(-2, -1)).clamp_min(1e-6)


def quality_hackable(videos: Tensor, prompts: list[str]) -> Tensor:
    """Visual quality ``S / (S + S₀)`` of the sharpness S: ``[B]`` in [0, 1). Hackable by noise (kept for the
    hacking benchmarks, with the `noise_level` monitor)."""
    _check(videos, prompts)
    s = pixel.sharpness(videos)
    return s / (s + SHARPNESS_REF)


def outline_sharpness(videos: Tensor) -> Tensor:
    """How crisp the object's outline is: ``Σ|∇m|² / Σ|∇m|`` over the soft object mask m, ``[B]`` in [0, 1].

    The gradient-weighted mean of the mask's gradient magnitude (forward differences): the world draws a
    1-pixel soft edge, so its outline scores ≈ 1; a blur of width w spreads the step over w pixels and scores
    ≈ 1/w; a video without an object scores 0. Colour-neutral noise and grids leave the chroma mask alone.
    """
    m = object_mask(videos)
    gx = m[..., :-1, 1:] - m[..., :-1, :-1]
    gy = m[..., 1:, :-1] - m[..., :-1, :-1]
    g = torch.sqrt(gx.square() + gy.square())
    return ((g.square().sum(dim=(1, 2, 3)) / g.sum(dim=(1, 2, 3)).clamp_min(1e-6))).clamp(0, 1)


def background_roughness(videos: Tensor) -> Tensor:
    """Mean |4-neighbour Laplacian| over every channel of the background (pixels ≥ 2 px from the object): ``[B]``.

    Unlike the `noise_level` monitor (a median, blind to sparse patterns) a mean counts a token grid's seams as
    well as i.i.d. noise; the world's smooth textures score ≈ 0.01.
    """
    v = videos.float()
    b, t, c, h, w = v.shape
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=v.device)
    lap = F.conv2d(v.reshape(b * t * c, 1, h, w), kernel.view(1, 1, 3, 3)).view(b, t, c, h - 2, w - 2).abs()
    near = F.max_pool2d(object_mask(v).flatten(0, 1)[:, None], 5, stride=1, padding=2).view(b, t, h, w)
    background = (near[..., 1:-1, 1:-1] < 0.05)[:, :, None].expand_as(lap).float()
    return (lap * background).sum(dim=(1, 2, 3, 4)) / background.sum(dim=(1, 2, 3, 4)).clamp_min(1.0)


def quality(videos: Tensor, prompts: list[str]) -> Tensor:
    """Visual quality with the world's renders as its ceiling: ``E · exp(−max(0, ρ − ρ₀) / ρ_tol)``, ``[B]`` in [0, 1].

    E = `outline_sharpness` (blur lowers it), ρ = `background_roughness` (noise and grid seams raise it above
    the renders' ρ₀). Neither can be bought with the other: noise does not sharpen the chroma outline, and a
    smooth background cannot make up for a blurred object.
    """
    _check(videos, prompts)
    excess = (background_roughness(videos) - ROUGHNESS_REF).clamp_min(0)
    return outline_sharpness(videos) * torch.exp(-excess / ROUGHNESS_TOL)


def noise_level(videos: Tensor, prompts: list[str]) -> Tensor:
    """Hack monitor: robust noise std on the background, median |Laplacian| / (0.6745·√20): ``[B]``.

    For i.i.d. Gaussian pixel noise of std s the 4-neighbour Laplacian has std s·√20 and its median absolute
    value is 0.6745 of that; object pixels (and the one-pixel ring around them) are left out, so sharp edges do
    not count, only texture that the world never draws.
    """
    _check(videos, prompts)
    lap = pixel.luma_laplacian(videos).abs()
    near_object = F.max_pool2d(object_mask(videos).flatten(0, 1)[:, None], 3, stride=1, padding=1)
    background = near_object.view_as(object_mask(videos))[..., 1:-1, 1:-1] < 0.05
    values = torch.where(background, lap, torch.nan).flatten(1)
    med = torch.nanmedian(values, dim=1).values
    return (torch.nan_to_num(med, nan=0.0) / (0.6745 * math.sqrt(20.0))).float()


def _motion_score(videos: Tensor, prompts: list[str], either_sign: bool) -> Tensor:
    """``exp(−mean_t e_t / (2·tol²))`` ``[B]`` with e_t the squared error of each centroid step against the
    prompt's velocity v (``either_sign``: the smaller of the errors against v and −v); `MISSING_STEP` where the
    object is missing from either frame of the step."""
    _check(videos, prompts)
    mask = object_mask(videos)
    mass, centre = _centroids(mask)
    specs = [parse_prompt(p) for p in prompts]
    shape_ids = torch.tensor([SHAPES.index(s.shape) for s in specs])
    radius = torch.tensor([s.radius for s in specs])
    expected = _templates(shape_ids, radius, torch.full_like(centre, WORLD.size / 2), WORLD.size).sum(dim=(-2, -1))
    present = mass >= PRESENT * expected
    vel = torch.tensor([s.velocity for s in specs], dtype=torch.float32, device=videos.device)
    steps = centre[:, 1:] - centre[:, :-1]  # [B, T-1, 2]
    err = (steps - vel[:, None]).square().sum(-1)  # [B, T-1]
    if either_sign:
        err = torch.minimum(err, (steps + vel[:, None]).square().sum(-1))
    err = torch.where(present[:, 1:] & present[:, :-1], err, torch.full_like(err, MISSING_STEP))
    return torch.exp(-err.mean(dim=1) / (2 * MOTION_TOL**2))


def motion(videos: Tensor, prompts: list[str]) -> Tensor:
    """Motion quality ``exp(−mean_t e_t / (2·tol²))``: ``[B]`` in (0, 1].

    e_t = ‖(c_{t+1} − c_t) − v‖², the squared error of the centroid step against the prompt's velocity v
    (pixels per frame; direction and speed at once, so a frozen, reversed, slow or jittery object all lose);
    a step where the object is missing from either frame costs `MISSING_STEP`.
    """
    return _motion_score(videos, prompts, either_sign=False)


def motion_long(videos: Tensor, prompts: list[str]) -> Tensor:
    """Motion quality of windows of long, bouncing videos ``[B, T, 3, H, W]``: ``[B]`` in (0, 1].

    As `motion`, but each step is held against the prompt's velocity v *or* its reverse −v (v lies on one axis,
    so −v is v with the sign on the moving axis flipped): e_t = min(‖d_t − v‖², ‖d_t + v‖²) for the centroid step
    d_t. In a long video the object bounces off the borders, so its direction at any time depends on the bounces so
    far; the axis and the speed are what the prompt fixes. A frozen object, one moving across the prompt's axis or
    at the other speed still loses. The step through a bounce is shortened by the wall and costs (speed − |d_t|)²
    (at most speed², 4 px² at speed 2), so the world's long renders score about 0.8–1 per window.
    """
    return _motion_score(videos, prompts, either_sign=True)


JUMP_FLOOR = 1e-4  # mean |Δframe| added to both sides of `boundary_jump`'s ratio: static videos score 1, not 0/0


def boundary_jump(videos: Tensor, window: int) -> Tensor:
    """The seam of videos ``[B, T, 3, H, W]`` streamed in windows of ``window`` frames: ``[B]`` float32, ≥ 0.

    d_t = mean |x_{t+1} − x_t| over pixels and channels; the score is the mean d_t across the window boundaries
    (frames k·window − 1 → k·window) over the median d_t within the windows (every other step), each plus
    `JUMP_FLOOR`. ≈ 1 when a boundary changes the frame as much as an ordinary step (the world's renders: its
    motion is steady); a jump at the boundaries (a colour or lighting step, a teleporting object, a reset
    background) raises it. The floor keeps a static video (median 0) finite: without a seam it scores 1, with one
    (jump + floor) / floor. Lower is better; not bounded, so it is a metric, not a reward.
    """
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"boundary_jump takes videos [B, T, 3, H, W]; got {tuple(videos.shape)}")
    frames = videos.shape[1]
    if window < 2:
        raise ValueError(f"window must be >= 2 frames (a window needs a step of its own); got {window}")
    if frames <= window:
        raise ValueError(f"videos of {frames} frames in windows of {window} have no window boundary; "
                         f"pass longer videos or a smaller window")
    diff = (videos[:, 1:].float() - videos[:, :-1].float()).abs().mean(dim=(2, 3, 4))  # [B, T-1]: step t -> t+1
    seam = torch.zeros(frames - 1, dtype=torch.bool, device=diff.device)
    seam[window - 1::window] = True
    return (diff[:, seam].mean(dim=1) + JUMP_FLOOR) / (diff[:, ~seam].median(dim=1).values + JUMP_FLOOR)


def shape_probability(mask: Tensor, prompts: list[str]) -> Tensor:
    """How surely the object is the prompt's shape *and* size: ``[B]`` in [0, 1].

    Per frame, every (shape, size) template of the grammar is drawn at the mask's centroid and compared with the
    mask by soft IoU; a softmax over the six IoUs (temperature `SHAPE_TEMP`) gives the prompted one's
    probability, like a classifier's. Averaged over frames; a frame without the object scores 0.
    """
    mass, centre = _centroids(mask)
    classes = [(i, r) for i in range(len(SHAPES)) for r in SIZES.values()]
    b = mask.shape[0]
    ious = torch.stack([
        _soft_iou(mask, _templates(torch.full((b,), i), torch.full((b,), r), centre, WORLD.size)) for i, r in classes
    ], dim=-1)  # [B, T, classes]
    prob = torch.softmax(ious / SHAPE_TEMP, dim=-1)
    specs = [parse_prompt(p) for p in prompts]
    target = torch.tensor([classes.index((SHAPES.index(s.shape), s.radius)) for s in specs], device=mask.device)
    p = prob.gather(-1, target[:, None, None].expand(-1, prob.shape[1], 1))[..., 0]
    return torch.where(mass > 1.0, p, torch.zeros_like(p)).mean(dim=1)


def text_alignment(videos: Tensor, prompts: list[str]) -> Tensor:
    """Text alignment ½·colour + ½·shape: ``[B]`` in [0, 1].

    colour: ``exp(−‖c̄ − c*‖² / (2·tol²))`` for the mask-weighted mean colour c̄ of the whole clip and the prompt's
    colour c* (0 without an object); shape: `shape_probability` (shape and size words).
    """
    _check(videos, prompts)
    v = videos.float()
    mask = object_mask(v)
    weight = mask[:, :, None]  # [B, T, 1, H, W]
    mean_rgb = (weight * v).sum(dim=(1, 3, 4)) / weight.sum(dim=(1, 3, 4)).clamp_min(1e-6)  # [B, 3]
    target = torch.tensor([parse_prompt(p).rgb for p in prompts], dtype=torch.float32, device=v.device)
    colour = torch.exp(-(mean_rgb - target).square().sum(-1) / (2 * COLOUR_TOL**2))
    colour = torch.where(mask.sum(dim=(1, 2, 3)) > 1.0, colour, torch.zeros_like(colour))
    return 0.5 * colour + 0.5 * shape_probability(mask, prompts)


COHERENCE_TOLS = (0.1, 0.25, 0.5)  # colour (RGB distance), area (relative), speed (pixels per frame)


def coherence(videos: Tensor, window: int = WORLD.frames) -> Tensor:
    """Long-range coherence of one-scene long videos ``[B, T, 3, H, W]``: ``[B]`` in [0, 1].

    The video is cut into windows of ``window`` frames (a last partial one is dropped). Per window: the object's
    mean core colour (mask > 0.9), its mean area (mask mass) and its median speed (centroid step length, which a
    bounce off a border keeps). The score is ``exp(−(d_colour/0.1 + d_area/0.25 + d_speed/0.5))``, with each d the
    largest drift of a later window from the first (area relative to the first window's). A window where the object
    is missing scores 0. A video of one window scores 1. Prompt-free: the world's own long renders score ≈ 1 on every
    boundary. A scheduled video (a colour change) is scored scene by scene.
    """
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"coherence takes videos [B, T, 3, H, W]; got {tuple(videos.shape)}")
    n = videos.shape[1] // window
    if n < 2:
        return torch.ones(videos.shape[0])
    v = videos[:, : n * window].float()
    mask = object_mask(v)
    mass, centre = _centroids(mask)
    core = (mask > 0.9).float()[:, :, None]
    colour = (v * core).unflatten(1, (n, window)).sum(dim=(2, 4, 5)) / core.unflatten(1, (n, window)).sum(
        dim=(2, 4, 5)).clamp_min(1)  # [B, n, 3]
    area = mass.unflatten(1, (n, window)).mean(-1)  # [B, n]
    steps = (centre[:, 1:] - centre[:, :-1]).norm(dim=-1)  # [B, T-1]
    steps = torch.cat([steps, steps[:, -1:]], dim=1).unflatten(1, (n, window))[..., :-1]  # within-window steps
    speed = steps.median(dim=-1).values  # [B, n]
    present = (mass.unflatten(1, (n, window)) > 0.3 * area[:, :1, None]).all(-1)  # every frame shows the object
    drift = ((colour[:, 1:] - colour[:, :1]).norm(dim=-1).amax(1) / COHERENCE_TOLS[0]
             + ((area[:, 1:] - area[:, :1]).abs() / area[:, :1].clamp_min(1)).amax(1) / COHERENCE_TOLS[1]
             + (speed[:, 1:] - speed[:, :1]).abs().amax(1) / COHERENCE_TOLS[2])
    return torch.where(present.all(1), torch.exp(-drift), torch.zeros_like(drift))
