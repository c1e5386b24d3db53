"""Video files: mp4 in and out, and reward captions on a band above the frames.

Frames everywhere in the project are float tensors ``[T, 3, H, W]`` in ``[0, 1]`` (T frames, RGB). This module is
the one place that turns them into bytes, and it quantises exactly once: ``round(clamp(x, 0, 1) · 255)``. Passing
uint8 frames, or floats already scaled to ``[0, 255]``, is refused rather than rescaled a second time (the colour
inversion of verl-omni PR #311).

Encoding is H.264 (libx264) in yuv420p, which every browser and wandb plays. yuv420p needs even sizes, so an odd
height or width is padded by one row/column that repeats the last one; ``read_mp4`` returns the padded size.
The stream is tagged BT.601 (the matrix swscale uses to convert RGB), so players do not guess BT.709 for large
frames and shift the colours.

PyAV and Pillow are imported inside the functions that need them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Floats above this (or below the negative bound) are not a [0, 1] video with a little overshoot but a video in
# another range ([0, 255] or [-1, 1]); clamping them would silently wash the video out.
_RANGE_SLACK = 0.5

# BT.601 tags, matching the RGB <-> YUV matrix swscale applies by default on both encode and decode.
_X264_COLOUR_TAGS = "colorprim=smpte170m:transfer=smpte170m:colormatrix=smpte170m"


def check_frames(frames: Tensor) -> None:
    """Raise a ValueError/TypeError saying what to change unless ``frames`` is float ``[T, 3, H, W]`` in ~[0, 1]."""
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames must be a torch.Tensor [T, 3, H, W]; got {type(frames).__name__}")
    if frames.dim() != 4 or frames.shape[1] != 3:
        hint = " (one video of a batch [B, T, 3, H, W]: pass videos[i])" if frames.dim() == 5 else ""
        raise ValueError(f"frames must be [T, 3, H, W] RGB; got shape {tuple(frames.shape)}{hint}")
    if frames.shape[0] == 0 or frames.shape[2] == 0 or frames.shape[3] == 0:
        raise ValueError(f"frames must be non-empty; got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise TypeError(f"frames must be float in [0, 1]; got {frames.dtype} (for uint8 pass frames.float() / 255)")
    if not torch.isfinite(frames).all():
        raise ValueError("frames contain NaN or inf; check the VAE decode")
    lo, hi = frames.min().item(), frames.max().item()
    if hi > 1 + _RANGE_SLACK or lo < -_RANGE_SLACK:
        raise ValueError(
            f"frames must be in [0, 1]; got values in [{lo:.3g}, {hi:.3g}] "
            "(divide [0, 255] frames by 255; map [-1, 1] frames with (x + 1) / 2)"
        )


def to_uint8(frames: Tensor) -> Tensor:
    """The single quantisation step: float ``[T, 3, H, W]`` in [0, 1] -> uint8 ``[T, H, W, 3]`` (channels last).

    Values are clamped to [0, 1] (decoders overshoot slightly) and rounded to the nearest of 256 levels.
    """
    check_frames(frames)
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _pad_to_even(frames: Tensor) -> Tensor:
    """``[T, 3, H, W]`` -> ``[T, 3, H + H % 2, W + W % 2]``, repeating the last row/column."""
    pad_h, pad_w = frames.shape[2] % 2, frames.shape[3] % 2
    if not (pad_h or pad_w):
        return frames
    return F.pad(frames, (0, pad_w, 0, pad_h), mode="replicate")


def write_mp4(path: str | Path, frames: Tensor, fps: int = 16, crf: int = 18) -> Path:
    """Encode ``frames`` ``[T, 3, H, W]`` float in [0, 1] as an H.264 mp4 at ``fps`` frames per second.

    Args:
        path: output file; parent folders are created.
        frames: the video; odd H or W is padded to even (see the module docstring).
        fps: playback rate in frames per second (16 for Wan2.1 models).
        crf: x264 constant rate factor, 0 (lossless luma) to 51; 18 is visually lossless.
    Returns:
        The path written.
    """
    import av

    if fps <= 0:
        raise ValueError(f"fps must be a positive integer; got {fps}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51] (lower = better quality); got {crf}")
    check_frames(frames)
    pixels = to_uint8(_pad_to_even(frames.detach().cpu())).numpy()  # [T, H, W, 3]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(
            "libx264", rate=Fraction(fps), options={"crf": str(crf), "x264-params": _X264_COLOUR_TAGS}
        )
        stream.height, stream.width = pixels.shape[1], pixels.shape[2]
        stream.pix_fmt = "yuv420p"
        for image in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))  # flush the frames the encoder still holds (B-frame lookahead)
    return path


FLOAT_BYTES = 4  # frames are float32 once decoded: what a decoded video costs is 4 bytes per RGB value


def decoded_bytes(frames: int, height: int, width: int) -> int:
    """The memory ``frames`` decoded frames of ``height × width`` take: float32 ``[T, 3, H, W]``, 12 bytes a pixel.
    Every decode budget counts this (not the 3 bytes a pixel of the 8-bit file), because this is what is held."""
    return frames * 3 * height * width * FLOAT_BYTES


def read_mp4(path: str | Path, max_frames: int | None = None,
             max_bytes: int | None = None) -> tuple[Tensor, float]:
    """Decode the first video stream of ``path`` into float ``[T, 3, H, W]`` in [0, 1] and its fps.

    Memory is what the result takes and one frame more: the frame count is read first (the header, or the stream's
    packets when the header does not say), the float frames are allocated once and each frame decodes into its
    place. ``max_frames`` keeps the first frames only (decoding stops there); a video over ``max_bytes`` (counted as
    `decoded_bytes`) is refused with a ValueError before anything is decoded.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no video file at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is a folder, not a video file")
    header = probe_mp4(path, count=True)
    if header.frames == 0:
        raise ValueError(f"{path} holds no decodable frames")
    frames = min(header.frames, max_frames or header.frames)
    check_budget(frames, header.height, header.width, max_bytes)
    out = torch.empty(frames, 3, header.height, header.width)
    decode_into(path, out, more="stop" if frames < header.frames else "error")
    return out, header.fps


