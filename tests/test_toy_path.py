"""The toy path end to end, as a new user runs it: a tiny quick demo, then generate, evaluate and merge-lora on the
adapter it leaves (issue 15, item 5), all through ``astrolabe_rl.cli.main`` in this process; and the demo's outputs a
person reads (item 8)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from astrolabe_rl import cli
from astrolabe_rl.toy import world
from astrolabe_rl.toy.model import WEIGHTS
from astrolabe_rl.train.dist import shutdown

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="the toy weights are not built")

PROMPTS = world.eval_prompts(2)


@pytest.fixture(autouse=True)
def _single_process():
    yield
    shutdown()


def _tiny_demo(out, epochs: int = 2) -> dict:
    from astrolabe_rl.toy.demo import run_demo

    return run_demo(out, quick=True, epochs=epochs, progress=False, test_prompts=2, eval_seeds=2, overrides=[
        "rollout.prompts_per_epoch=2", "rollout.candidates=2", "rollout.num_frames=6", "eval.every=0",
        "log.plots=false",
        f"data.eval_inline={json.dumps(PROMPTS)}",
    ])


def _png(path) -> tuple[int, int]:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        return image.size


def test_demo_then_generate_evaluate_and_merge_its_adapter(tmp_path):
    from astrolabe_rl.policy import read_lora_file

    out = tmp_path / "demo"
    summary = _tiny_demo(out)
    adapter = out / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())  # peft format
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    lora = read_lora_file(adapter)
    assert lora and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained, not the zero init
    # the outputs a person reads: one labelled grid per noise seed (rows: prompts; columns: base / after / renders)
    seeds = summary["test_split"]["seeds"]
    grids = sorted(out.glob("grid-seed*.png"))
    assert [p.name for p in grids] == [f"grid-seed{s}.png" for s in seeds]
    width, height = _png(grids[0])
    assert width > 3 * 4 * 64 and height > 2 * 64  # three columns of four 64-px frames, two prompt rows
    assert _png(out / "curves.png")[0] > 1000

    videos = tmp_path / "videos"
    assert cli.main(["generate", "--quiet", "--model", "toy", "--adapter", str(out / "run"), "--prompts",
                     _prompt_file(tmp_path), "--num-videos", "2", "--out", str(videos)]) == 0
    assert len(list(videos.glob("*.mp4"))) == 2 * len(PROMPTS)
    scores = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--quiet", "--videos", str(videos), "--rewards", "toy_quality,toy_text",
                     "--out", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert sorted({v["prompt"] for v in result["videos"]}) == sorted(PROMPTS)  # generate -> evaluate round trip
    assert all(v["status"] == "ok" and all(s is not None for s in v["scores"].values()) for v in result["videos"])

    merged = tmp_path / "merged.safetensors"
    assert cli.main(["merge-lora", "--model", "toy", "--adapter", str(adapter), "--dtype", "float32",
                     "--out", str(merged)]) == 0
    base = load_file(WEIGHTS) if WEIGHTS.suffix == ".safetensors" else None
    weights = load_file(merged)
    assert not any("lora" in k for k in weights)
    if base is not None:
        changed = [k for k in weights if k in base and not torch.equal(weights[k].float(), base[k].float())]
        assert changed and all("blocks." in k for k in changed)  # the adapter's layers moved, nothing else


def _prompt_file(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def test_rerunning_the_demo_moves_its_previous_run_aside(tmp_path):
    from astrolabe_rl.toy.demo import demo_config
    from astrolabe_rl.train.checkpoint import claim_run_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')  # what the previous `astrolabe demo` left
    cfg = demo_config(tmp_path, "quick")
    assert cfg.run_dir == str(tmp_path / "run") and cfg.checkpoint.overwrite and cfg.checkpoint.resume is None
    claim_run_dir(cfg.run_dir, resume=cfg.checkpoint.resume, overwrite=cfg.checkpoint.overwrite).release()
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "metrics.jsonl").is_file() and not (tmp_path / "run" / "metrics.jsonl").exists()
