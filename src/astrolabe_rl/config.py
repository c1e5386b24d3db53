"""The run configuration: a typed dataclass schema, YAML files, dotted overrides, and validation that teaches.

    cfg = load_config("configs/smoke.yaml", ["train.lr=1e-5", "rollout.candidates=4"])

Every field carries a ``doc`` (with its unit) in its metadata; ``astrolabe print-config`` prints them as YAML
comments. Unknown keys are rejected with a did-you-mean; values are checked by `validate` before anything runs.
Defaults follow the released Astrolabe method (`reference/astrolabe.md` §2, §5).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with its documentation (unit included) in the metadata."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class ModelConfig:
    family: str = _f("tiny", "model family preset (astrolabe_rl.models.FAMILIES): self_forcing, longlive, tiny, ...")
    checkpoint: str | None = _f(None, "path of the family's official checkpoint (.pt / .safetensors); None = random init (tiny) or the shipped weights (toy)")
    wan_dir: str | None = _f(None, "Wan2.1-T2V-1.3B folder (umT5 encoder + tokenizer + VAE) for real models")
    lora: str | None = _f(None, "LoRA merged into the base before training (LongLive's lora.pt)")
    init_seed: int = _f(0, "seed of random weights (tiny model) and of the tiny text encoder / VAE")
    trust_checkpoint: bool = _f(False, "allow pickled Python objects in .pt checkpoints (unpickling can run code: only for files you trust)")
    dtype: str = _f("auto", "weights and activations: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    attn_backend: str = _f("auto", "attention kernel: auto, sdpa, flex")
    gradient_checkpointing: bool = _f(True, "recompute each DiT block in backward (saves activation memory; attention outputs are kept)")
    compile: str = _f("auto", "torch.compile the DiT blocks (training pass and the merged sampling copy): auto (on CUDA only), on, off")
    vae: str = _f("auto", "decoder for rewards: auto (Wan VAE for real models, tiny random Wan VAE for tiny, the exact toy VAE for toy), wan, tiny, toy")


@dataclass
class LoraConfig:
    rank: int = _f(256, "LoRA rank r")
    alpha: float = _f(256.0, "LoRA alpha (scale = alpha / rank)")
    dropout: float = _f(0.0, "LoRA dropout probability")
    targets: list[str] = _f(
        ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
         "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"],
        "module-name suffixes inside every DiT block that get a LoRA (default: all 10 linears)",
    )
    init: str | None = _f(None, "warm-start the trained adapter from this peft folder or checkpoint")


@dataclass
class DataConfig:
    train_prompts: str | None = _f(None, "text file, one prompt per line (None: use `prompts`)")
    eval_prompts: str | None = _f(None, "held-out prompts file (None: use `eval_inline`)")
    prompts: list[str] = _f([], "inline training prompts (for small runs)")
    eval_inline: list[str] = _f([], "inline held-out prompts")


@dataclass
class RolloutConfig:
    prompts_per_epoch: int = _f(16, "P: prompts drawn per epoch (over all ranks)")
    candidates: int = _f(24, "K: videos per prompt (the group of the advantage)")
    num_frames: int = _f(0, "latent frames per video (train.mode=streaming: of the evaluation videos, scored window by window); 0 = the family's training horizon (21 = 81 pixel frames)")
    micro_batch: int = _f(3, "videos per rank per rollout / training micro-batch")


@dataclass
class RewardItem:
    name: str = _f("sharpness", "registered reward name (astrolabe_rl.rewards.available_rewards())")
    weight: float = _f(1.0, "weight in the summed reward")
    kwargs: dict[str, Any] = _f({}, "keyword arguments of the reward's factory (paths, device, dtype, ...)")


@dataclass
class RewardsConfig:
    components: list[RewardItem] = _f([], "the rewards that are optimised, with their weights")
    combine: str = _f("raw", "raw: weighted sum of raw scores (released); group_z: z-score each reward in its group first")
    on_error: str = _f("zero", "a sample whose reward failed: drop (no loss), zero (advantage 0), abort (stop the run)")
    max_failed_frac: float = _f(0.5, "share of an epoch's samples (0 to 1) a reward may fail (exception, NaN or inf) before the run stops with an error, whatever on_error says")
    async_scoring: bool = _f(False, "score in a background thread, overlapped with the next rollout micro-batch (GPU)")
    monitors: list[str] = _f(
        ["brightness", "saturation", "sharpness", "colour_entropy", "temporal_flicker", "motion_energy"],
        "rewards that are only logged (hacking monitors)",
    )


@dataclass
class StreamingConfig:
    video_frames: int = _f(240, "latent frames of the longest rollout (released sample_frames: 240 = 960 pixel frames)")
    window: int = _f(21, "latent frames of the trained window (released 21 = one 81-frame clip); the history before it is rolled without gradient")
    start: str = _f("choices", "where the window starts: first (frame 0), last (video_frames − window), random (any block start), choices (one of `choices`; released random_choice)")
    choices: list[int] = _f([21], "window starts in latent frames for start=choices (released window_choices [21]; e.g. [21, 39, 57])")
    per: str = _f("epoch", "how often the window start is drawn: epoch (one for the whole epoch, released) or prompt (one per prompt)")
    history_kv: str = _f("per_policy", "the history's K/V in the three training passes: per_policy (each pass commits the history with its own weights: θ, θ_old, reference) or old (θ_old's, shared by the three: cheaper, approximate)")
    overlap: int = _f(0, "latent frames (whole blocks) of the committed history trained with each window, beyond the paper: the NFT loss covers the new frames, and θ's x̂0 of the overlap is pulled toward the committed frames (boundary_weight), against seams at window boundaries; 0 = off")
    # The term is a flow-matching regression onto the policy's own samples: unlike the NFT loss, whose gradient is
    # 2β(2r − 1)·e and vanishes at r = ½, it pulls at every σ, toward a posterior mean (the blur of nft.md §1.11).
    # On the toy world the NFT gradient's norm is ~4e-5, so weights ≥ 0.01 make the update all boundary term: the
    # training reward falls and late windows collapse (bench/streaming_ablations.md); at 1e-3 nothing collapses.
    boundary_weight: float = _f(1e-3, "weight of the boundary-consistency term ‖x̂0_θ − x0‖² on the overlap frames (with overlap > 0); calibrate it against the NFT gradient (train/grad_norm with overlap 0): a term that dominates it degrades a distilled model")
    decode_warmup: int = _f(0, "latent frames of history fed to the decoder's causal cache before the window is decoded; 0 = the whole history (exact)")


@dataclass
class TrainConfig:
    mode: str = _f("clip", "clip: train whole clips of rollout.num_frames (released); streaming: roll long videos and train one window (the `streaming` section)")
    epochs: int = _f(300, "epochs; train.update_passes optimiser steps per epoch (released: one)")
    lr: float = _f(1e-5, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "gradient-norm clip (L2, over all trained parameters)")
    beta: float = _f(0.1, "NFT mixing β of the implicit policies x̂0± (released: 0.1)")
    kl_weight: float = _f(1e-4, "λ_KL of ‖x̂0_θ − x̂0_ref‖² (released: 1e-4)")
    adv_clip: float = _f(5.0, "advantage clip; r = ½ + clip(A)/(2·adv_clip)")
    adv_std: str = _f("global", "advantage denominator: global (released) or group std")
    loss_form: str = _f("release", "release: plain x0 MSE; diffusionnft: adaptive weight and ×adv_clip/β")
    sigmas: str = _f("release_grid", "training noise levels: release_grid {1,.75,.5,.25}, release_below_1 {.75,.5,.25} (no σ = 1, where a fresh ε holds nothing of the endpoint), sampler_grid (the warped steps), uniform U(0,1)")
    context: str = _f("noisy", "noisy: whole clip noised under a block-causal mask (released); clean: clean detached history (teacher forcing)")
    noise: str = _f("fresh", "the training input x_t: fresh (released: x_t = (1 − σ)·x0 + σ·ε with a new ε, at a σ of train.sigmas) or rollout (the student's own sampling input at one of its steps, recorded during the rollout: each endpoint trained from the noise that produced it, exactly as sampled with train.context=clean; train.sigmas is then unused; clip mode)")
    update_passes: int = _f(1, "optimiser steps per epoch, each a pass over all of the epoch's rollouts with its own σ and noise draws; θ_old and the EMA follow every step (released: 1)")
    norm_guard: float = _f(0.0, "weight of the velocity-norm hinge mean_i max(0, rms(v_θ) − rms(v_ref))² (NormGuard: penalises θ's velocity only where it outgrows the reference's, at the same x_t; v_ref is the KL's reference); 0 = off")
    old_decay: int = _f(1, "old-policy update: 0 copy, 1 η=min(old_decay_rate·step, old_decay_max), 2 delayed")
    old_decay_rate: float = _f(0.001, "η gained per optimiser step by schedule 1 (released 0.001: η = 0.5 at step 500)")
    old_decay_max: float = _f(0.5, "the cap of η in schedule 1 (released 0.5), in [0, 1)")
    ema_decay: float = _f(0.9, "EMA decay of the trained adapter (eval and export)")
    reference: str = _f("base", "the KL's reference x̂0_ref: base (the frozen distilled model, released default), dynamic (a copy of θ re-taken by the released reset rule, regularize.reset_*), ema_ensemble (the mean prediction of EMAs of θ at regularize.ema_decays)")
    seed: int = _f(42, "seed of the adapter init, prompts, noise and σ draws")
    skip_nonfinite: bool = _f(True, "skip the optimiser step when the loss or gradient is NaN/inf (logged)")


@dataclass
class RegularizeConfig:
    mode: str = _f("uniform", "which samples the KL covers: uniform (every sample, released default) or selective (those whose main reward the auxiliaries do not back: algo.regularize)")
    main: str | None = _f(None, "selective: the main reward, a rewards.components name (released: video_hpsv3_local)")
    auxiliary: list[str] = _f([], "selective: one or two rewards.components names that must back the main reward (released: the MQ reward)")
    sign: str = _f("optimism", "selective: optimism penalises main high / auxiliaries low (the paper's intent); release reproduces the released code's opposite sign")
    measure: str = _f("rank", "selective: rank (ranks over the epoch's samples, released) or winrate (win-rates within the prompt group, GARDO)")
    rho: float = _f(0.1, "selective: starting share ρ of the non-negative disagreements that the KL covers (released 0.1)")
    rho_min: float = _f(0.02, "selective: lower bound of the adaptive ρ (released 0.02)")
    rho_max: float = _f(0.2, "selective: upper bound of the adaptive ρ (released 0.2)")
    rho_buffer: int = _f(20, "selective: epochs of mean disagreement that ρ's adaptation compares against (released 20)")
    reset_threshold: float = _f(0.15, "train.reference=dynamic: the starting threshold on the last step's selected KL ‖x̂0_θ − x̂0_ref‖² above which the reference is re-copied from θ (released 0.15; moves ±0.01 after each copy)")
    reset_max_gap: int = _f(15, "train.reference=dynamic: epochs after which the reference is re-copied whatever the KL (released 15)")
    reset_clamp: str = _f("release", "train.reference=dynamic: release caps a raised threshold at 0.05 as the released code does (a quirk: it lowers it); corrected caps it at reset_threshold_max")
    reset_threshold_max: float = _f(0.2, "train.reference=dynamic with reset_clamp=corrected: the highest threshold")
    ema_decays: list[float] = _f([0.9, 0.99, 0.999], "train.reference=ema_ensemble: the decays of the EMAs of θ whose mean x̂0 is the reference (each one more forward pass per micro-batch)")


@dataclass
class EvalConfig:
    every: int = _f(10, "evaluate every N epochs (0 = only at the end); evaluation is on when held-out prompts are given")
    seeds: list[int] = _f([0], "noise seeds per held-out prompt")
    videos: int = _f(4, "sample videos written per evaluation")
    monitors: list[str] = _f([], "rewards scored only on the held-out videos, never optimised (judges too slow to run on every rollout, e.g. toy_oracle); logged as eval/monitor/<name>")
    kl_sigmas: list[float] = _f([1.0, 0.75, 0.5, 0.25], "noise levels σ (0 to 1) at which the EMA's KL to the base, ‖x̂0_ema − x̂0_ref‖², is measured on the held-out samples (eval/kl_base): one fixed set, so the curve is comparable across epochs; [] = off")


@dataclass
class CheckpointConfig:
    every: int = _f(30, "checkpoint every N epochs and at the end (0 = never)")
    keep_last: int = _f(3, "complete checkpoints kept")
    resume: str | None = _f(None, "auto (newest complete checkpoint in run_dir), a checkpoint path, or None")
    force_resume: bool = _f(False, "resume even if run-altering config values changed")
    overwrite: bool = _f(False, "a fresh run into a run_dir that holds files moves them to <run_dir>.old-<UTC time> "
                                "(without it such a run fails; astrolabe train --overwrite)")


@dataclass
class LogConfig:
    tensorboard: bool = _f(True, "write TensorBoard events")
    wandb: bool = _f(False, "log to Weights & Biases (pip install wandb)")
    wandb_project: str | None = _f("astrolabe-rl", "wandb project")
    table: bool = _f(True, "write the per-rollout table (prompt, seed, rewards, advantage, group)")
    plots: bool = _f(True, "draw reward / KL curves as PNG at the end")
    progress: bool = _f(True, "rank-0 progress bar")


@dataclass
class DistConfig:
    strategy: str = _f("ddp", "multi-GPU strategy under torchrun: ddp, fsdp2, none")


@dataclass
class Config:
    run_dir: str = _f("runs/default", "output folder: config, metrics.jsonl, events, samples, tables, checkpoints")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the DiT and its decoders"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "the trained adapter"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "prompts"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": "sampling"})
    rewards: RewardsConfig = field(default_factory=RewardsConfig, metadata={"doc": "the objective"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "the NFT update"})
    streaming: StreamingConfig = field(default_factory=StreamingConfig,
                                       metadata={"doc": "long videos, trained one window at a time (train.mode=streaming)"})
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig,
                                         metadata={"doc": "which samples the KL covers, and how its reference moves"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "held-out evaluation"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": "saving and resuming"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": "outputs"})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"doc": "multi-GPU"})


# Values that change what a run computes: resuming across a change to one of them needs --force-resume.
CRITICAL_KEYS = (
    "model.family", "model.checkpoint", "lora.rank", "lora.alpha", "lora.targets", "rollout.prompts_per_epoch",
    "rollout.candidates", "rollout.num_frames", "train.beta", "train.kl_weight", "train.adv_clip", "train.loss_form",
    "train.sigmas", "train.context", "train.noise", "train.update_passes", "train.norm_guard", "train.old_decay", "train.old_decay_rate", "train.old_decay_max", "train.seed", "train.epochs", "rewards.components",
    "rewards.combine", "train.reference", "regularize", "train.mode", "streaming",
)

_CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16"),
    "model.attn_backend": ("auto", "sdpa", "flex"),
    "model.compile": ("auto", "on", "off"),
    "model.vae": ("auto", "wan", "tiny", "toy"),
    "rewards.combine": ("raw", "group_z"),
    "rewards.on_error": ("drop", "zero", "abort"),
    "train.adv_std": ("global", "group"),
    "train.loss_form": ("release", "diffusionnft"),
    "train.sigmas": ("release_grid", "release_below_1", "sampler_grid", "uniform"),
    "train.context": ("noisy", "clean"),
    "train.noise": ("fresh", "rollout"),
    "train.old_decay": (0, 1, 2),
    "dist.strategy": ("ddp", "fsdp2", "none"),
    "train.reference": ("base", "dynamic", "ema_ensemble"),
    "train.mode": ("clip", "streaming"),
    "streaming.start": ("first", "last", "random", "choices"),
    "streaming.per": ("epoch", "prompt"),
    "streaming.history_kv": ("per_policy", "old"),
    "regularize.mode": ("uniform", "selective"),
    "regularize.sign": ("optimism", "release"),
    "regularize.measure": ("rank", "winrate"),
    "regularize.reset_clamp": ("release", "corrected"),
}

_POSITIVE = (
    "rollout.prompts_per_epoch", "rollout.candidates", "rollout.micro_batch", "train.epochs", "train.lr",
    "lora.rank", "lora.alpha", "train.grad_clip", "train.adv_clip", "checkpoint.keep_last", "train.adam_eps",
    "train.update_passes", "regularize.rho_buffer", "regularize.reset_threshold", "regularize.reset_max_gap", "regularize.reset_threshold_max",
)

# Periods and counts where 0 has a meaning (see each field's doc) but a negative value has none.
_NON_NEGATIVE = ("eval.every", "checkpoint.every", "eval.videos", "train.weight_decay", "streaming.boundary_weight",
                 "streaming.decode_warmup", "train.norm_guard")

# Values that are shares or probabilities: key -> (low, high, whether high itself is allowed).
_UNIT_INTERVAL = {
    "rewards.max_failed_frac": (0.0, 1.0, True),
    "lora.dropout": (0.0, 1.0, False),
    "train.old_decay_max": (0.0, 1.0, False),
    "train.old_decay_rate": (0.0, 1.0, True),
}


# ------------------------------------------------------------------------------------------------ loading


def _did_you_mean(key: str, fields: dict[str, dataclasses.Field]) -> str | None:
    """The field a mistyped ``key`` most likely meant, or None.

    Tried in order: a close spelling (``lrr`` -> ``lr``); the key's initials (``learning_rate`` -> ``lr``); its last
    word, spelled closely, as a field or a word of a field's name (``num_epochs`` -> ``epochs``, ``save_every`` ->
    ``every``, ``ema`` -> ``ema_decay``); its words as a phrase in a field's doc (``learning_rate`` -> "AdamW
    learning rate").
    """
    close = difflib.get_close_matches(key, fields, n=1)
    if close:
        return close[0]
    words = [w for w in str(key).lower().replace("-", "_").split("_") if w]
    if not words:
        return None
    initials = "".join(w[0] for w in words)
    if len(words) > 1 and initials in fields:
        return initials
    by_word: dict[str, str] = {}  # a word of a field's name -> the field; a field's last word is matched first
    for name in fields:
        by_word.setdefault(name.split("_")[-1], name)
    for name in fields:
        for w in name.split("_"):
            by_word.setdefault(w, name)
    close = difflib.get_close_matches(words[-1], [*fields, *by_word], n=1, cutoff=0.8)
    if close:
        return close[0] if close[0] in fields else by_word[close[0]]
    phrase = " ".join(words)
    for name, f in fields.items():
        if len(words) > 1 and phrase in f.metadata.get("doc", "").lower():
            return name
    return None


def _check_keys(data: dict, schema: type, prefix: str = "") -> None:
    """Reject unknown keys with a did-you-mean before OmegaConf sees them."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            guess = _did_you_mean(key, names)
            hint = f"; did you mean '{prefix}{guess}'?" if guess else ""
            raise ValueError(f"unknown config key '{path}'{hint} (valid here: {', '.join(names)})")
        sub = names[key].default_factory if names[key].default_factory is not dataclasses.MISSING else None
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub):
            _check_keys(value, sub, prefix=f"{path}.")
        if key == "components" and isinstance(value, list):
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ValueError(f"{path}[{i}] must be a mapping like {{name: hpsv3, weight: 1.0}}")
                _check_keys(item, RewardItem, prefix=f"{path}[{i}].")


