"""The toy world: procedurally rendered videos of one moving object over a textured background, with prompts.

A prompt comes from a small grammar (DESIGN §4), nine words, one slot per attribute:

    a {size} {colour} {shape} moving {direction} {speed} over {background}
    "a large red circle moving left quickly over stripes"

Everything else (a jitter of ±1 px along and ±1.5 px across the path, the background pattern's phase and a
faint tint) is drawn from the video's seed; the background word fixes the texture's pattern and grey level, the
world its amplitude (`WorldConfig.texture`). So ``render(prompts, seeds)`` is a pure function: the same (prompt,
seed) gives the same video, whatever batch it is rendered in.

Geometry (pixels, frames): ``size`` × ``size`` frames (32), ``frames`` frames per clip (9), one pixel frame per
latent frame (see `toy.vae` for why the temporal stride is 1). The object is a flat saturated colour; the
background a smooth grey texture of low saturation, so a saturation threshold separates them (the toy rewards rely
on it). The object moves at a constant ``speed`` px/frame along ``direction`` on a path centred in the frame
(± a pixel or two), fully inside it.

Frames are quantised to the dyadic grid ``k / 1024``: the toy VAE's affine map is then exact in float32 and the
rendered set is exactly representable (``decode(encode(x)) == x``).

Splits: the held-out split is every prompt whose (colour, shape) pair is in `HELD_OUT_PAIRS`; each word still
occurs in training, so held-out prompts test composition, not vocabulary. Its pairs are halved into a dev split
(tuning) and a test split (reporting, never tuned on); `eval_prompts` draws evaluation sets balanced in direction
and speed from any of the three.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------- grammar

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.16, 0.14),
    "green": (0.16, 0.74, 0.20),
    "blue": (0.16, 0.30, 0.94),
    "yellow": (0.94, 0.84, 0.10),
    "magenta": (0.86, 0.18, 0.84),
    "cyan": (0.10, 0.80, 0.86),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 4.0, "large": 6.0}  # radius-like scale in pixels (see `shape_alpha`)
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                               "down": (0.0, 1.0)}  # (dx, dy), image y points down
SPEEDS: dict[str, float] = {"slowly": 1.0, "quickly": 2.0}  # pixels per frame
BACKGROUNDS: tuple[str, ...] = ("stripes", "checks", "ripples")
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "circle"), ("blue", "square"),
                                               ("yellow", "triangle"))
DEV_PAIRS = HELD_OUT_PAIRS[0::2]  # held-out pairs for tuning: red triangle, blue square
TEST_PAIRS = HELD_OUT_PAIRS[1::2]  # held-out pairs for reporting, never tuned on: green circle, yellow triangle
SPLITS = ("train", "held_out", "dev", "test")
_EVAL_SPLITS = SPLITS[1:]
TEMPLATE = "a {size} {colour} {shape} moving {direction} {speed} over {background}"
PROMPT_WORDS = 9
JITTER_ALONG, JITTER_ACROSS = 1.0, 1.5  # start-position jitter (pixels) along and across the motion
QUANT = 1024  # frames are multiples of 1/QUANT (exactly representable through the toy VAE)


@dataclass(frozen=True)
class Spec:
    """The attributes a prompt names."""

    size: str
    colour: str
    shape: str
    direction: str
    speed: str
    background: str

    @property
    def prompt(self) -> str:
        return TEMPLATE.format(**self.__dict__)

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def velocity(self) -> tuple[float, float]:
        """Pixels per frame ``(dx, dy)``."""
        dx, dy = DIRECTIONS[self.direction]
        return dx * SPEEDS[self.speed], dy * SPEEDS[self.speed]

    @property
    def rgb(self) -> tuple[float, float, float]:
        return COLOURS[self.colour]


SLOTS = (  # (slot, its words) in prompt order
    ("size", SIZES), ("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS), ("speed", SPEEDS),
    ("background", BACKGROUNDS),
)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (the toy text encoder's table rows)."""
    words = ["a", "moving", "over"]
    for _, options in SLOTS:
        words.extend(options)
    return words


