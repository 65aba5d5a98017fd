"""Tests for adapters/video.py on real files written here with PyAV and Pillow.

Each video frame carries its own index as a 4x4 grid of black and white cells
(16 bits), which survives lossy codecs, so a test can tell exactly which
frames were sampled.
"""

import io
import os
import re
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from adapters import video
from adapters.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Clip, ClipError, as_clip, read_clip

FPS = 10
N_FRAMES = 32  # 3.2 s
WIDTH, HEIGHT = 64, 48


def index_pattern(i: int, width: int, height: int) -> np.ndarray:
    bits = np.array([(i >> k) & 1 for k in range(16)], np.uint8).reshape(4, 4) * 255
    cells = np.kron(bits, np.ones((height // 4, width // 4), np.uint8))
    return np.repeat(cells[:, :, None], 3, axis=2)


def frame_index(frame: np.ndarray) -> int:
    h, w = frame.shape[0] // 4, frame.shape[1] // 4
    centres = frame[h // 2 :: h, w // 2 :: w][:4, :4].mean(axis=2) > 127
    return int(sum(1 << k for k, bit in enumerate(centres.ravel()) if bit))


def indices(clip: Clip) -> list[int]:
    return [frame_index(f) for f in clip.frames]


def write_video(path, codec, n=N_FRAMES, fps=FPS, width=WIDTH, height=HEIGHT, pix_fmt="yuv420p", options=None, container_options=None):
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(index_pattern(i, width, height), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def write_gif(path, n=N_FRAMES, fps=FPS, width=WIDTH, height=HEIGHT):
    images = [Image.fromarray(index_pattern(i, width, height)) for i in range(n)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    return path


def png_header_only(path, width, height):
    """A PNG whose header claims width x height with no pixel data: costs nothing to write."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def write_hour(path):
    """An hour of video in milliseconds: 40 frames of 16x16, one every 90 s, one keyframe."""
    return write_video(path, "libx264", n=40, fps=Fraction(1, 90), width=16, height=16, options={"g": "1000"})


CONTAINERS = {  # file name: (codec, pix_fmt)
    "h264.mp4": ("libx264", "yuv420p"),
    "vp9.webm": ("libvpx-vp9", "yuv420p"),
    "vp8.webm": ("libvpx", "yuv420p"),
    "h264.mkv": ("libx264", "yuv420p"),
    "mpeg4.avi": ("mpeg4", "yuv420p"),
    "mjpeg.avi": ("mjpeg", "yuvj420p"),
    "h264.mov": ("libx264", "yuv420p"),
    "h264.ts": ("libx264", "yuv420p"),  # MPEG-TS starts its clock at 1.4 s
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    made = {"anim.gif": write_gif(root / "anim.gif")}
    for name, (codec, pix_fmt) in CONTAINERS.items():
        if codec in av.codecs_available:
            made[name] = write_video(root / name, codec, pix_fmt=pix_fmt)
    return made


def clip_path(clips, name):
    if name not in clips:
        pytest.skip(f"this PyAV build cannot encode {name}")
    return clips[name]


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", [*CONTAINERS, "anim.gif"])
def test_uniform_sampling_takes_segment_centres(clips, name):
    path = clip_path(clips, name)
    clip = read_clip(path, num_frames=8)
    assert clip.frames.shape == (8, HEIGHT, WIDTH, 3) and clip.frames.dtype == np.uint8
    # centres of 8 segments of 0.4 s: 0.2, 0.6, ... s -> frames 2, 6, ..., 30
    assert indices(clip) == [2, 6, 10, 14, 18, 22, 26, 30]
    assert clip.timestamps == pytest.approx([i / FPS for i in indices(clip)], abs=2e-3)
    assert clip.duration_s == pytest.approx(N_FRAMES / FPS, abs=0.05)
    assert clip.path == str(path)

    # centres 0.32, 0.96, 1.6, 2.24, 2.88 s: the frame on screen at each
    assert indices(read_clip(path, num_frames=5)) == [3, 9, 16, 22, 28]


@pytest.mark.parametrize("name", [*CONTAINERS, "anim.gif"])
def test_sampling_from_the_first_frame_to_the_last(clips, name):
    path = clip_path(clips, name)
    # 0 .. 3.1 s (the last frame's start) in 3 and 4 steps
    assert indices(read_clip(path, num_frames=4, sampling="ends")) == [0, 10, 20, 31]
    assert indices(read_clip(path, num_frames=5, sampling="ends")) == [0, 7, 15, 23, 31]
    assert indices(read_clip(path, num_frames=1, sampling="ends")) == [0]
    # capped fps sampling spreads its frames the same way
    assert indices(read_clip(path, num_frames=4, fps=2.5, sampling="ends")) == [0, 10, 20, 31]
    with pytest.raises(ValueError, match="sampling must be one of centres, ends, got 'middle'"):
        read_clip(path, num_frames=4, sampling="middle")


def test_fps_sampling(clips):
    path = clips["h264.mp4"]
    clip = read_clip(path, num_frames=None, fps=2.5)  # one frame every 0.4 s of 3.2 s
    assert indices(clip) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert clip.timestamps == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.4, 2.8])

    # capped: the 4 frames are spread over the whole clip, not the first 1.6 s
    capped = read_clip(path, num_frames=4, fps=2.5)
    assert indices(capped) == [4, 12, 20, 28]

    # a cap that is not reached changes nothing
    assert indices(read_clip(path, num_frames=100, fps=2.5)) == indices(clip)

    # faster than the video: frames repeat, timestamps say so
    fast = read_clip(path, num_frames=None, fps=20)
    assert len(fast.frames) == 64
    assert indices(fast) == [i // 2 for i in range(64)]


@pytest.mark.parametrize("name", [*CONTAINERS, "anim.gif"])
def test_a_span_is_sampled_inside_it_by_the_same_rules(clips, name):
    path = clip_path(clips, name)
    # [1.0, 2.6) s: centres of 4 segments of 0.4 s at 1.2, 1.6, 2.0, 2.4 s
    clip = read_clip(path, num_frames=4, start_s=1.0, end_s=2.6)
    assert indices(clip) == [12, 16, 20, 24]
    assert clip.duration_s == pytest.approx(N_FRAMES / FPS, abs=0.05)  # the whole clip's, as without a span
    # from the span's first frame (1.0 s) to its last (2.5 s)
    assert indices(read_clip(path, num_frames=4, sampling="ends", start_s=1.0, end_s=2.6)) == [10, 15, 20, 25]
    assert indices(read_clip(path, num_frames=None, fps=2.5, start_s=1.0, end_s=2.6)) == [10, 14, 18, 22]
    # an end past the clip's stops at its end (3.2 s): centres of [1.0, 3.2) at 1.275, 1.825, 2.375, 2.925 s
    assert indices(read_clip(path, num_frames=4, start_s=1.0, end_s=10.0)) == [12, 18, 23, 29]
    assert indices(read_clip(path, num_frames=4, start_s=1.0)) == [12, 18, 23, 29]
    with pytest.raises(ClipError, match=re.escape(f"{path}: the span from 3.5 s starts at or after the clip's end (3.200 s)")):
        read_clip(path, num_frames=4, start_s=3.5, end_s=4.0)
    with pytest.raises(ValueError, match="end_s must be a finite number after start_s=2.0, got 1.0"):
        read_clip(path, num_frames=4, start_s=2.0, end_s=1.0)


def test_short_clip_repeats_frames(tmp_path):
    path = write_video(tmp_path / "three.mp4", "libx264", n=3)
    clip = read_clip(path, num_frames=8)
    assert clip.frames.shape[0] == 8
    assert indices(clip) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert clip.timestamps == pytest.approx([0, 0, 0, 0.1, 0.1, 0.2, 0.2, 0.2])


def test_max_side_resizes_while_decoding(clips, tmp_path):
    clip = read_clip(clips["h264.mp4"], num_frames=4, max_side=32)
    assert clip.frames.shape == (4, 24, 32, 3)
    assert indices(clip) == [4, 12, 20, 28]
    assert read_clip(clips["h264.mp4"], num_frames=1, max_side=1000).frames.shape == (1, HEIGHT, WIDTH, 3)

    photo = tmp_path / "wide.jpg"
    Image.new("RGB", (2000, 1000), (200, 30, 30)).save(photo, quality=90)
    small = read_clip(photo, max_side=100)
    assert small.frames.shape == (1, 50, 100, 3)
    assert np.abs(small.frames.reshape(-1, 3).mean(0) - [200, 30, 30]).max() < 6


def test_seeks_instead_of_decoding_everything(tmp_path):
    # 20 s at 25 fps = 500 frames, a keyframe every second
    path = write_video(tmp_path / "long.mp4", "libx264", n=500, fps=25, width=32, height=32, options={"g": "25"})
    before = video.frames_decoded
    everything = read_clip(path, num_frames=None, fps=25)
    full = video.frames_decoded - before
    assert len(everything.frames) == 500 and full >= 500
    assert indices(everything)[::50] == list(range(0, 500, 50))

    before = video.frames_decoded
    clip = read_clip(path, num_frames=4)
    sampled = video.frames_decoded - before
    assert indices(clip) == [62, 187, 312, 437]  # on screen at 2.5, 7.5, 12.5, 17.5 s
    assert sampled < full / 5, (sampled, full)


def test_mkv_seeks_through_its_cues(tmp_path):
    path = write_video(tmp_path / "long.mkv", "libx264", n=500, fps=25, width=32, height=32, options={"g": "25"})
    before = video.frames_decoded
    assert indices(read_clip(path, num_frames=4)) == [62, 187, 312, 437]
    assert video.frames_decoded - before < 100


def test_long_gif_falls_back_to_one_pass(tmp_path):
    # GIF "seeks" back to its first frame; the reader notices and decodes on instead
    path = write_gif(tmp_path / "long.gif", n=200, fps=25, width=32, height=32)
    before = video.frames_decoded
    assert indices(read_clip(path, num_frames=4)) == [25, 75, 125, 175]
    assert video.frames_decoded - before < 2 * 200


def test_raw_h264_without_timestamps(tmp_path):
    path = write_video(tmp_path / "raw.h264", "libx264")
    clip = read_clip(path, num_frames=8)
    assert indices(clip) == [2, 6, 10, 14, 18, 22, 26, 30]
    assert clip.duration_s == pytest.approx(3.2)


def test_a_clip_over_the_duration_limit_is_refused_before_decoding(tmp_path):
    path = write_hour(tmp_path / "hour.mp4")
    before = video.frames_decoded
    with pytest.raises(ClipError, match="hour.mp4: the clip lasts 3600.0 s, longer than the limit of 60 s"):
        read_clip(path, num_frames=8, max_duration_s=60)
    assert video.frames_decoded == before  # the header said it
    assert indices(read_clip(path, num_frames=2, max_duration_s=3600)) == [10, 30]


def test_a_stream_without_a_duration_is_refused_from_its_packets(tmp_path):
    path = write_video(tmp_path / "raw.h264", "libx264")  # 3.2 s, no header says how long
    before = video.frames_decoded
    with pytest.raises(ClipError, match="raw.h264: the clip lasts more than the limit of 1 s"):
        read_clip(path, num_frames=8, max_duration_s=1)
    assert video.frames_decoded == before
    assert read_clip(path, num_frames=8, max_duration_s=3.2).duration_s == pytest.approx(3.2)


def test_a_header_that_understates_the_duration_does_not_let_decoding_run_on(tmp_path):
    """The hour-long clip whose track header says 2 s: sampled over those 2 s, not decoded to the limit."""
    data = bytearray(write_hour(tmp_path / "hour.mp4").read_bytes())
    mdhd = data.index(b"mdhd")  # version 0: flags, creation and modification times, timescale, duration
    (timescale,) = struct.unpack(">I", data[mdhd + 16 : mdhd + 20])
    data[mdhd + 20 : mdhd + 24] = struct.pack(">I", 2 * timescale)
    path = tmp_path / "says_two_seconds.mp4"
    path.write_bytes(data)
    before = video.frames_decoded
    clip = read_clip(path, num_frames=8, max_duration_s=60)
    assert clip.duration_s == 2.0 and indices(clip) == [0] * 8
    assert video.frames_decoded - before == 2  # frame 0, and frame 1 (at 90 s), which ends the search


def test_max_duration_is_a_positive_number(clips):
    for bad in (0, -1.0, "60"):
        with pytest.raises(ValueError, match="max_duration_s must be a positive number"):
            read_clip(clips["h264.mp4"], max_duration_s=bad)


# ---------------------------------------------------------------- images


def test_images_are_one_frame_clips(tmp_path):
    cases = {
        "rgb.png": (Image.new("RGB", (40, 30), (10, 200, 30)), (10, 200, 30)),
        "photo.jpg": (Image.new("RGB", (40, 30), (10, 200, 30)), (10, 200, 30)),
        "clear.png": (Image.new("RGBA", (40, 30), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        "solid.png": (Image.new("RGBA", (40, 30), (255, 0, 0, 255)), (255, 0, 0)),
        "grey.png": (Image.new("L", (40, 30), 77), (77, 77, 77)),
        "palette.png": (Image.new("RGB", (40, 30), (0, 0, 255)).convert("P"), (0, 0, 255)),
        "deep.png": (Image.new("I;16", (40, 30), 40000), (156, 156, 156)),  # 16 bit keeps its top 8 bits
        "pic.bmp": (Image.new("RGB", (40, 30), (1, 2, 3)), (1, 2, 3)),
        "pic.webp": (Image.new("RGB", (40, 30), (90, 90, 90)), (90, 90, 90)),
    }
    for name, (image, rgb) in cases.items():
        path = tmp_path / name
        image.save(path, **({"lossless": True} if name.endswith(".webp") else {}))
        clip = read_clip(path, num_frames=8)
        assert clip.frames.shape == (1, 30, 40, 3), name
        assert clip.frames.dtype == np.uint8
        assert np.abs(clip.frames.reshape(-1, 3).mean(0) - rgb).max() < 4, name
        assert clip.timestamps == [0.0] and clip.duration_s == 0.0


def test_content_decides_not_the_name(clips, tmp_path):
    # a PNG named .mp4 is a valid image: one frame
    disguised = tmp_path / "actually_png.mp4"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(disguised, format="PNG")
    clip = read_clip(disguised)
    assert clip.frames.shape == (1, 30, 40, 3)
    assert tuple(clip.frames[0, 0, 0]) == (255, 0, 0)

    # and an MP4 named .jpg is a video
    renamed = tmp_path / "actually_mp4.jpg"
    renamed.write_bytes(clips["h264.mp4"].read_bytes())
    assert indices(read_clip(renamed, num_frames=2)) == [8, 24]


def test_extension_sets():
    assert {".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif"} <= VIDEO_EXTENSIONS
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp"} <= IMAGE_EXTENSIONS
    assert not VIDEO_EXTENSIONS & IMAGE_EXTENSIONS


# ---------------------------------------------------------------- as_clip


def test_as_clip_accepts_every_kind_of_item(clips):
    image = Image.new("RGBA", (20, 10), (0, 0, 255, 255))
    from_pil = as_clip(image)
    assert from_pil.frames.shape == (1, 10, 20, 3) and tuple(from_pil.frames[0, 0, 0]) == (0, 0, 255)

    frame = np.zeros((10, 20, 3), np.uint8)
    assert as_clip(frame).frames.shape == (1, 10, 20, 3)
    frames = np.zeros((5, 10, 20, 3), np.uint8)
    stacked = as_clip(frames, num_frames=None, fps=2)
    assert stacked.frames.shape == (5, 10, 20, 3) and stacked.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0]

    assert as_clip(stacked) is stacked
    assert indices(as_clip(clips["h264.mp4"], num_frames=2)) == [8, 24]
    assert indices(as_clip(str(clips["h264.mp4"]), num_frames=None, fps=1)) == [0, 10, 20, 30]


def test_arrays_are_sampled_like_their_video_files(clips):
    frames = np.stack([np.full((4, 4, 3), i, np.uint8) for i in range(N_FRAMES)])  # frame i holds i
    for T in (1, 5, 8, 2 * N_FRAMES):
        from_array = [int(f[0, 0, 0]) for f in as_clip(frames, num_frames=T).frames]
        assert from_array == indices(read_clip(clips["h264.mp4"], num_frames=T))
        from_array = [int(f[0, 0, 0]) for f in as_clip(frames, num_frames=T, sampling="ends").frames]
        assert from_array == indices(read_clip(clips["h264.mp4"], num_frames=T, sampling="ends"))


@pytest.mark.parametrize(
    "item",
    [np.zeros((10, 20, 3), np.float32), np.zeros((10, 20), np.uint8), np.zeros((0, 10, 20, 3), np.uint8), 42, b"bytes"],
    ids=["float", "2d", "no-frames", "int", "bytes"],
)
def test_as_clip_rejects_bad_items(item):
    with pytest.raises(ClipError):
        as_clip(item)


def test_bad_arguments_are_not_clip_errors(clips):
    for kwargs in ({"num_frames": None, "fps": None}, {"num_frames": 0}, {"fps": -1.0}, {"max_side": 1}):
        with pytest.raises(ValueError) as info:
            read_clip(clips["h264.mp4"], **kwargs)
        assert not isinstance(info.value, ClipError)


# ---------------------------------------------------------------- bad inputs


def _bad_inputs(root, real_mp4):
    """name -> (path, words the message must contain)"""
    cases = {}

    def case(name, words, data=None):
        path = root / name
        if data is not None:
            path.write_bytes(data)
        cases[name] = (path, words)
        return path

    case("empty.mp4", "empty", b"")
    mp4 = real_mp4.read_bytes()
    case("truncated.mp4", "not a decodable", mp4[: len(mp4) // 2])
    # with its index at the front the file opens, and the cut shows only when decoding
    faststart = write_video(root / "whole.mp4", "libx264", n=64, container_options={"movflags": "+faststart"}).read_bytes()
    case("cut_faststart.mp4", "corrupt or truncated", faststart[: len(faststart) // 2])
    case("notes.mp4", "not a decodable", b"just some text, not a video\n" * 50)
    case("missing.mp4", "no such file")
    case("folder.mp4", "directory").mkdir()
    Image.new("RGB", (1, 1)).save(case("dot.png", "too small"))
    Image.new("1", (10000, 10000)).save(case("huge.png", "too large"))  # a 0.3 s write; never decoded
    png_header_only(case("bomb.png", "too large"), 100_000, 100_000)  # past Pillow's own bomb limit
    case("headeronly.y4m", "no video frames", b"YUV4MPEG2 W64 H48 F10:1 Ip A1:1 C420jpeg\n")
    case("unknown_codec.mp4", "unsupported video codec", mp4.replace(b"avc1", b"zzzz"))
    noisy = _noise_png()
    case("corrupt.png", "cannot decode image", noisy[: len(noisy) // 2])  # header fine, pixels cut
    os.mkfifo(case("pipe.mp4", "not a regular file"))  # FFmpeg would block on it forever
    with av.open(str(case("sound.mp4", "no video stream")), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 8000
        out.mux(stream.encode(samples))
        out.mux(stream.encode())
    return cases


def _noise_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_NAMES = [
    "empty.mp4",
    "truncated.mp4",
    "cut_faststart.mp4",
    "notes.mp4",
    "missing.mp4",
    "folder.mp4",
    "dot.png",
    "huge.png",
    "bomb.png",
    "headeronly.y4m",
    "unknown_codec.mp4",
    "corrupt.png",
    "pipe.mp4",
    "sound.mp4",
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, clips):
    return _bad_inputs(tmp_path_factory.mktemp("bad"), clips["h264.mp4"])


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_is_a_clip_error_naming_the_file(bad_inputs, name):
    path, words = bad_inputs[name]
    with pytest.raises(ClipError) as info:
        read_clip(path)
    message = str(info.value)
    assert name in message and words in message, message
    with pytest.raises(ClipError):  # the same through as_clip
        as_clip(path)


def test_frame_above_max_pixels(clips):
    with pytest.raises(ClipError, match="too large") as info:
        read_clip(clips["h264.mp4"], max_pixels=WIDTH * HEIGHT - 1)
    assert "h264.mp4" in str(info.value)
    assert read_clip(clips["h264.mp4"], num_frames=1, max_pixels=WIDTH * HEIGHT).frames.shape[0] == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(clips, tmp_path):
    path = tmp_path / "locked.mp4"
    path.write_bytes(clips["h264.mp4"].read_bytes())
    path.chmod(0)
    try:
        with pytest.raises(ClipError, match="permission") as info:
            read_clip(path)
        assert "locked.mp4" in str(info.value)
    finally:
        path.chmod(0o644)
