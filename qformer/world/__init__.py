"""The generated-clips world (spec v1: WORLD.md, in this folder).

A procedural world of 16-frame, 128 x 128 clips with one or two coloured
shapes on a flat background, each with an exact caption and question/answer
pairs. It is the project's offline training data and its benchmark: every
caption a bridge writes about a world clip can be scored slot by slot.

A second, independent renderer of the same spec is used to test the project,
so everything WORLD.md fixes is followed literally here, and every choice the
spec leaves open is written down next to the code that makes it. One module
per part of the spec:

* `scenes`: vocabulary, geometry, rules, sampling and splits;
* `clips`: drawing a scene's frames, and MP4 files;
* `language`: captions and questions;
* `scoring`: parsing and scoring captions and answers.
"""

from .clips import read_mp4, render, render_frame, shape_mask, write_mp4
from .language import MOTION_PHRASES, NUMBER_WORDS, caption, questions
from .scenes import (
    BACKGROUNDS,
    COLOURS,
    FPS,
    FRAMES,
    HEIGHT,
    HELD_OUT,
    MOTIONS,
    MOVE_PX,
    SHAPES,
    SIZES,
    SPLITS,
    WIDTH,
    Scene,
    WorldObject,
    has_held_out,
    rule_violations,
    sample_scene,
    scene,
    split_rng,
    start_range,
)
from .scoring import SLOT_NAMES, ParsedCaption, ParsedObject, normalise, parse_caption, score_answer, score_caption

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "FPS",
    "FRAMES",
    "HEIGHT",
    "HELD_OUT",
    "MOTIONS",
    "MOTION_PHRASES",
    "MOVE_PX",
    "NUMBER_WORDS",
    "SHAPES",
    "SIZES",
    "SLOT_NAMES",
    "SPLITS",
    "WIDTH",
    "Scene",
    "WorldObject",
    "ParsedCaption",
    "ParsedObject",
    "scene",
    "sample_scene",
    "split_rng",
    "start_range",
    "rule_violations",
    "has_held_out",
    "render",
    "render_frame",
    "shape_mask",
    "write_mp4",
    "read_mp4",
    "caption",
    "questions",
    "normalise",
    "parse_caption",
    "score_caption",
    "score_answer",
]