def check_budget(frames: int, height: int, width: int, max_bytes: int | None, limit: str = "the decode budget") -> None:
    """Raise a ValueError when ``frames`` frames of ``height × width`` take more than ``max_bytes`` once decoded."""
    need = decoded_bytes(frames, height, width)
    if max_bytes is not None and need > max_bytes:
        raise ValueError(f"{frames} frames of {height}×{width} take {need / 2**20:,.1f} MiB decoded (float32), over "
                         f"{limit} of {max_bytes / 2**20:,.1f} MiB")


@dataclass(frozen=True)
class Mp4Header:
    """What an mp4's container header says about its first video stream, before any frame is decoded."""

    frames: int  # sample count of the stream's index (0 when the header does not say, e.g. a fragmented mp4)
    height: int
    width: int
    fps: float  # NaN when unknown


def probe_mp4(source: str | Path | bytes, count: bool = False) -> Mp4Header:
    """Read the frame count and frame size of the first video stream of an mp4 (a path or the file's bytes) from
    its container header, without decoding the stream (at most the few frames FFmpeg's stream probe looks at).
    ``count``: when the header gives no frame count, count the stream's packets (demuxed, not decoded)."""
    import av

    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with av.open(src) as container:
            if not container.streams.video:
                raise ValueError("the mp4 has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = int(stream.frames or 0)
            if count and frames == 0:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            return Mp4Header(frames, int(stream.codec_context.height or 0), int(stream.codec_context.width or 0),
                             float(rate) if rate else float("nan"))
    except av.FFmpegError as e:
        raise ValueError(f"not a readable mp4: {e}") from None


def read_mp4_bounded(source: str | Path | bytes, frames: int, height: int, width: int,
                     out: Tensor | None = None) -> Tensor:
    """Decode an mp4 expected to hold exactly ``frames`` frames of ``height × width`` into float ``[T, 3, H, W]``
    (into ``out`` when given, e.g. a slot of a batch, which it returns).

    Untrusted input costs at most what it claims: the container header is checked first (`probe_mp4`), and
    decoding stops at the first frame past the count or of another size (a header can lie about its stream), so
    at most the ``frames × height × width`` float frames are held (plus the frame in flight in the decoder),
    whatever the file decodes to. Raises ValueError saying which expectation failed.
    """
    if min(frames, height, width) < 1:
        raise ValueError(f"expected a positive frame count and size; got {frames} frames of {height}×{width}")
    header = probe_mp4(source)
    if header.frames == 0:
        raise ValueError("the mp4 header gives no frame count (a fragmented or streamed mp4?); send a plain mp4")
    if (header.frames, header.height, header.width) != (frames, height, width):
        raise ValueError(f"the mp4 header says {header.frames} frames of {header.height}×{header.width}; "
                         f"{frames} frames of {height}×{width} expected")
    out = torch.empty(frames, 3, height, width) if out is None else out
    decode_into(source, out)
    return out


def decode_into(source: str | Path | bytes, out: Tensor, more: str = "error") -> None:
    """Decode the first video stream of an mp4 into ``out`` (float32 ``[T, 3, H, W]``, contiguous, on the CPU) in
    [0, 1], frame by frame: nothing but ``out`` and the frame being converted is held.

    A frame of another size than ``out``'s raises ValueError; so do fewer frames than ``T``, and, with
    ``more="error"``, more (``more="stop"`` keeps the first ``T``).
    """
    import av

    frames, _, height, width = out.shape
    target = out.numpy()  # numpy writes each frame into the tensor's memory, casting 8-bit values chunk by chunk
    count = 0
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with av.open(src) as container:
            for frame in container.decode(container.streams.video[0]):
                if count == frames:
                    if more == "stop":
                        break
                    raise ValueError(f"the mp4 decodes to more than the {frames} frames its header says")
                if (frame.height, frame.width) != (height, width):
                    raise ValueError(f"frame {count} of the mp4 is {frame.height}×{frame.width}, not the "
                                     f"{height}×{width} its header says")
                np.copyto(target[count], frame.to_ndarray(format="rgb24").transpose(2, 0, 1), casting="unsafe")
                out[count].div_(255)
                count += 1
    except av.FFmpegError as e:
        raise ValueError(f"the mp4 does not decode: {e}") from None
    if count != frames:
        raise ValueError(f"the mp4 decodes to {count} frames; its header says {frames}")


def rgb24_into(data: bytes | bytearray, out: Tensor) -> None:
    """Raw ``[T, H, W, 3]`` 8-bit RGB bytes (exactly ``out``'s frames) into ``out`` (float32 ``[T, 3, H, W]``) in
    [0, 1], without a second copy of the video."""
    frames, _, height, width = out.shape
    if len(data) != frames * height * width * 3:
        raise ValueError(f"rgb24 data has {len(data)} bytes; {frames}×{height}×{width}×3 = "
                         f"{frames * height * width * 3} expected")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(frames, height, width, 3)
    np.copyto(out.numpy(), pixels.transpose(0, 3, 1, 2), casting="unsafe")
    out.div_(255)


def caption_frames(frames: Tensor, lines: list[str], max_width: int = 640) -> Tensor:
    """Put ``lines`` of white text on a black band above every frame; the frame itself is left untouched.

    Args:
        frames: ``[T, 3, H, W]`` float in [0, 1].
        lines: text lines, e.g. ``["hpsv3: 7.125", "flow: 0.310"]`` (about 14 px per line).
        max_width: the widest the canvas grows for text wider than the frame (longer lines are clipped).
    Returns:
        ``[T, 3, h + H, W']``: the band (h rows, enough for every line) on top, the frame below it at the left,
        ``W' = max(W, min(text width, max_width))`` with black to the right of a narrower frame. ``lines=[]``
        returns a copy of ``frames``.
    """
    check_frames(frames)
    if not lines:
        return frames.detach().clone()
    t, c, h, w = frames.shape
    text = _render_text(lines, min_width=w, max_width=max(w, max_width))  # [h_text, W'] in [0, 1]
    out = torch.zeros(t, c, text.shape[0] + h, text.shape[1], dtype=frames.dtype, device=frames.device)
    out[:, :, : text.shape[0]] = text.to(out)
    out[:, :, text.shape[0] :, :w] = frames.detach()
    return out


def _render_text(lines: list[str], min_width: int, max_width: int) -> Tensor:
    """Rasterise ``lines`` with Pillow's built-in font: a ``[h, width]`` float mask, ``min_width ≤ width ≤
    max_width`` (as wide as the longest line needs)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2  # glyph height plus 2 px of leading
    needed = 4 + max(int(font.getlength(line)) for line in lines)
    width = min(max_width, max(min_width, needed))
    height = 2 + line_height * len(lines)
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((2, 1 + i * line_height), line, fill=255, font=font)
    mask = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width)
    return mask.float() / 255
