"""Every shipped recipe (`astrolabe_rl/configs/*.yaml`, the checkout's `configs/`): it loads and validates as
shipped, its header gives the launch command (and, for a multi-GPU launch, hardware that fits its batch geometry),
its names resolve (family, rewards, files in the official download layout), and its run builds on the tiny family
with the geometry overridden. A new YAML in the folder is covered without editing this file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from astrolabe_rl.config import PACKAGED_CONFIGS, Config, load_config
from astrolabe_rl.models import CausalWan, WanConfig
from astrolabe_rl.models import get_family
from astrolabe_rl.models.build import (DEFAULT_CHECKPOINTS, DEFAULT_LORAS, DEFAULT_WAN_DIR, ModelFilesError,
                                       check_official_files)
from astrolabe_rl.rewards import available_rewards
from astrolabe_rl.train import dist, recipe

SHIPPED = sorted(PACKAGED_CONFIGS.glob("*.yaml"))
CHEAP_REWARDS = ("sharpness", "saturation", "brightness")  # stand-ins for the real rewards, one per component


def _header(path: Path) -> list[str]:
    """The leading comment block, without the ``# `` markers."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def _launch(path: Path) -> str:
    return _header(path)[0] if _header(path) else ""


def _is_demo(path: Path) -> bool:
    """The demo's recipe: `astrolabe demo` fills in its prompts and run folder (`toy.demo.demo_config`)."""
    return _launch(path).startswith("astrolabe demo")


def _shipped_config(path: Path, tmp_path: Path) -> Config:
    if _is_demo(path):
        from astrolabe_rl.toy.demo import demo_config

        return demo_config(tmp_path)
    return load_config(path)


def _gpus(header: list[str]) -> int | None:
    """The GPU count of a ``Hardware: ... N GPUs`` line, or None."""
    for line in header:
        m = re.match(r"Hardware:.*?(\d+)\s+GPUs", line)
        if m:
            return int(m.group(1))
    return None


def _launched_ranks(launch: str) -> int:
    """Processes a torchrun line starts: ``--nnodes`` x ``--nproc_per_node`` (1 without torchrun)."""
    if not launch.startswith("torchrun"):
        return 1
    nodes = re.search(r"--nnodes[ =](\d+)", launch)
    per_node = re.search(r"--nproc_per_node[ =](\d+)", launch)
    assert per_node, f"torchrun launch without --nproc_per_node: {launch}"
    return (int(nodes.group(1)) if nodes else 1) * int(per_node.group(1))


def test_the_folder_ships_every_released_recipe():
    names = {p.stem for p in SHIPPED}
    released = {"self_forcing_hpsv3", "self_forcing_hpsv3_mq", "causal_forcing_3rewards_8gpu",
                "causal_forcing_3rewards_48gpu", "longlive_hpsv3", "longlive_gardo", "longlive_streaming", "krea14b_fsdp2"}
    assert released <= names, f"missing recipes: {sorted(released - names)}"
    assert (Path(__file__).resolve().parents[1] / "configs").resolve() == PACKAGED_CONFIGS.resolve()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_recipe_loads_validates_and_says_how_to_launch_it(path, tmp_path, monkeypatch):
    launch = _launch(path)
    assert re.match(r"(torchrun .*-m astrolabe_rl\.train|astrolabe (train|demo))\b", launch), (
        f"{path.name} must start with a comment giving its launch command, got {launch!r}")
    if not _is_demo(path):
        assert re.search(rf"--config (configs/)?{re.escape(path.stem)}(\.yaml)?\b", launch), (
            f"{path.name}'s launch command does not name the file itself: {launch!r}")
    cfg = _shipped_config(path, tmp_path)  # load_config validates: unknown keys, choices, ranges, prompts, ...

    known = set(available_rewards())
    names = [item.name for item in cfg.rewards.components] + list(cfg.rewards.monitors) + list(cfg.eval.monitors)
    assert set(names) <= known, f"{path.name}: unregistered rewards {sorted(set(names) - known)}"
    if cfg.model.family not in ("tiny", "toy"):  # real weights: the official download layout by default
        assert cfg.model.checkpoint == DEFAULT_CHECKPOINTS[cfg.model.family].path
        assert cfg.model.wan_dir == DEFAULT_WAN_DIR
        assert cfg.model.lora in (None, "none", DEFAULT_LORAS.get(cfg.model.family))
        assert cfg.lora.init in (None, DEFAULT_LORAS.get(cfg.model.family))
        monkeypatch.chdir(tmp_path)  # nothing downloaded: the loader names exactly the files this recipe reads
        with pytest.raises(ModelFilesError) as missing:
            check_official_files(get_family(cfg.model.family), recipe.model_source(cfg))
        assert f"checkpoint: {cfg.model.checkpoint} does not exist" in str(missing.value)
        merges_lora = cfg.model.lora != "none" and cfg.model.family in DEFAULT_LORAS
        assert ("LoRA:" in str(missing.value)) == merges_lora, str(missing.value)
        assert not (merges_lora and cfg.lora.init), "the LongLive LoRA merged into the base and warm-starting θ too"

    ranks = _launched_ranks(launch)
    gpus = _gpus(_header(path))
    if cfg.model.family not in ("tiny", "toy"):
        assert gpus is not None, f"{path.name}: a real recipe states its hardware ('# Hardware: ... N GPUs ...')"
    if ranks > 1:  # a multi-GPU recipe: its hardware line agrees with the launch, and its batch splits evenly
        assert gpus == ranks, f"{path.name}: the hardware line says {gpus} GPUs, the launch starts {ranks}"
        total = cfg.rollout.prompts_per_epoch * cfg.rollout.candidates
        sampler = dist.GroupSampler(cfg.rollout.prompts_per_epoch, cfg.rollout.prompts_per_epoch,
                                    cfg.rollout.candidates, ranks, 0, cfg.train.seed)
        assert sampler.samples_per_rank * ranks == total
        assert sampler.samples_per_rank % cfg.rollout.micro_batch == 0, (
            f"{path.name}: {sampler.samples_per_rank} videos per rank is not a whole number of "
            f"micro-batches of {cfg.rollout.micro_batch}")


