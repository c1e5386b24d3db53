"""mp4 round trips keep colours, frame counts and fps; bad inputs fail with errors that say what to change."""

import pytest
import torch

from astrolabe_rl.video import caption_frames, read_mp4, to_uint8, write_mp4

T, H, W = 9, 32, 48


def _solid(rgb: list[float], t: int = T, h: int = H, w: int = W) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(t, 3, h, w).clone()


def _gradient(t: int = T, h: int = H, w: int = W) -> torch.Tensor:
    """Red ramps left to right, green top to bottom, blue is their product: every level of the range occurs."""
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    return torch.stack([x, y, x * y]).unsqueeze(0).repeat(t, 1, 1, 1)


@pytest.mark.parametrize(
    "rgb", [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5], [0.2, 0.7, 0.9]]
)
def test_solid_colour_round_trip(tmp_path, rgb):
    frames = _solid(rgb)
    out, fps = read_mp4(write_mp4(tmp_path / "solid.mp4", frames, fps=16))
    assert out.shape == frames.shape and fps == 16.0
    # a double rescale or a channel swap moves a mean by far more than a quantisation level or two
    assert (out.mean(dim=(0, 2, 3)) - torch.tensor(rgb, dtype=torch.float32)).abs().max() < 0.02
    assert (out - frames).abs().max() < 0.03


def test_gradient_round_trip_and_fps(tmp_path):
    frames = _gradient()
    out, fps = read_mp4(write_mp4(tmp_path / "sub" / "gradient.mp4", frames, fps=8))
    assert out.shape == frames.shape and fps == 8.0
    assert (out.mean(dim=(0, 2, 3)) - frames.mean(dim=(0, 2, 3))).abs().max() < 0.01
    assert (out - frames).abs().mean() < 0.02  # per-pixel: chroma subsampling blurs colour edges a little


def test_frames_keep_their_order(tmp_path):
    """A brightness ramp over time: decoding must return frames in order, none dropped or repeated."""
    frames = torch.linspace(0, 1, 12).view(12, 1, 1, 1).expand(12, 3, 16, 16).clone()
    out, _ = read_mp4(write_mp4(tmp_path / "ramp.mp4", frames))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), frames.mean(dim=(1, 2, 3)), atol=0.01, rtol=0)


def test_odd_sizes_are_padded_to_even_by_repeating_the_edge(tmp_path):
    frames = _gradient(t=3, h=31, w=47)
    out, _ = read_mp4(write_mp4(tmp_path / "odd.mp4", frames))
    assert out.shape == (3, 3, 32, 48)
    assert (out[:, :, :31, :47] - frames).abs().mean() < 0.02
    # the padding repeats the last row/column rather than adding a black border
    assert (out[:, :, 31, :47] - frames[:, :, 30, :]).abs().mean() < 0.03
    assert (out[:, :, :31, 47] - frames[:, :, :, 46]).abs().mean() < 0.03


def test_quantisation_happens_once_with_rounding():
    frames = torch.tensor([0.0, 0.5, 0.998, 1.0, -0.1, 1.2]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    pixels = to_uint8(frames)
    assert pixels.shape == (1, 1, 6, 3) and pixels.dtype == torch.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 128, 254, 255, 0, 255]


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        (torch.rand(2, 3, 8, 8, dtype=torch.float64).mul(255).to(torch.uint8), TypeError, "frames.float"),
        (torch.rand(2, 3, 8, 8) * 255, ValueError, r"divide \[0, 255\]"),
        (torch.rand(2, 3, 8, 8) * 2 - 1.0 - 0.6 * torch.ones(2, 3, 8, 8), ValueError, r"\(x \+ 1\) / 2"),
        (torch.rand(1, 2, 3, 8, 8), ValueError, r"videos\[i\]"),
        (torch.rand(2, 8, 8, 3), ValueError, r"\[T, 3, H, W\]"),
        (torch.rand(0, 3, 8, 8), ValueError, "non-empty"),
        (torch.full((2, 3, 8, 8), float("nan")), ValueError, "NaN"),
    ],
)
def test_bad_frames_raise_clear_errors(tmp_path, frames, error, match):
    with pytest.raises(error, match=match):
        write_mp4(tmp_path / "bad.mp4", frames)
    assert not (tmp_path / "bad.mp4").exists()


def test_bad_arguments_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "a.mp4", _solid([0, 0, 0], t=2), fps=0)
    with pytest.raises(ValueError, match="crf"):
        write_mp4(tmp_path / "a.mp4", _solid([0, 0, 0], t=2), crf=60)
    with pytest.raises(FileNotFoundError, match="no video file"):
        read_mp4(tmp_path / "missing.mp4")


def test_caption_sits_on_a_band_above_the_untouched_frame():
    frames = _solid([0.2, 0.6, 0.9], t=2, h=64, w=96)
    captioned = caption_frames(frames, ["hpsv3: 7.125", "flow: 0.310"])
    band = captioned.shape[2] - 64
    assert captioned.shape[:2] == (2, 3) and captioned.shape[3] == 96 and 10 < band < 40
    assert torch.equal(captioned[:, :, band:], frames)  # every pixel of the frame is kept, none is covered
    assert captioned[:, :, :band].max() > 0.95 and captioned[:, :, :band].min() == 0  # white glyphs on black
    assert torch.equal(captioned[0], captioned[1])  # the same caption on every frame
    assert torch.equal(caption_frames(frames, []), frames)
    assert torch.equal(frames, _solid([0.2, 0.6, 0.9], t=2, h=64, w=96))  # the input is not modified


def test_caption_of_a_small_frame_widens_the_canvas_instead_of_clipping():
    frames = _solid([0.5, 0.5, 0.5], t=1, h=32, w=32)
    lines = ["toy_quality: 0.1234", "another", "and another"]
    captioned = caption_frames(frames, lines)
    band = captioned.shape[2] - 32
    assert band >= 3 * 10 and captioned.shape[3] > 32  # three lines fit, and the longest line's width
    assert torch.equal(captioned[:, :, band:, :32], frames)
    assert captioned[:, :, band:, 32:].abs().max() == 0  # black beside the narrower frame
    assert captioned[:, :, :band, 32:].max() > 0.95  # the text runs past the frame's width
    assert caption_frames(frames, ["x" * 500], max_width=100).shape[3] == 100
    tiny = caption_frames(frames[:, :, :1, :1], ["x"])
    assert tiny.shape[2] > 1 and torch.equal(tiny[:, :, -1:, :1], frames[:, :, :1, :1])
