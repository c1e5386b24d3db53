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


# ------------------------------------------------------------------------------------------------ issue 15, item 6


@pytest.mark.parametrize("text, line, column", [
    ("train:\n  lr: 1e-5\n   beta: 0.2\n", 3, 8),       # a key indented under a scalar
    ("train: {lr: 1e-5\nrollout: {}\n", 2, 8),           # an unclosed flow mapping
    ("rewards:\n  components: [\n", 3, 1),               # an unclosed list at the end of the file
])
def test_malformed_yaml_is_one_line_with_file_line_and_column(tmp_path, text, line, column):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(path, BASE)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}:{column}: malformed YAML: ") and "\n" not in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained YAML traceback


def test_malformed_yaml_reaches_the_cli_as_one_line(tmp_path, capsys):
    from astrolabe_rl.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text("train: {lr: 1e-5\n")
    assert main(["print-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2:1: malformed YAML") and len(err.splitlines()) == 1, err


def test_a_binary_config_file_is_named(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=f"config file {path} is not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr=inf"),
    ("train.lr=-.inf", "train.lr=-inf"),
    ("train.kl_weight=.nan", "train.kl_weight=nan"),
    ("train.adam_betas=[0.9, .nan]", r"train.adam_betas\[1\]=nan"),
    ("rewards.components=[{name: sharpness, weight: .inf}]", r"rewards.components\[0\].weight=inf"),
])
def test_non_finite_numbers_are_rejected(override, key):
    with pytest.raises(ValueError, match=f"{key} is not a finite number"):
        load_config(None, [*BASE, override])


def test_empty_eval_seeds_are_rejected_only_when_evaluation_is_on():
    load_config(None, [*BASE, "eval.seeds=[]"])  # no held-out prompts: nothing to evaluate, nothing to seed
    for prompts in ("data.eval_inline=[a blue cube]", "data.eval_prompts=held_out.txt"):
        with pytest.raises(ValueError, match="eval.seeds is empty but evaluation is on"):
            load_config(None, [*BASE, prompts, "eval.seeds=[]"])


@pytest.mark.parametrize("override, match", [
    ("eval.every=-1", "eval.every must be >= 0"),
    ("checkpoint.every=-5", "checkpoint.every must be >= 0"),
    ("eval.videos=-1", "eval.videos must be >= 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
    ("train.adam_eps=0", "train.adam_eps must be > 0"),
    ("train.adam_betas=[0.9, 1.0]", r"two numbers in \[0, 1\)"),
    ("lora.dropout=1.0", r"lora.dropout must lie in \[0, 1\)"),
    ("rewards.max_failed_frac=1.5", r"rewards.max_failed_frac must lie in \[0, 1\]"),
    ("rewards.max_failed_frac=-0.1", r"rewards.max_failed_frac must lie in \[0, 1\]"),
])
def test_negative_periods_and_out_of_range_values_are_rejected(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [*BASE, override])


def test_zero_periods_and_the_failure_limit_bounds_are_accepted():
    cfg = load_config(None, [*BASE, "eval.every=0", "checkpoint.every=0", "rewards.max_failed_frac=1"])
    assert (cfg.eval.every, cfg.checkpoint.every, cfg.rewards.max_failed_frac) == (0, 0, 1.0)
    assert load_config(None, BASE).rewards.max_failed_frac == 0.5


@pytest.mark.parametrize("key, meant", [
    ("train.learning_rate", "train.lr"),        # initials, and the words in lr's doc
    ("train.num_epochs", "train.epochs"),       # the key's last word
    ("checkpoint.save_every", "checkpoint.every"),
    ("rollout.num_candidates", "rollout.candidates"),
    ("train.ema", "train.ema_decay"),           # a word of the field's name
])
def test_did_you_mean_matches_on_the_words_of_the_key(key, meant):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'; did you mean '{meant}'"):
        load_config(None, [*BASE, f"{key}=1"])


def test_an_unrelated_key_gets_no_guess():
    with pytest.raises(ValueError, match=r"unknown config key 'train.zzz' \(valid here"):
        load_config(None, [*BASE, "train.zzz=1"])


@pytest.mark.parametrize("data, match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
    (b"a red ball\n\xff\xfe broken\n", "is not UTF-8 text"),
])
def test_a_binary_or_undecodable_prompt_file_is_named(tmp_path, data, match):
    from astrolabe_rl.models.text import read_prompt_file

    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"prompt file {path} {match}"):
        read_prompt_file(path)
    path.write_text("a red ball\n\n  a blue cube  \n", encoding="utf-8")
    assert read_prompt_file(path) == ["a red ball", "a blue cube"]