def parse_prompt(prompt: str) -> Spec:
    """Read a grammar prompt back into its `Spec`; raises a ValueError naming the first word that does not fit."""
    words = prompt.lower().split()
    form = TEMPLATE.split()
    if len(words) != len(form):
        raise ValueError(f"toy prompt {prompt!r} has {len(words)} words; the grammar is {TEMPLATE!r}")
    values = {}
    for word, slot in zip(words, form):
        if slot.startswith("{"):
            name = slot[1:-1]
            options = dict(SLOTS)[name]
            if word not in options:
                raise ValueError(f"toy prompt {prompt!r}: {word!r} is not a {name} (one of {', '.join(options)})")
            values[name] = word
        elif word != slot:
            raise ValueError(f"toy prompt {prompt!r}: expected {slot!r} where it says {word!r} ({TEMPLATE!r})")
    return Spec(**values)


def all_specs() -> list[Spec]:
    """Every prompt of the grammar (2·6·3·4·2·3 = 864), in a fixed order."""
    return [Spec(*combo) for combo in itertools.product(*(list(options) for _, options in SLOTS))]


def split(name: str) -> list[str]:
    """The prompts of a split, in `all_specs` order.

    ``"train"`` (672 prompts), ``"held_out"`` (192: the colour-shape pairs of `HELD_OUT_PAIRS`), and the held-out
    split's two halves by pair: ``"dev"`` (`DEV_PAIRS`, 96 prompts, for tuning) and ``"test"`` (`TEST_PAIRS`, 96,
    reported and never tuned on).
    """
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
    pairs = set(_split_pairs(name) if name != "train" else HELD_OUT_PAIRS)
    return [s.prompt for s in all_specs() if ((s.colour, s.shape) in pairs) == (name != "train")]


def _split_pairs(name: str) -> tuple[tuple[str, str], ...]:
    return {"held_out": HELD_OUT_PAIRS, "dev": DEV_PAIRS, "test": TEST_PAIRS}[name]


# the eight (direction, speed) motions in an order whose every prefix of 4 holds each direction once and each speed
# twice, so a set of 4·k prompts is balanced in direction, and of 8·k in direction × speed
_MOTIONS = (("left", "slowly"), ("right", "quickly"), ("up", "slowly"), ("down", "quickly"),
            ("left", "quickly"), ("right", "slowly"), ("up", "quickly"), ("down", "slowly"))


