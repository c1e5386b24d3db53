"""``astrolabe evaluate`` on a folder of tiny generated videos and on a tiny model's own generations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from astrolabe_rl import evaluate
from astrolabe_rl.video import write_mp4

TINY = json.dumps({"clipscore": {"tiny": True}, "flow": {"backend": "lk", "size": 32, "frames": 5}})


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    evaluate.add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["evaluate", *argv])
    return args.func(args)


@pytest.fixture
def folder(tmp_path):
    """Two prompts × two videos named the VBench way, plus one file that is not."""
    g = torch.Generator().manual_seed(0)
    for name in ("a red ball-0", "a red ball-1", "a cat on a mat-0", "a cat on a mat-1", "free_name"):
        write_mp4(tmp_path / "videos" / f"{name}.mp4", torch.rand(6, 3, 32, 48, generator=g), fps=8)
    return tmp_path / "videos"


def test_folder_names_parse_the_vbench_way(folder):
    found = {v.path.name: (v.prompt, v.index) for v in evaluate.find_videos(folder)}
    assert found["a red ball-1.mp4"] == ("a red ball", 1)
    assert found["a cat on a mat-0.mp4"] == ("a cat on a mat", 0)
    assert found["free_name.mp4"] == (None, None)  # never silently read as a prompt
    assert evaluate.find_videos(folder, prompt_from_name=True)[-1].prompt == "free_name"
    with pytest.raises(ValueError, match="no .mp4 files"):
        evaluate.find_videos(folder.parent)
    with pytest.raises(ValueError, match="is not a folder"):
        evaluate.find_videos(folder / "missing")


def test_one_bad_file_loses_only_itself(folder, tmp_path, capsys):
    (folder / "a broken video-0.mp4").write_bytes(b"not an mp4 at all")
    out = tmp_path / "eval.json"
    code = run(["--videos", str(folder), "--rewards", "clipscore,flow", "--reward-kwargs", TINY, "--out", str(out),
                "--quiet"])
    assert code == 1  # something was not scored
    status = {v["file"]: v["status"] for v in json.loads(out.read_text())["videos"]}
    assert status["a broken video-0.mp4"].startswith("unreadable")
    assert status["free_name.mp4"].startswith("skipped: no prompt")
    assert sum(s == "ok" for s in status.values()) == 4
    assert "not scored" in capsys.readouterr().out


def test_batches_hold_at_most_batch_size_videos(folder, monkeypatch):
    import astrolabe_rl.video as video

    reads = []
    real = video.decode_into
    monkeypatch.setattr(video, "decode_into", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    videos = evaluate.find_videos(folder)
    held = []
    for idx, frames in evaluate._read_batches(videos, [0, 1, 2, 3], 2, None):
        held.append((len(reads), len(idx)))
    assert held == [(2, 2), (4, 2)]  # each batch is scored as soon as it is read, not after the whole folder


def test_evaluate_a_folder(folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = run(["--videos", str(folder), "--rewards", "clipscore,flow", "--reward-kwargs", TINY,
                "--out", str(out), "--batch-size", "2", "--prompt-from-name"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["rewards"] == ["clipscore", "flow"]
    assert {v["file"] for v in result["videos"]} == {p.name for p in folder.glob("*.mp4")}
    for name in ("clipscore", "flow"):
        assert result["summary"][name]["n"] == 5 and result["summary"][name]["failed"] == 0
        scores = [v["scores"][name] for v in result["videos"]]
        assert result["summary"][name]["mean"] == pytest.approx(sum(scores) / 5, rel=1e-5)
    ball = [v["scores"]["clipscore"] for v in result["videos"] if v["prompt"] == "a red ball"]
    assert result["per_prompt"]["a red ball"]["clipscore"] == pytest.approx(sum(ball) / 2, rel=1e-5)
    table = capsys.readouterr().out
    assert "clipscore" in table and "flow" in table and "5 videos" in table


def test_evaluate_a_tiny_models_generations(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue square\n")
    saved, out = tmp_path / "generated", tmp_path / "gen.json"
    code = run(["--prompts", str(prompts), "--model", "tiny", "--num-videos", "2", "--frames", "5", "--gen-batch", "4",
                "--rewards", "clipscore", "--reward-kwargs", json.dumps({"clipscore": {"tiny": True}}),
                "--out", str(out), "--save-videos", str(saved)])
    assert code == 0
    names = sorted(p.name for p in saved.glob("*.mp4"))
    assert names == ["a blue square-0.mp4", "a blue square-1.mp4", "a red ball-0.mp4", "a red ball-1.mp4"]
    assert json.loads((saved / "videos.json").read_text())["a red ball-1.mp4"]["prompt"] == "a red ball"
    result = json.loads(out.read_text())
    assert result["source"].startswith("tiny") and result["summary"]["clipscore"]["n"] == 4


def test_unknown_reward_is_a_clear_error(folder, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'clipscor'.*clipscore"):
        run(["--videos", str(folder), "--rewards", "clipscor", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="not among the rewards"):
        run(["--videos", str(folder), "--rewards", "clipscore", "--reward-kwargs", TINY,
             "--out", str(tmp_path / "x.json")])


def test_generate_then_evaluate_round_trips_a_long_prompt(tmp_path):
    """File names cut a long prompt; the sidecar keeps it whole, and evaluate reads it back."""
    from astrolabe_rl.generate import GenerateOptions, generate

    long = "a red ball " * 40
    written = generate(GenerateOptions(model="tiny", prompt=long.strip(), num_videos=2, frames=5,
                                       out=str(tmp_path / "v"), quiet=True))["videos"]
    assert all(len(Path(w).name) < 120 for w in written)
    found = evaluate.find_videos(tmp_path / "v")
    assert [(v.prompt, v.index) for v in found] == [(long.strip(), 0), (long.strip(), 1)]


def test_a_broken_videos_json_costs_only_what_it_broke(folder, tmp_path, capsys):
    """A string entry, an entry of the wrong kind, a truncated file: one line each, and the rest is scored."""
    cut = "a very long prompt " * 6
    (folder / f"{cut[:80].rstrip()}~0123abcd-0.mp4").write_bytes((folder / "a red ball-0.mp4").read_bytes())
    (folder / "videos.json").write_text(json.dumps({"free_name.mp4": "a bare prompt string",
                                                     "a red ball-1.mp4": ["not", "an", "entry"]}))
    found = {v.path.name: v for v in evaluate.find_videos(folder)}
    assert found["free_name.mp4"].prompt == "a bare prompt string"
    assert found["a red ball-1.mp4"].prompt is None and "entry must be" in found["a red ball-1.mp4"].status
    assert found["a red ball-0.mp4"].prompt == "a red ball"
    assert found[f"{cut[:80].rstrip()}~0123abcd-0.mp4"].status.startswith("skipped: the name cuts a long prompt")

    (folder / "videos.json").write_text('{"a red ball-0.mp4": {"prompt": "a red b')  # cut off by a crash
    capsys.readouterr()
    out = tmp_path / "eval.json"
    code = run(["--videos", str(folder), "--rewards", "sharpness", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert f"warning: {folder / 'videos.json'} is not valid JSON" in err and "Traceback" not in err
    result = json.loads(out.read_text())
    assert code == 1 and result["summary"]["sharpness"]["n"] == 4  # the four VBench names; free_name has no prompt
