import pytest
import yaml

from astrolabe_rl.config import CRITICAL_KEYS, Config, dump_yaml, load_config, to_dict
from astrolabe_rl.train.checkpoint import config_hash

BASE = ["data.prompts=[a red ball]", "rewards.components=[{name: sharpness, weight: 1.0}]"]


def test_defaults_follow_the_release():
    cfg = load_config(None, BASE)
    t = cfg.train
    assert (t.lr, t.beta, t.kl_weight, t.adv_clip, t.grad_clip, t.ema_decay, t.old_decay) == (
        1e-5, 0.1, 1e-4, 5.0, 1.0, 0.9, 1)
    assert (cfg.lora.rank, cfg.lora.alpha, len(cfg.lora.targets)) == (256, 256.0, 10)
    assert (t.loss_form, t.sigmas, t.context, cfg.rewards.combine) == ("release", "release_grid", "noisy", "raw")


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 3.0e-4, beta: 0.5}\nrollout: {candidates: 4}\n")
    cfg = load_config(path, [*BASE, "train.lr=1e-5", "lora.targets=[ffn.0]"])
    assert cfg.train.lr == 1e-5 and cfg.train.beta == 0.5 and cfg.rollout.candidates == 4
    assert cfg.lora.targets == ["ffn.0"]


@pytest.mark.parametrize("override, match", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("trian.lr=1", "did you mean 'train'"),
    ("train.lr=abc", "train.lr"),
    ("train.sigmas=warped", "release_grid"),
    ("train.loss_form=grpo", "diffusionnft"),
    ("rollout.candidates=1", "compares videos of the same prompt"),
    ("train.beta=2", r"\[0, 1\]"),
    ("model.family=selfforcing", "did you mean 'self_forcing'"),
    ("model.family=longlive", "needs model.checkpoint"),
    ("rewards.components=[{name: x, wieght: 1}]", "did you mean 'rewards.components\\[0\\].weight'"),
    ("train.lr", "section.key=value"),
])
def test_bad_values_fail_with_a_clear_message(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [*BASE, override])


def test_missing_prompts_and_rewards_are_explained():
    with pytest.raises(ValueError, match="no training prompts"):
        load_config(None, ["rewards.components=[{name: sharpness}]"])
    with pytest.raises(ValueError, match="rewards.components is empty"):
        load_config(None, ["data.prompts=[a]"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config("nope.yaml")


def test_dump_yaml_documents_every_field_and_round_trips(tmp_path):
    cfg = load_config(None, [*BASE, "train.lr=1e-6"])
    text = dump_yaml(cfg)
    assert "# AdamW learning rate" in text and "# LoRA rank r" in text
    assert yaml.safe_load(text) == to_dict(cfg)
    (tmp_path / "again.yaml").write_text(text)
    assert to_dict(load_config(tmp_path / "again.yaml")) == to_dict(cfg)


def test_config_hash_tracks_run_altering_values_only():
    def h(*extra):
        return config_hash(to_dict(load_config(None, [*BASE, *extra])), CRITICAL_KEYS)

    assert h() == h("log.tensorboard=false")
    assert h() != h("train.sigmas=uniform")


def test_every_field_has_a_doc():
    import dataclasses

    def walk(obj):
        for f in dataclasses.fields(obj):
            assert f.metadata.get("doc"), f"{type(obj).__name__}.{f.name} has no doc"
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                walk(getattr(obj, f.name))

    walk(Config())
