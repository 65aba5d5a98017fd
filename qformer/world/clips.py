"""A scene's pixels: its clip drawn frame by frame, and clips as H.264 MP4 files (WORLD.md, "A clip").

Pixel convention (the spec leaves it open): pixel (column i, row j) is the unit square
[i, i+1) x [j, j+1); it is painted when its centre (i + 0.5, j + 0.5) lies in the shape. No
antialiasing. Each shape fills the pixel box `WorldObject.box_at` gives for the frame.
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache
from os import PathLike

import numpy as np

from .scenes import BACKGROUNDS, COLOURS, FPS, FRAMES, HEIGHT, SHAPES, WIDTH, Scene

# --------------------------------------------------------------------------
# Rendering.


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling a side x side box.

    Pixel (row j, column i) is painted when its centre lies in the shape.
    With the box's own coordinates doubled, the centre offset from the box
    centre is (2i + 1 - side) / 2, so every test is exact integer arithmetic.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    d = 2 * np.arange(side) + 1 - side  # twice the offset of pixel centres
    dx = d[None, :]
    dy = d[:, None]
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":  # dx^2 + dy^2 <= (side/2)^2
        mask = dx * dx + dy * dy <= side * side
    elif shape == "diamond":  # |dx| + |dy| <= side/2: a square of diagonal side
        mask = np.abs(dx) + np.abs(dy) <= side
    else:  # triangle: apex at the top middle, base = bottom edge; at depth
        # (j + 0.5) below the apex the half-width is (j + 0.5) / 2.
        rows = np.arange(side)[:, None]
        mask = 2 * np.abs(dx) <= 2 * rows + 1
    mask.setflags(write=False)  # cached and shared: nobody may change it
    return mask


def _background(name: str) -> np.ndarray:
    """A fresh (H, W, 3) frame of one background colour (np.tile is several
    times faster than broadcasting a 3-tuple into an empty array)."""
    return np.tile(np.array(BACKGROUNDS[name], dtype=np.uint8), (HEIGHT, WIDTH, 1))


def _draw(canvas: np.ndarray, scene: Scene, t: int) -> None:
    """Paint frame t's objects onto a (H, W, 3) canvas holding the background."""
    for obj in scene.objects:  # caption order: the second is drawn on top
        left, top, side = obj.box_at(t)
        mask = shape_mask(obj.shape, side)
        # Clip to the frame so hand-built scenes that break the rules still render.
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + side, HEIGHT), min(left + side, WIDTH)
        if r0 >= r1 or c0 >= c1:
            continue
        sub = mask[r0 - top : r1 - top, c0 - left : c1 - left]
        canvas[r0:r1, c0:c1][sub] = COLOURS[obj.colour]


def render_frame(scene: Scene, t: int) -> np.ndarray:
    """Frame t as a (128, 128, 3) uint8 array."""
    frame = _background(scene.background)
    _draw(frame, scene, t)
    return frame


def render(scene: Scene) -> np.ndarray:
    """The clip as a (16, 128, 128, 3) uint8 array."""
    clip = np.repeat(_background(scene.background)[None], FRAMES, axis=0)
    for t in range(FRAMES):
        _draw(clip[t], scene, t)
    return clip


# --------------------------------------------------------------------------
# Video files.


def write_mp4(frames: np.ndarray, path: str | PathLike, fps: int = FPS, crf: int = 4) -> None:
    """Write (T, H, W, 3) uint8 frames as H.264 yuv420p MP4 with PyAV.

    crf 4 is visually lossless (the RGB -> yuv420p chroma halving at colour
    edges costs far more than the encoder does) and keeps the plain High
    profile, which browsers play; crf 0 is lossless in YUV but switches
    libx264 to High 4:4:4 Predictive, which most browsers cannot decode.
    H and W must be even for yuv420p.
    """
    import av  # imported here so the rest of the module needs no PyAV

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError("yuv420p needs even height and width")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def read_mp4(path: str | PathLike) -> np.ndarray:
    """Decode every frame of a video file to a (T, H, W, 3) uint8 RGB array."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