def eval_prompts(n: int = 12, split: str = "held_out") -> list[str]:
    """A fixed evaluation set of ``n`` prompts from ``split`` (held_out, dev or test), balanced in motion.

    Prompt i has the motion ``_MOTIONS[i % 8]``: every (direction, speed) occurs ⌊n/8⌋ or ⌈n/8⌉ times, every
    direction ⌊n/4⌋ or ⌈n/4⌉ times. Within a motion, the k-th prompt cycles through the split's colour-shape pairs
    and the backgrounds together (k mod lcm), the size alternating between cycles, each motion starting at another
    offset, so the pairs, sizes and backgrounds are near balanced too and no prompt repeats.
    """
    if split not in _EVAL_SPLITS:
        raise ValueError(f"evaluation sets come from {', '.join(_EVAL_SPLITS)}; got {split!r}")
    pairs, sizes = _split_pairs(split), list(SIZES)
    cycle = math.lcm(len(pairs), len(BACKGROUNDS))
    size_of_split = len(_MOTIONS) * cycle * len(sizes)
    if not 1 <= n <= size_of_split:
        raise ValueError(f"n must be in [1, {size_of_split}] for the {split} split; got {n}")
    out = []
    for i in range(n):
        c, k = i % len(_MOTIONS), i // len(_MOTIONS)
        j = k + c
        colour, shape = pairs[j % len(pairs)]
        direction, speed = _MOTIONS[c]
        size = sizes[(j // cycle + c) % len(sizes)]
        out.append(Spec(size, colour, shape, direction, speed, BACKGROUNDS[j % len(BACKGROUNDS)]).prompt)
    return out


# --------------------------------------------------------------------------------------------------- render


@dataclass(frozen=True)
class WorldConfig:
    """Clip geometry: ``size`` × ``size`` pixels, ``frames`` frames; ``texture``: the background pattern's
    amplitude (grey levels, ± around the background word's grey)."""

    size: int = 32
    frames: int = 9
    texture: float = 0.02


WORLD = WorldConfig()


def shape_alpha(shape_ids: Tensor, centre: Tensor, radius: Tensor, size: int) -> Tensor:
    """Anti-aliased coverage of each object: ``[N]`` shape index, ``[N, 2]`` centre (x, y), ``[N]`` radius -> ``[N, size, size]``.

    Signed distances in pixels (1-pixel soft edge): a circle of radius r, a square of half-side r, an upward
    equilateral triangle of inradius 0.6·r (its centroid is the centre, like the others'). Centred on each other,
    any two differ by IoU ≤ 0.79, so the shape stays readable after some blur.
    """
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    x = coords[None, None, :] - centre[:, 0, None, None]
    y = coords[None, :, None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    circle = torch.sqrt(x**2 + y**2) - r
    square = torch.maximum(x.abs(), y.abs()) - r
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    triangle = torch.maximum(torch.maximum(y, c * x - s * y), -c * x - s * y) - 0.6 * r
    d = torch.where(shape_ids[:, None, None] == 0, circle, torch.where(shape_ids[:, None, None] == 1, square, triangle))
    return (0.5 - d).clamp(0, 1)


def _background(kind: int, g: torch.Generator, size: int, texture: float) -> Tensor:
    """A smooth, low-saturation grey texture ``[3, size, size]`` (wavelength 12 px, so its Laplacian is small).

    The prompt's background word fixes the pattern and its grey level, ``texture`` its amplitude (grey ± texture);
    the seed only shifts the pattern (its phase, the stripes' angle, the ripples' centre) and tints it faintly. A
    texture that the prompt nearly determines keeps the world learnable by a tiny model in minutes, while still being
    texture a model can blur.
    """
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))  # noqa: E731
    coords = torch.arange(size, dtype=torch.float64) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    k, phase = 2 * math.pi / 12.0, u(0.0, 2 * math.pi)
    if kind == 0:  # diagonal stripes
        a = u(0.6, 1.0)
        pattern = torch.sin(k * (x * math.cos(a) + y * math.sin(a)) + phase)
    elif kind == 1:  # soft checks
        pattern = torch.sin(k * x + phase) * torch.sin(k * y + u(0.0, 2 * math.pi))
    else:  # ripples around a centre near the middle
        cx, cy = u(12.0, 20.0), u(12.0, 20.0)
        pattern = torch.sin(k * torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) + phase)
    grey = (0.40, 0.50, 0.45)[kind] + texture * pattern
    tint = torch.tensor([u(-0.02, 0.02), 0.0, u(-0.02, 0.02)], dtype=torch.float64)
    return (grey[None] + tint[:, None, None]).clamp(0, 1)


def _start(spec: Spec, g: torch.Generator, world: WorldConfig) -> tuple[float, float]:
    """The start centre: the trajectory centred in the frame, jittered by ±`JITTER_ALONG` px along the motion and
    ±`JITTER_ACROSS` px across it. The prompt nearly fixes the path, so the conditional mean a flow model learns
    is a recognisable, blurred object (the imperfect base a distilled model is), not a smear over the frame."""
    out = []
    for v in spec.velocity:
        centre = world.size / 2 - v * (world.frames - 1) / 2
        jitter = JITTER_ALONG if v else JITTER_ACROSS
        out.append(centre + jitter * (2 * float(torch.rand((), generator=g, dtype=torch.float64)) - 1))
    return out[0], out[1]