def _tiny_overrides(cfg: Config, run_dir: Path, *extra: str) -> list[str]:
    """The recipe on the tiny family at a CPU geometry; everything else (LoRA, hyper-parameters, strategy, the
    number and weights of the rewards, selective KL's roles for them, async scoring) as shipped."""
    assert len(cfg.rewards.components) <= len(CHEAP_REWARDS)
    cheap = ", ".join(f"{{name: {name}, weight: {item.weight}}}"
                      for name, item in zip(CHEAP_REWARDS, cfg.rewards.components))
    rename = {item.name: name for name, item in zip(CHEAP_REWARDS, cfg.rewards.components)}
    roles = [f"regularize.main={rename[cfg.regularize.main]}",
             f"regularize.auxiliary=[{', '.join(rename[a] for a in cfg.regularize.auxiliary)}]"
             ] if cfg.regularize.mode == "selective" else []
    return [*roles,
        "model.family=tiny", "model.checkpoint=null", "model.wan_dir=null", "model.lora=null", "lora.init=null",
        "model.device=cpu", "model.dtype=float32",
        "data.train_prompts=null", "data.eval_prompts=null", "data.prompts=[a red ball, a blue cube, a green cone]",
        "data.eval_inline=[]", f"rewards.components=[{cheap}]", "rewards.monitors=[brightness]",
        "rollout.prompts_per_epoch=2", "rollout.candidates=2", "rollout.num_frames=3", "rollout.micro_batch=2",
        "train.epochs=1", f"run_dir={run_dir}", "checkpoint.every=0",
        "log.tensorboard=false", "log.plots=false", "log.progress=false", "log.table=false", *extra,
    ]


def _longlive_lora_file(path: Path, rank: int, targets: list[str]) -> dict[str, torch.Tensor]:
    """A LongLive-format ``lora.pt`` (``{"generator_lora": peft keys}``) for the tiny DiT; returns its tensors
    keyed as `Policy.adapter_params` keys them."""
    model = CausalWan(WanConfig.tiny())
    generator = torch.Generator().manual_seed(7)
    tensors, saved = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks.") and name.endswith(tuple(targets)):
            a = torch.randn(rank, module.in_features, generator=generator)
            b = torch.randn(module.out_features, rank, generator=generator)
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
            saved[f"base_model.model.{name}.lora_A.weight"], saved[f"base_model.model.{name}.lora_B.weight"] = a, b
    torch.save({"generator_lora": saved}, path)
    return tensors


@pytest.fixture
def _single_process():
    yield
    dist.shutdown()


TRAIN_RECIPES = [p for p in SHIPPED if not _is_demo(p)]


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_recipe_builds_its_run_on_the_tiny_family(path, tmp_path, _single_process, one_thread):
    shipped = load_config(path)
    extra = []
    warm = None
    if shipped.lora.init:  # the warm start, exercised with a LongLive-format file of the shipped rank
        warm = _longlive_lora_file(tmp_path / "lora.pt", shipped.lora.rank, shipped.lora.targets)
        extra.append(f"lora.init={tmp_path / 'lora.pt'}")
    cfg = load_config(path, _tiny_overrides(shipped, tmp_path / "run", *extra))
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.lr, cfg.train.kl_weight, cfg.dist.strategy) == (
        shipped.lora.rank, shipped.lora.alpha, shipped.train.lr, shipped.train.kl_weight, shipped.dist.strategy)

    world = recipe.setup(cfg)
    try:
        # fsdp2 and ddp fall back to the plain model in one process (dist.wrap_model)
        assert world.train_model is world.policy.model
        assert world.weights == {c.name: c.weight for c in cfg.rewards.components}
        lora_a = next(p for n, p in world.policy.adapter_params("default").items() if n.endswith("lora_A.weight"))
        assert lora_a.shape[0] == shipped.lora.rank
        if warm is not None:
            for adapter in ("default", "old"):
                params = world.policy.adapter_params(adapter)
                assert params.keys() == warm.keys()
                assert all(torch.equal(params[k], warm[k]) for k in warm), f"{adapter} is not the warm start"
    finally:
        recipe.teardown(world)


def test_one_epoch_of_a_warm_started_recipe_moves_the_adapter(tmp_path, _single_process, one_thread):
    """One representative recipe (LongLive + HPSv3: the LoRA warm start, the released r256 and hyper-parameters)
    runs a whole epoch on the tiny family: one optimiser step that moves θ away from the warm start."""
    path = PACKAGED_CONFIGS / "longlive_hpsv3.yaml"
    shipped = load_config(path)
    warm = _longlive_lora_file(tmp_path / "lora.pt", shipped.lora.rank, shipped.lora.targets)
    world = recipe.setup(load_config(path, _tiny_overrides(shipped, tmp_path / "run",
                                                           f"lora.init={tmp_path / 'lora.pt'}")))
    try:
        metrics = recipe.run_epoch(world)
        assert world.step == 1
        assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("loss/loss", "reward/total"))
        theta = world.policy.adapter_params("default")
        assert any(not torch.equal(theta[k], warm[k]) for k in warm), "the step left θ at the warm start"
    finally:
        recipe.teardown(world)
