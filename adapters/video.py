"""Decode video clips and still images into uint8 RGB frames.

This is the first step of the data flow: a file (or an image or array already
in memory) becomes a `Clip` of frames `(T, H, W, 3)` for the vision encoder.

Sampling, for a video stream that starts at time 0 and lasts D seconds:
- `num_frames=T` with `sampling="centres"` (the default): the centres of T
  equal segments, t_i = (i + 0.5) * D / T. Centres rather than segment starts
  so that neither the first nor the last frame of a clip (often a fade or
  black) is favoured, and T=1 is the middle.
- `num_frames=T` with `sampling="ends"`: T times evenly spaced from the first
  frame to the last, t_i = i * (D - d) / (T - 1) for a frame duration d (the
  stream's rate); T=1 is the first frame. For clips whose first frame matters
  (the generated world orders its objects by where they are in frame 0) and
  whose motion should be seen end to end.
- `fps=f`: t_i = i / f for every t_i < D. If `num_frames` is also given and
  that is more than `num_frames` frames, the capped count is spread over the
  whole clip (by `sampling`, as above) rather than keeping only its start,
  so a caption still sees the whole clip.
- a span `start_s`/`end_s` (seconds from the start of the stream; a shot, or a manifest row's
  `start`/`end`) samples inside it by the same rules, as if the clip were [start_s, end_s): its
  duration is end_s - start_s and every t_i above is offset by start_s. Frames outside the span are
  neither sampled nor decoded (the reader seeks to start_s). An end_s past the clip's end stops at the
  end; a span that starts at or after the end is a ClipError. Still images ignore the span.
- the frame chosen for time t is the one on screen at t: the last frame whose
  timestamp is <= t (with 1 ms of slack for containers that round timestamps
  to milliseconds). Not "the first frame at or after t": with centre times
  on a clip shorter than T frames that rule never picks the first frame.
  For each t the reader seeks to the keyframe before t and decodes forward
  (one frame past t, to know that the previous one is on screen), so cost
  grows with the number of samples, not the length of the file. It skips a
  seek when no keyframe lies between the current position and t (decoding on
  is then cheaper), stops seeking when a seek jumps backwards (GIF goes back
  to its first frame), and redoes the clip in one sequential pass when a seek
  lands after its target or frames lack timestamps (broken indexes, raw
  H.264, truncated files).
- a clip with fewer frames than requested repeats frames, so T == num_frames
  always (in fps mode, T == the number of sample times); `timestamps` says
  which frame each one really is. `duration_s` is the video stream's
  duration (the container's when the stream does not say).

Still images (PNG, JPEG, BMP, WebP, ... and a video stream in an image
container) are one-frame clips with duration 0.0 whatever num_frames and fps
say. The content decides, not the name: a PNG saved as `.mp4` is decoded as
a one-frame clip, because the bytes are a valid image and refusing it would
lose a good item; a video saved as `.jpg` is decoded as a video.

Every problem with an input raises `ClipError` (a ValueError) naming the file
and what is wrong, so a dataset run can report the item and go on. Bad
arguments (num_frames=0, both num_frames and fps None) raise a plain
ValueError instead: they are the caller's bug, not a bad item.
"""

from __future__ import annotations

import math
import numbers
import os
import stat
import warnings
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# PyAV and Pillow are imported where a clip or an image is decoded: commands that never decode (qformer
# search) start without them.
if TYPE_CHECKING:
    from PIL import Image

# How num_frames frames are spread over a clip (see the module docstring).
SAMPLINGS = ("centres", "ends")

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".webm",
        ".mkv",
        ".avi",
        ".gif",
        ".mpg",
        ".mpeg",
        ".ts",
        ".mts",
        ".m2ts",
        ".flv",
        ".wmv",
        ".ogv",
        ".3gp",
        ".y4m",
        ".h264",
        ".hevc",
    }
)
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".tga",
    }
)

# Frames PyAV has decoded in this process. Tests read it to check that sampling
# a long clip seeks instead of decoding the whole file.
frames_decoded = 0