def render(prompts: list[str], seeds: list[int], world: WorldConfig = WORLD) -> Tensor:
    """The world's videos ``[B, T, 3, H, W]`` in [0, 1] (float32, multiples of 1/1024) for grammar prompts.

    Video b depends only on ``(prompts[b], seeds[b])``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per video")
    specs = [parse_prompt(p) for p in prompts]
    backgrounds, starts = [], []
    for spec, seed in zip(specs, seeds):
        g = torch.Generator().manual_seed(int(seed))
        starts.append(_start(spec, g, world))
        backgrounds.append(_background(BACKGROUNDS.index(spec.background), g, world.size, world.texture))
    b, t = len(specs), world.frames
    steps = torch.arange(t, dtype=torch.float64)
    start = torch.tensor(starts, dtype=torch.float64)  # [B, 2]
    vel = torch.tensor([s.velocity for s in specs], dtype=torch.float64)
    centres = start[:, None] + steps[None, :, None] * vel[:, None]  # [B, T, 2]
    shape_ids = torch.tensor([SHAPES.index(s.shape) for s in specs]).repeat_interleave(t)
    radius = torch.tensor([s.radius for s in specs], dtype=torch.float64).repeat_interleave(t)
    alpha = shape_alpha(shape_ids, centres.reshape(b * t, 2), radius, world.size).view(b, t, 1, world.size, world.size)
    colour = torch.tensor([s.rgb for s in specs], dtype=torch.float64)[:, None, :, None, None]
    bg = torch.stack(backgrounds)[:, None]  # [B, 1, 3, H, W]
    video = alpha * colour + (1 - alpha) * bg
    return (torch.round(video * QUANT) / QUANT).float()


# ---------------------------------------------------------------------------------------------------- long videos

BOUNDARIES = ("bounce", "wrap")


def render_long(schedules: list[list[tuple[int, str]]], seeds: list[int], frames: int, boundary: str = "bounce",
                world: WorldConfig = WORLD) -> Tensor:
    """Long videos ``[B, frames, 3, H, W]`` (float32, multiples of 1/1024): the clip world, kept moving.

    ``schedules[b]`` lists ``(first frame, prompt)`` scenes, the first at frame 0: from each scene's frame on the
    object takes that prompt's size, colour, shape and velocity (a colour change, a turn) and continues from where
    it is; the background is the first scene's (a later scene must name the same). The object starts as in
    `render` (the same seed gives the same first ``world.frames`` frames while it stays inside) and, on reaching a
    border, ``bounce`` reflects it (its velocity flips on that axis) or ``wrap`` carries it out one side and in at the
    other (drawn on both sides while it crosses). Video b depends only on ``(schedules[b], seeds[b])``.
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}; got {boundary!r}")
    if len(schedules) != len(seeds):
        raise ValueError(f"{len(schedules)} schedules but {len(seeds)} seeds; give one seed per video")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    n = world.size
    videos = []
    for schedule, seed in zip(schedules, seeds):
        if not schedule or schedule[0][0] != 0 or any(a >= b for (a, _), (b, _) in zip(schedule, schedule[1:])):
            raise ValueError(f"a schedule lists (frame, prompt) scenes in increasing order from frame 0; got {schedule}")
        specs = [(f, parse_prompt(p)) for f, p in schedule]
        if len({s.background for _, s in specs}) > 1:
            raise ValueError(f"the background stays for the whole video; the scenes of {schedule} name several")
        g = torch.Generator().manual_seed(int(seed))
        pos = torch.tensor(_start(specs[0][1], g, world), dtype=torch.float64)
        bg = _background(BACKGROUNDS.index(specs[0][1].background), g, n, world.texture)
        out, vel, active = [], torch.zeros(2, dtype=torch.float64), None
        for t in range(frames):
            scene = max(i for i, (f, _) in enumerate(specs) if f <= t)
            spec = specs[scene][1]
            if scene != active:  # a new scene sets the velocity; bounces flip it until the next one
                active, vel = scene, torch.tensor(spec.velocity, dtype=torch.float64)
            if t:
                pos = pos + vel
                if boundary == "bounce":
                    lo, hi = spec.radius + 1.0, n - spec.radius - 1.0
                    for axis in (0, 1):
                        if not lo <= float(pos[axis]) <= hi:
                            pos[axis] = 2 * (lo if pos[axis] < lo else hi) - pos[axis]
                            vel[axis] = -vel[axis]
                else:
                    pos = pos % n
            centres = pos[None] + (torch.tensor([[dx, dy] for dx in (-n, 0, n) for dy in (-n, 0, n)],
                                                dtype=torch.float64) if boundary == "wrap" else 0)
            k = centres.shape[0]
            alpha = shape_alpha(torch.full((k,), SHAPES.index(spec.shape)), centres,
                                torch.full((k,), spec.radius, dtype=torch.float64), n).amax(0)[None]
            colour = torch.tensor(spec.rgb, dtype=torch.float64)[:, None, None]
            out.append(alpha * colour + (1 - alpha) * bg)
        videos.append(torch.stack(out))
    return (torch.round(torch.stack(videos) * QUANT) / QUANT).float()