def _dotted_to_nested(key: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _yaml_error(where: str, error: Exception) -> str:
    """One line for a YAML syntax error: ``where:line:column: malformed YAML: problem (context)``."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    return f"{place}: malformed YAML: {problem}" + (f" ({context})" if context else "")


def yaml_load(text: str, where: str) -> Any:
    """Parse YAML safely, refusing a key given twice in one mapping (plain YAML keeps the last one silently, so a
    duplicated ``lr:`` would drop the first without a word); errors are one-line ValueErrors naming ``where``."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first at line {seen[key].line + 1}); keep one",
                    key_node.start_mark)
            seen.setdefault(key, key_node.start_mark)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                           lambda loader, node: mapping(loader, node, deep=True))
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ValueError(_yaml_error(where, e)) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-5)")
    key, raw = item.split("=", 1)
    return key.strip(), yaml_load(raw, f"override {item!r} (value)") if raw.strip() else None


def _read_yaml_file(p: Path) -> Any:
    """Parse a YAML file; a binary file or a syntax error becomes a one-line ValueError naming the file."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p} is not UTF-8 text (undecodable byte at offset {e.start}); "
                         "give a YAML file") from None
    return yaml_load(text, str(p))


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the shipped recipes (the checkout's configs/)


def find_config(path: str | Path) -> Path:
    """A YAML file by path, or a shipped recipe by name (``demo``, ``self_forcing_hpsv3``: `PACKAGED_CONFIGS`)."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if packaged.is_file() and p.parent in (Path("."), Path("configs")):
        return packaged
    from astrolabe_rl.errors import path_problem

    shipped = ", ".join(sorted(f.stem for f in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ValueError(f"{path_problem(p, 'config file')} (shipped recipes, usable by name: {shipped})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML file <- dotted overrides, then `validate`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    layers: list[dict] = []
    if path is not None:
        p = find_config(path)
        data = _read_yaml_file(p) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a mapping at the top level")
        layers.append(data)
    for item in overrides:
        key, value = _parse_override(item)
        layers.append(_dotted_to_nested(key, value))
    for layer in layers:
        _check_keys(layer, Config)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # type errors: say which key and what was expected
        key = getattr(e, "full_key", None) or "?"
        raise ValueError(f"bad value for config key '{key}': {str(e).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def get_value(cfg: Config | dict, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        cur = cur[part] if isinstance(cur, dict) else getattr(cur, part)
    return cur


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Reject NaN and ±inf anywhere in the schema's numbers (lists and reward items included; reward kwargs are
    the reward's business). YAML spells them .nan / .inf; a non-finite lr fails much later with a misleading
    message."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            where = key if i is None else f"{key}[{i}]"
            if dataclasses.is_dataclass(v):
                _check_finite(v, f"{where}.")
            elif isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{where}={v} is not a finite number; give a finite value")


def validate(cfg: Config) -> None:
    """Semantic checks with errors that say what to change."""
    _check_finite(cfg)
    for key, choices in _CHOICES.items():
        value = get_value(cfg, key)
        if value not in choices:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
    for key in _POSITIVE:
        if not get_value(cfg, key) > 0:
            raise ValueError(f"{key} must be > 0, got {get_value(cfg, key)}")
    for key in _NON_NEGATIVE:
        if get_value(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0 (see its doc for what 0 means), got {get_value(cfg, key)}")
    for key, (low, high, closed) in _UNIT_INTERVAL.items():
        value = get_value(cfg, key)
        if not (low <= value <= high if closed else low <= value < high):
            raise ValueError(f"{key} must lie in [{low:g}, {high:g}{']' if closed else ')'}, got {value}")
    if not all(0 < x <= 1 for x in cfg.eval.kl_sigmas):
        raise ValueError(f"eval.kl_sigmas must be noise levels in (0, 1], got {cfg.eval.kl_sigmas}")
    if len(cfg.train.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.train.adam_betas):
        raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {cfg.train.adam_betas}")
    if (cfg.data.eval_prompts or cfg.data.eval_inline) and not cfg.eval.seeds:
        raise ValueError("eval.seeds is empty but evaluation is on (data.eval_prompts or data.eval_inline is set): "
                         "give at least one noise seed, e.g. eval.seeds=[0], or no held-out prompts")
    if not 0 <= cfg.train.beta <= 1:
        raise ValueError(f"train.beta={cfg.train.beta} must lie in [0, 1] (released: 0.1)")
    if cfg.train.kl_weight < 0:
        raise ValueError(f"train.kl_weight must be >= 0, got {cfg.train.kl_weight}")
    _validate_regularize(cfg)
    _validate_streaming(cfg)
    if not 0 <= cfg.train.ema_decay < 1:
        raise ValueError(f"train.ema_decay must lie in [0, 1), got {cfg.train.ema_decay}")
    if cfg.rollout.candidates < 2:
        raise ValueError("rollout.candidates must be >= 2: the advantage compares videos of the same prompt")
    if cfg.rollout.num_frames < 0:
        raise ValueError(f"rollout.num_frames must be >= 0 (0 = the family's horizon), got {cfg.rollout.num_frames}")
    if not cfg.rewards.components:
        raise ValueError("rewards.components is empty: give at least one reward, e.g. [{name: sharpness, weight: 1}]")
    if not cfg.data.prompts and not cfg.data.train_prompts:
        raise ValueError("no training prompts: set data.train_prompts (a file) or data.prompts (a list)")
    from astrolabe_rl.models.families import FAMILIES

    if cfg.model.family not in FAMILIES:
        close = difflib.get_close_matches(cfg.model.family, FAMILIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.family={cfg.model.family!r} is unknown{hint} (choose from {', '.join(FAMILIES)})")
    from astrolabe_rl.models.build import OFFICIAL_LOADER

    official = FAMILIES[cfg.model.family].loader == OFFICIAL_LOADER  # tiny, toy, toy_fm bring their own weights
    if official and (cfg.model.checkpoint is None or cfg.model.wan_dir is None):
        raise ValueError(
            f"model.family={cfg.model.family!r} needs model.checkpoint (the official weights) and model.wan_dir "
            "(the Wan2.1-T2V-1.3B folder with the umT5 encoder and the VAE)"
        )


def _validate_streaming(cfg: Config) -> None:
    """Window, starts and lengths against each other and the family's blocks (errors name the field)."""
    if cfg.train.mode != "streaming":
        return
    if cfg.train.noise == "rollout":
        raise ValueError("train.noise=rollout trains whole clips on their recorded sampling inputs; with "
                         "train.mode=streaming use train.noise=fresh")
    st = cfg.streaming
    if not 0 < st.window <= st.video_frames:
        raise ValueError(f"streaming.window={st.window} must lie in [1, streaming.video_frames={st.video_frames}]: "
                         "the window is part of the video")
    if not 0 <= st.overlap < st.window:
        raise ValueError(f"streaming.overlap={st.overlap} must lie in [0, streaming.window={st.window}): the overlap "
                         "is the part of a window that the previous one already generated")
    if st.start == "choices":
        if not st.choices:
            raise ValueError("streaming.choices is empty: give window starts, e.g. [21], or another streaming.start")
        late = [c for c in st.choices if not 0 <= c <= st.video_frames - st.window]
        if late:
            raise ValueError(f"streaming.choices {late} start past the end: a window of streaming.window={st.window} "
                             f"frames must end by streaming.video_frames={st.video_frames}")
    from astrolabe_rl.models.families import FAMILIES

    if cfg.model.family in FAMILIES:
        sampler = FAMILIES[cfg.model.family].sampler
        try:
            starts = {s for s, _ in sampler.block_bounds(st.video_frames)}
        except ValueError as e:
            raise ValueError(f"streaming.video_frames={st.video_frames}: {e}") from None
        if st.overlap % sampler.frames_per_block:
            raise ValueError(f"streaming.overlap={st.overlap} must be whole blocks of {sampler.frames_per_block} "
                             "latent frames")
        bad = [c for c in (st.choices if st.start == "choices" else []) if c not in starts]
        if bad or (st.video_frames - st.window) not in starts:
            raise ValueError(f"streaming window starts must be block starts of the {cfg.model.family} sampler "
                             f"({sorted(starts)[:6]}, ...): check streaming.choices {bad or ''} and streaming.window="
                             f"{st.window} (the last window starts at video_frames − window)")


def _validate_regularize(cfg: Config) -> None:
    """Selective KL and the moving references, checked before anything is built (errors name the field)."""
    reg, names = cfg.regularize, [item.name for item in cfg.rewards.components]
    if not 0 < reg.rho_min <= reg.rho_max <= 1:
        raise ValueError(f"regularize.rho_min={reg.rho_min} and regularize.rho_max={reg.rho_max} must satisfy "
                         "0 < rho_min <= rho_max <= 1 (released 0.02 and 0.2)")
    if not reg.rho_min <= reg.rho <= reg.rho_max:
        raise ValueError(f"regularize.rho={reg.rho} must lie in [regularize.rho_min, regularize.rho_max] = "
                         f"[{reg.rho_min}, {reg.rho_max}]")
    if cfg.train.reference == "ema_ensemble" and not (reg.ema_decays and all(0 < d < 1 for d in reg.ema_decays)):
        raise ValueError(f"regularize.ema_decays={reg.ema_decays} must be one or more decays in (0, 1) "
                         "for train.reference=ema_ensemble, e.g. [0.9, 0.99, 0.999]")
    if (reg.mode == "selective" or cfg.train.reference != "base") and cfg.train.kl_weight == 0 and not (
            reg.mode != "selective" and cfg.train.norm_guard > 0):  # the guard reads the reference too
        what = "regularize.mode=selective" if reg.mode == "selective" else f"train.reference={cfg.train.reference}"
        raise ValueError(f"{what} shapes the KL term, but train.kl_weight=0 turns it off: set train.kl_weight > 0")
    if reg.mode != "selective":
        return
    if len(names) < 2:
        raise ValueError("regularize.mode=selective compares a main reward with auxiliary ones, but "
                         f"rewards.components has {len(names)} reward(s): configure at least two")
    if reg.main not in names:
        raise ValueError(f"regularize.main={reg.main!r} must name one of rewards.components: {names}")
    if not 1 <= len(reg.auxiliary) <= 2 or len(set(reg.auxiliary)) != len(reg.auxiliary):
        raise ValueError(f"regularize.auxiliary={reg.auxiliary} must list one or two distinct rewards (as released)")
    for name in reg.auxiliary:
        if name not in names:
            raise ValueError(f"regularize.auxiliary names {name!r}, which is not a configured reward; "
                             f"choose from rewards.components: {names}")
        if name == reg.main:
            raise ValueError(f"regularize.auxiliary lists the main reward {name!r}: an auxiliary must be another reward")


# ------------------------------------------------------------------------------------------------ output


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _yaml_scalar(value: Any) -> str:
    """JSON (valid flow-style YAML), with floats spelled so YAML 1.1 reads them back as floats (1.0e-05)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exp = text.partition("e")
        return f"{mantissa}.0e{exp}" if e and "." not in mantissa else text
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    return json.dumps(value)


def dump_yaml(cfg: Config, with_docs: bool = True) -> str:
    """YAML of the config; with ``with_docs`` every field is preceded by its documentation as a comment."""
    import yaml

    if not with_docs:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False)
    lines: list[str] = []

    def emit(obj: Any, indent: int) -> None:
        pad = "  " * indent
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            doc = f.metadata.get("doc")
            if doc:
                lines.append(f"{pad}# {doc}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:")
                emit(value, indent + 1)
            else:
                if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                    value = [dataclasses.asdict(v) for v in value]
                lines.append(f"{pad}{f.name}: {_yaml_scalar(value)}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"