# Containers that FFmpeg probes as a single still image.
_IMAGE_FORMATS = ("image2", "_pipe")
# Timestamps within this much of a sample time count as at that time: Matroska
# and WebM store milliseconds, so 1/30 s comes back as 0.033.
_TIMESTAMP_SLACK_S = Fraction(1, 1000)
# When the container has no keyframe index, seek only for jumps longer than this.
_SEEK_MIN_GAP_S = 1
# A request for more output than this is refused before decoding rather than
# left to exhaust memory (an uncapped fps on an hour of video).
_MAX_OUTPUT_BYTES = 8 << 30
# Frames larger than this (width * height) are refused from the header: decoding one would take
# 120 MB at 40 Mpx, and a decompression bomb claims far more.
MAX_PIXELS = 40_000_000


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8, RGB
    timestamps: list[float]  # seconds of each frame from the start of the stream
    duration_s: float  # duration of the whole video (0.0 for a still image)
    path: str | None


class ClipError(ValueError):
    """A clip or image that cannot be read; the message names the file and the problem."""


class _NotAVideo(Exception):
    """PyAV found no video in the file; it may still be an image."""


class _NotAnImage(Exception):
    """Pillow does not recognise the file; it may still be a video."""


class _SeekUnreliable(Exception):
    """A seek landed after its target or nowhere; redo the clip in one sequential pass."""


