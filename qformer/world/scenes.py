"""The world's scenes: vocabulary, geometry, the rules of a legal scene, sampling and the splits.

Every choice WORLD.md leaves open here is written down next to the code that makes it:

* Rounding: frame t's size s_t = round(size) and centre (X_t, Y_t) =
  round(centre) are whole pixels (there are never ties: see `_round_div`).
  The object's bounding box is the s_t x s_t pixel block whose top-left pixel
  is (X_t - s_t // 2, Y_t - s_t // 2). For even s_t (every size at frames 0
  and 15 and every size of a still or moving object) the box's geometric
  centre is exactly (X_t, Y_t); for odd s_t (some frames of grows/shrinks) it
  sits half a pixel right of and below it.
* The shape is inscribed in that box: all four shapes have an S x S bounding
  box (triangle: base on the box's bottom edge, apex at the middle of its top
  edge). "Centre" means the centre of the bounding box, also for triangles.
* Start positions are whole-pixel centres, uniform over every (x, y) whose
  box stays inside the frame in all 16 frames (this accounts for the motion
  and for the largest size of grows/shrinks, 1.4 S).
* Rejection sampling keeps the background and the object count and redraws
  only the objects, so one and two objects stay exactly equally likely.
* Randomness comes from raw 64-bit bit-generator output, not from
  `Generator.integers`, whose algorithm NumPy does not promise to keep
  across versions; seeds come from `numpy.random.SeedSequence`, so a split
  is the same on every machine.
* Splits: train and test-iid split the scene space by a fixed content hash
  (1/8 reserved for test-iid), so they can never share a clip; test-novel
  samples the world until a held-out pair appears. See `scene`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

# --------------------------------------------------------------------------
# Vocabulary and constants (orders are part of the sampler: value k of a
# tuple is drawn by the raw integer k).

FRAMES = 16
FPS = 8
HEIGHT = 128
WIDTH = 128
MOVE_PX = 40  # a moving centre travels 40 u px, u = t / 15

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, int] = {"small": 20, "large": 36}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grows", "shrinks", "still")
# (colour, shape) pairs that never appear in `train`.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("yellow", "square")})

SPLITS: tuple[str, ...] = ("train", "test-iid", "test-novel")

# --------------------------------------------------------------------------
# Exact motion arithmetic.


def _round_div(num: int, den: int) -> int:
    """round(num / den) for den > 0, halves rounded up, in exact integers.

    Halves never occur in this world: offsets are 8t/3 and sizes are
    S(45 +- 4t)/75 with even S, neither of which is ever k + 1/2, so any
    renderer's rounding rule gives the same pixels. Integers keep float error
    out of it.
    """
    return (2 * num + den) // (2 * den)


def _size_at(side: int, motion: str, t: int) -> int:
    """Drawn side length at frame t: S, (0.6 + 0.8u)S or (1.4 - 0.8u)S, rounded."""
    if motion == "grows":  # (0.6 + 0.8 t/15) S = S (45 + 4t) / 75
        return _round_div(side * (45 + 4 * t), 75)
    if motion == "shrinks":  # (1.4 - 0.8 t/15) S = S (105 - 4t) / 75
        return _round_div(side * (105 - 4 * t), 75)
    return side


def _offset_at(motion: str, t: int) -> tuple[int, int]:
    """Rounded (dx, dy) of the centre at frame t; image y grows downwards."""
    step = _round_div(MOVE_PX * t, FRAMES - 1)
    return {
        "left": (-step, 0),
        "right": (step, 0),
        "up": (0, -step),
        "down": (0, step),
    }.get(motion, (0, 0))


@cache  # 14 possible arguments; the sampler calls it constantly
def start_range(size: str, motion: str) -> tuple[int, int, int, int]:
    """Inclusive (x_min, x_max, y_min, y_max) of frame-0 centres that keep the
    object's box inside the frame in all 16 frames (same for every shape)."""
    side = SIZES[size]
    x_min = y_min = -(10**9)
    x_max = y_max = 10**9
    for t in range(FRAMES):
        s = _size_at(side, motion, t)
        dx, dy = _offset_at(motion, t)
        # box columns: X - s//2 .. X - s//2 + s - 1 must lie in 0 .. WIDTH-1
        x_min = max(x_min, s // 2 - dx)
        x_max = min(x_max, WIDTH - s + s // 2 - dx)
        y_min = max(y_min, s // 2 - dy)
        y_max = min(y_max, HEIGHT - s + s // 2 - dy)
    return x_min, x_max, y_min, y_max


# --------------------------------------------------------------------------
# Scenes.


@dataclass(frozen=True)
class WorldObject:
    """One shape; (x, y) is its centre in frame 0 in whole pixels."""

    shape: str
    size: str
    colour: str
    motion: str
    x: int
    y: int

    def __post_init__(self) -> None:
        # Fail loudly on a typo rather than render or caption nonsense.
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.motion not in MOTIONS:
            raise ValueError(f"unknown motion {self.motion!r}")
        if not all(isinstance(v, (int, np.integer)) for v in (self.x, self.y)):
            raise ValueError("the frame-0 centre must be whole pixels")

    @property
    def side(self) -> int:
        """S in pixels (the size of a still or moving object)."""
        return SIZES[self.size]

    def side_at(self, t: int) -> int:
        """Drawn side length (box width = height) at frame t."""
        return _size_at(self.side, self.motion, t)

    def centre_at(self, t: int) -> tuple[int, int]:
        """Rounded centre (X_t, Y_t) at frame t."""
        dx, dy = _offset_at(self.motion, t)
        return self.x + dx, self.y + dy

    def box_at(self, t: int) -> tuple[int, int, int]:
        """(left column, top row, side) of the drawn pixel box at frame t;
        it covers columns left .. left+side-1 and rows top .. top+side-1."""
        s = self.side_at(t)
        cx, cy = self.centre_at(t)
        return cx - s // 2, cy - s // 2, s


@dataclass(frozen=True)
class Scene:
    """A clip's content; objects are in caption order = draw order
    (further-left frame-0 centre first, so the second is drawn on top)."""

    background: str
    objects: tuple[WorldObject, ...]

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")


def rule_violations(scene: Scene) -> list[str]:
    """The spec's rules this scene breaks (empty list: a legal world scene)."""
    problems: list[str] = []
    objs = scene.objects
    if len(objs) not in (1, 2):
        problems.append(f"{len(objs)} objects (must be one or two)")
    for i, o in enumerate(objs):
        x_min, x_max, y_min, y_max = start_range(o.size, o.motion)
        if not (x_min <= o.x <= x_max and y_min <= o.y <= y_max):
            problems.append(f"object {i} leaves the frame")
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            if (a.shape, a.colour) == (b.shape, b.colour):
                problems.append(f"objects {i} and {j} share shape and colour")
            if a.x == b.x:
                problems.append(f"objects {i} and {j} have centres at the same x")
            elif a.x > b.x:
                problems.append(f"objects {i} and {j} are not in caption order")
            al, at, asz = a.box_at(0)
            bl, bt, bsz = b.box_at(0)
            # Pixel boxes overlap when they share a pixel; touching edges is fine.
            if al < bl + bsz and bl < al + asz and at < bt + bsz and bt < at + asz:
                problems.append(f"objects {i} and {j} overlap in frame 0")
    return problems


def has_held_out(scene: Scene) -> bool:
    """True if the scene contains a held-out colour-shape pair."""
    return any((o.colour, o.shape) in HELD_OUT for o in scene.objects)


# --------------------------------------------------------------------------
# Sampling.

_TWO_64 = 1 << 64


def _uniform_int(rng: np.random.Generator, n: int) -> int:
    """Uniform integer in [0, n) from raw 64-bit output (unbiased rejection).

    Only the bit generator's raw stream is used, because NumPy keeps
    SeedSequence and PCG64 stable across versions but not the algorithms of
    Generator methods such as `integers`.
    """
    limit = _TWO_64 - _TWO_64 % n
    while True:
        r = int(rng.bit_generator.random_raw())
        if r < limit:
            return r % n


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[_uniform_int(rng, len(values))]


def _sample_object(rng: np.random.Generator) -> WorldObject:
    shape = _pick(rng, SHAPES)
    size = _pick(rng, tuple(SIZES))
    colour = _pick(rng, tuple(COLOURS))
    motion = _pick(rng, MOTIONS)
    x_min, x_max, y_min, y_max = start_range(size, motion)
    x = x_min + _uniform_int(rng, x_max - x_min + 1)
    y = y_min + _uniform_int(rng, y_max - y_min + 1)
    return WorldObject(shape, size, colour, motion, x, y)


def sample_scene(rng: np.random.Generator, accept: Callable[[Scene], bool] | None = None) -> Scene:
    """Draw one world scene by rejection sampling.

    The background and the object count (one or two, equally likely) are
    drawn once; the objects are redrawn until the scene obeys the rules and
    `accept` (a split's extra condition) holds. Keeping the count fixed keeps
    it exactly 50/50, which redrawing it would not (two-object draws are
    rejected more often). `rng` must wrap a 64-bit bit generator (the
    default PCG64 does).
    """
    if isinstance(rng.bit_generator, np.random.MT19937):
        raise TypeError("sample_scene needs a 64-bit bit generator (MT19937 is 32-bit)")
    background = _pick(rng, tuple(BACKGROUNDS))
    count = 1 + _uniform_int(rng, 2)
    while True:
        objs = sorted((_sample_object(rng) for _ in range(count)), key=lambda o: o.x)
        candidate = Scene(background, tuple(objs))
        if not rule_violations(candidate) and (accept is None or accept(candidate)):
            return candidate


# Split ids are part of the seed, so each split has its own seed stream;
# _SPEC_VERSION keeps a future spec's streams apart from these.
_SPEC_VERSION = 1
_SPLIT_IDS = {"train": 0, "test-iid": 1, "test-novel": 2}
# One in _TEST_IID_SHARE scenes (by a content hash) is reserved for test-iid.
_TEST_IID_SHARE = 8


def _reserved_for_test(scene: Scene) -> bool:
    """Partition of the scene space that makes train and test-iid disjoint.

    Different seed streams alone do not guarantee that: one-object scenes
    number only a few million, so a large train split and a test split would
    share some by chance. A fixed content hash (sha256, not Python's salted
    hash()) sends each possible scene to exactly one side; the reserved side
    is a pseudo-random 1/8 of the space, so test-iid still follows the train
    distribution.
    """
    key = scene.background + "|" + ";".join(f"{o.shape},{o.size},{o.colour},{o.motion},{o.x},{o.y}" for o in scene.objects)
    digest = hashlib.sha256(key.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % _TEST_IID_SHARE == 0


def split_rng(split: str, index: int) -> np.random.Generator:
    """The generator behind clip `index` of `split` (PCG64 via SeedSequence)."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    return np.random.default_rng([_SPEC_VERSION, _SPLIT_IDS[split], int(index)])


def scene(split: str, index: int) -> Scene:
    """Clip `index` of `split`: a pure function of (split, index).

    - train: no held-out pair, and not in the test-iid share of the space;
    - test-iid: no held-out pair, and in the test-iid share;
    - test-novel: at least one held-out pair, found by sampling the world
      until one appears (so it is the world's distribution conditioned on
      containing a held-out pair; the count stays 50/50). Neither train nor
      test-iid can contain such a clip, so all three splits are disjoint.
    """
    rng = split_rng(split, index)
    if split == "train":
        return sample_scene(rng, lambda s: not has_held_out(s) and not _reserved_for_test(s))
    if split == "test-iid":
        return sample_scene(rng, lambda s: not has_held_out(s) and _reserved_for_test(s))
    return sample_scene(rng, has_held_out)