def read_clip(
    path: str | os.PathLike,
    num_frames: int | None = 8,
    fps: float | None = None,
    max_pixels: int = MAX_PIXELS,
    max_side: int | None = None,
    max_duration_s: float | None = None,
    sampling: str = "centres",
    start_s: float = 0.0,
    end_s: float | None = None,
) -> Clip:
    """Decode `num_frames` frames (or one every 1/fps s) of a video, or an image as one frame.

    `sampling` spreads the frames at segment centres or from the first frame to the last (module docstring),
    within the span [start_s, end_s) (end_s None: the clip's end).

    Frames larger than `max_pixels` (width * height, read from the header
    before any pixel is decoded) are refused. `max_side` shrinks frames while
    decoding so their longer side is at most `max_side`, keeping the aspect ratio.
    A video longer than `max_duration_s` is refused before any frame is decoded:
    the duration comes from the header, or, when no header has one, from reading
    packets, which stops at the limit. Sample times come from that duration, so a
    header that understates the length never lets decoding run past the limit
    either: it stops one frame after the last sample time.
    """
    if num_frames is None and fps is None:
        raise ValueError("read_clip needs num_frames or fps (or both)")
    if num_frames is not None and (not isinstance(num_frames, numbers.Integral) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if fps is not None and not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if max_side is not None and max_side < 2:
        raise ValueError(f"max_side must be at least 2, got {max_side!r}")
    if max_duration_s is not None and not (isinstance(max_duration_s, numbers.Real) and max_duration_s > 0):
        raise ValueError(f"max_duration_s must be a positive number, got {max_duration_s!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if not (isinstance(start_s, numbers.Real) and math.isfinite(start_s) and start_s >= 0):
        raise ValueError(f"start_s must be a finite number >= 0, got {start_s!r}")
    if end_s is not None and not (isinstance(end_s, numbers.Real) and math.isfinite(end_s) and end_s > start_s):
        raise ValueError(f"end_s must be a finite number after start_s={start_s!r}, got {end_s!r}")

    path = os.fspath(path)
    _check_file(path)
    decoders = [
        partial(_read_video, path, num_frames, fps, max_pixels, max_side, max_duration_s, sampling, (start_s, end_s)),
        partial(_read_image, path, max_pixels, max_side),
    ]
    # The extension only decides which decoder tries first; the content decides.
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        decoders.reverse()
    reasons = []
    for decode in decoders:
        try:
            return decode()
        except _NotAVideo as e:
            reasons.append(str(e))
        except _NotAnImage:
            pass
    raise ClipError(f"{path}: not a decodable video or image (truncated, corrupt or another kind of file): {reasons[0]}")


def decode_side(vision) -> int | None:
    """The `max_side` to decode frames at for the vision encoder `vision`: twice its input side, so the
    decoder's cheap resize bounds memory (an 8K frame) while the short side of frames up to 2:1 keeps
    full detail for preprocess's final resize. None for an encoder that does not say its input size."""
    side = getattr(vision, "resolution", None) or getattr(vision, "image_size", None)
    return 2 * int(side) if side else None


def as_clip(item, num_frames: int | None = 8, fps: float | None = None, sampling: str = "centres", max_side: int | None = None) -> Clip:
    """Turn a path, a PIL image, a uint8 array (H, W, 3) or (T, H, W, 3), or a Clip into a Clip.

    Paths are sampled (num_frames, fps, sampling). Paths and PIL images are decoded at most max_side pixels
    on their long side (read_clip; decode_side(vision) gives every caller the pixels the recaptioner and
    training decode). Arrays are kept as they are. A (T, H, W, 3) array is sampled
    with the same rule as a constant-rate file of T frames, frame floor((i + 0.5) * T / n)
    for n = num_frames (sampling "ends": floor(i * (T - 1) / (n - 1))), so a clip
    rendered in memory and its video file give the same frames; with num_frames
    None it is kept whole. An array carries no
    timing, so its timestamps are frame indices divided by `fps` (by 1 when
    fps is None). PIL images are one-frame clips; a Clip is returned as it is.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    if isinstance(item, Clip):
        return item
    if isinstance(item, (str, os.PathLike)):
        return read_clip(item, num_frames=num_frames, fps=fps, sampling=sampling, max_side=max_side)
    from PIL import Image

    if isinstance(item, Image.Image):
        name = getattr(item, "filename", "") or None
        _check_size(name or "<PIL image>", *item.size, max_pixels=MAX_PIXELS)
        try:
            frame = _pil_to_rgb(item, max_side=max_side)
        except (OSError, ValueError) as e:  # a lazily loaded image whose file is truncated or corrupt
            raise ClipError(f"{name or '<PIL image>'}: cannot decode image: {e}") from None
        return Clip(frames=frame[None], timestamps=[0.0], duration_s=0.0, path=name)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (3, 4) or item.shape[-1] != 3:
            raise ClipError(f"<array>: expected a uint8 array (H, W, 3) or (T, H, W, 3), got {item.dtype} {item.shape}")
        frames = np.ascontiguousarray(item if item.ndim == 4 else item[None])
        if len(frames) == 0:
            raise ClipError("<array>: zero frames")
        _check_size("<array>", frames.shape[2], frames.shape[1], max_pixels=MAX_PIXELS)
        index = np.arange(len(frames))
        if num_frames is not None and frames.shape[0] > 1:
            if sampling == "ends":
                index = np.arange(num_frames) * (len(frames) - 1) // max(num_frames - 1, 1)
            else:
                index = ((np.arange(num_frames) + 0.5) * len(frames) / num_frames).astype(np.int64)
            frames = frames[index]
        step = 1.0 / fps if fps else 1.0
        return Clip(frames=frames, timestamps=[float(i) * step for i in index], duration_s=0.0, path=None)
    raise ClipError(f"<{type(item).__name__}>: cannot make a clip from this type; pass a path, PIL image, uint8 array or Clip")


# ---------------------------------------------------------------- checks


def _check_file(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ClipError(f"{path}: no such file") from None
    except OSError as e:
        raise ClipError(f"{path}: cannot access: {e.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ClipError(f"{path}: is a directory, not a video or image file")
    # A FIFO or a device would block or never end inside FFmpeg.
    if not stat.S_ISREG(info.st_mode):
        raise ClipError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise ClipError(f"{path}: empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ClipError(f"{path}: no read permission")


def _check_size(path: str, width: int, height: int, max_pixels: int) -> None:
    if width < 2 or height < 2:
        raise ClipError(f"{path}: frame too small ({width}x{height}; need at least 2x2)")
    if width * height > max_pixels:
        raise ClipError(f"{path}: frame too large ({width}x{height} = {width * height} pixels > max_pixels={max_pixels})")


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most max_side."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, round(width * scale)), max(2, round(height * scale))


# ---------------------------------------------------------------- images


def _read_image(path: str, max_pixels: int, max_side: int | None) -> Clip:
    from PIL import Image, UnidentifiedImageError

    try:
        # Our own max_pixels check below replaces Pillow's warning; its hard
        # DecompressionBombError (above twice its limit) still ends as "too large".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(path, *image.size, max_pixels=max_pixels)  # header only: no pixel decoded yet
                frame = _pil_to_rgb(image, max_side)
    except ClipError:
        raise
    except UnidentifiedImageError:
        raise _NotAnImage() from None
    except Image.DecompressionBombError as e:
        raise ClipError(f"{path}: image too large ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # Pillow's ways of saying truncated or corrupt
        raise ClipError(f"{path}: cannot decode image: {e}") from None
    return Clip(frames=frame[None], timestamps=[0.0], duration_s=0.0, path=path)


def _pil_to_rgb(image: Image.Image, max_side: int | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, shrunk to max_side, alpha composited over white."""
    from PIL import Image, ImageOps

    if max_side is not None:
        # JPEG decodes straight at 1/2, 1/4 or 1/8 scale, so a huge photo never exists at full size.
        image.draft("RGB", _fit(*image.size, max_side))
    image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale would clip to white in convert("RGB"); keep its top 8 bits.
        image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours (often black); white is what a viewer shows.
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB")
    size = _fit(*image.size, max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    return np.array(image, dtype=np.uint8)


# ---------------------------------------------------------------- videos


def _read_video(path: str, num_frames, fps, max_pixels, max_side, max_duration_s, sampling, span) -> Clip:
    import av

    try:
        try:
            return _sample_video(path, num_frames, fps, max_pixels, max_side, max_duration_s, sampling, span, seek=True)
        except _SeekUnreliable:
            return _sample_video(path, num_frames, fps, max_pixels, max_side, max_duration_s, sampling, span, seek=False)
    except av.error.FFmpegError as e:
        raise ClipError(f"{path}: cannot decode video (corrupt or truncated?): {e}") from None


def _open(path: str):
    import av

    try:
        return av.open(path, metadata_errors="ignore")
    except av.error.PermissionError:
        raise ClipError(f"{path}: no read permission") from None
    except av.error.FFmpegError as e:
        raise _NotAVideo(str(e)) from None


def _sample_video(path, num_frames, fps, max_pixels, max_side, max_duration_s, sampling, span, seek: bool) -> Clip:
    with _open(path) as container:
        if not container.streams.video:
            raise _NotAVideo("no video stream")
        if any(part in container.format.name for part in _IMAGE_FORMATS):
            raise _NotAVideo(f"a still image ({container.format.name})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise ClipError(f"{path}: unsupported video codec (this FFmpeg build has no decoder for it)")
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise ClipError(f"{path}: no frame size in the video header (corrupt?)")
        _check_size(path, width, height, max_pixels)
        out_width, out_height = _fit(width, height, max_side)

        time_base = stream.time_base
        start = stream.start_time or 0
        duration = _duration(path, container, stream, max_duration_s)
        if max_duration_s is not None and duration > max_duration_s:
            raise ClipError(f"{path}: the clip lasts {float(duration):.1f} s, longer than the limit of {max_duration_s:g} s")
        # Seconds as written (2.6, not the binary float just above it), as fps is read.
        first, last = (None if s is None else Fraction(s).limit_denominator(1_000_000) for s in span)
        last = duration if last is None else min(last, duration)
        if first >= last:
            raise ClipError(f"{path}: the span from {span[0]:g} s starts at or after the clip's end ({float(duration):.3f} s)")
        times = [first + t for t in _sample_times(last - first, num_frames, fps, sampling, _frame_step(stream) * time_base)]
        if len(times) * out_width * out_height * 3 > _MAX_OUTPUT_BYTES:
            raise ClipError(
                f"{path}: {len(times)} frames of {out_width}x{out_height} would need more than "
                f"{_MAX_OUTPUT_BYTES >> 30} GiB; pass num_frames or max_side"
            )
        targets = [start + math.floor(t / time_base) for t in times]

        def to_rgb(frame) -> np.ndarray:
            _check_size(path, frame.width, frame.height, max_pixels)  # the size may change mid-stream
            return frame.to_ndarray(format="rgb24", width=out_width, height=out_height, interpolation="AREA")

        picked = _frames_at(path, container, stream, targets, seek, to_rgb)
        frames = np.stack([array for _, array in picked])
        timestamps = [float((pts - start) * time_base) for pts, _ in picked]
        return Clip(frames=frames, timestamps=timestamps, duration_s=float(duration), path=path)


def _duration(path: str, container, stream, max_duration_s: float | None) -> Fraction:
    """Seconds the video stream lasts: from its header, the container's, or by reading every packet.

    Reading packets stops as soon as they pass `max_duration_s`: an hour of raw video is refused
    after a minute's worth of packets.
    """
    if stream.duration:
        return stream.duration * stream.time_base
    if container.duration:
        import av

        return Fraction(container.duration, av.time_base)
    # No duration in any header (raw streams): read packets, which is cheap next to decoding.
    start, end, total, step = stream.start_time or 0, None, 0, _frame_step(stream)
    with _open(path) as scan:
        for packet in scan.demux(scan.streams.video[0]):
            if packet.size == 0:  # the empty packet that flushes the decoder
                continue
            total += packet.duration or step
            if packet.pts is not None:
                end = max(end or start, packet.pts + (packet.duration or step))
            if max_duration_s is not None and max(total, (end or start) - start) * stream.time_base > max_duration_s:
                raise ClipError(f"{path}: the clip lasts more than the limit of {max_duration_s:g} s")
    if total == 0:
        raise ClipError(f"{path}: no video frames")
    return (end - start if end is not None else total) * stream.time_base


def _frame_step(stream) -> Fraction:
    """One frame's duration in stream.time_base units, for streams that do not time their frames."""
    rate = stream.guessed_rate or stream.average_rate or 25
    return 1 / (Fraction(rate) * stream.time_base)


def _sample_times(duration: Fraction, num_frames: int | None, fps: float | None, sampling: str, frame: Fraction) -> list[Fraction]:
    """Seconds from the start of the stream to sample at; see the module docstring. `frame`: one frame's duration."""
    if fps is not None:
        step = 1 / Fraction(fps).limit_denominator(1_000_000)
        count = max(1, math.ceil(duration / step))
        if num_frames is None or count <= num_frames:
            return [i * step for i in range(count)]
    if sampling == "ends":
        last = max(duration - frame, Fraction(0))  # the last frame's start
        return [i * last / max(num_frames - 1, 1) for i in range(num_frames)]
    return [(2 * i + 1) * duration / (2 * num_frames) for i in range(num_frames)]


def _decode(container, stream, seek: bool):
    """Decoded frames from the container's current position, each with a usable pts."""
    global frames_decoded
    count = 0
    step = _frame_step(stream)
    for packet in container.demux(stream):
        for frame in packet.decode():
            frames_decoded += 1
            if frame.pts is None:
                if seek:  # after a seek there is no frame count to rebuild the time from
                    raise _SeekUnreliable()
                frame.pts = (stream.start_time or 0) + round(count * step)
            count += 1
            yield frame


def _frames_at(path: str, container, stream, targets: list[int], seek: bool, to_rgb) -> list[tuple[int, np.ndarray]]:
    """(pts, to_rgb(frame)) of the frame on screen at each target pts (ascending): the last frame with pts <= target.

    Frames are converted as soon as they are chosen, so at most two decoded
    frames are alive at a time however many are sampled.
    """
    slack = math.floor(_TIMESTAMP_SLACK_S / stream.time_base)
    picked: list[tuple[int, np.ndarray]] = []
    frames = None  # the decoder, positioned just after `upcoming`
    shown = None  # the last frame at or before the previous target
    upcoming = None  # the first frame after it; None once the stream is exhausted
    for target in targets:
        if frames is None:
            frames, shown, upcoming = _restart(container, stream, target, seek, slack)
        elif seek and upcoming is not None and upcoming.pts <= target + slack and _seek_helps(stream, upcoming.pts, target):
            previous = upcoming.pts
            frames, shown, upcoming = _restart(container, stream, target, seek, slack)
            if upcoming.pts <= previous:
                # The seek went back past where we were (GIF seeks to the
                # start), so seeking saves nothing here: decode on from here.
                seek = False
        while upcoming is not None and upcoming.pts <= target + slack:
            shown, upcoming = upcoming, next(frames, None)
        # Before the first frame (a stream whose first frame comes late) the first frame stands in.
        chosen = shown if shown is not None else upcoming
        if chosen is None:
            raise ClipError(f"{path}: no decodable video frames")
        if picked and picked[-1][0] == chosen.pts:  # a short clip repeats its frames
            picked.append(picked[-1])
        else:
            picked.append((chosen.pts, to_rgb(chosen)))
    return picked


def _restart(container, stream, target: int, seek: bool, slack: int):
    """Seek to the keyframe at or before target (when seeking); return (decoder, no shown frame, first frame)."""
    import av

    if seek:
        try:
            container.seek(target, stream=stream, backward=True)
        except av.error.FFmpegError:
            raise _SeekUnreliable() from None
    frames = _decode(container, stream, seek)
    upcoming = next(frames, None)
    if seek and (upcoming is None or upcoming.pts > target + slack):
        # Landed after the target or past the data: a broken index, or a truncated file.
        raise _SeekUnreliable()
    return frames, None, upcoming


def _seek_helps(stream, position: int, target: int) -> bool:
    """Whether seeking to target skips decoding: a keyframe lies after position and at or before target."""
    entries = stream.index_entries
    if len(entries) > 1:
        i = entries.search_timestamp(target, backward=True)
        if i >= 0:
            return entries[i].timestamp > position
    return (target - position) * stream.time_base > _SEEK_MIN_GAP_S
