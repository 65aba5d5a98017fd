"""The world's language: the exact caption of a scene and its question/answer pairs (WORLD.md's grammar
and templates)."""

from __future__ import annotations

from .scenes import Scene

MOTION_PHRASES: dict[str, str] = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "grows": "grows",
    "shrinks": "shrinks",
    "still": "stays still",
}
NUMBER_WORDS = {1: "one", 2: "two"}


def _object_phrase(size: str, colour: str, shape: str, motion: str) -> str:
    return f"a {size} {colour} {shape} {MOTION_PHRASES[motion]}"


def caption(scene: Scene) -> str:
    """The exact caption, e.g.
    'a small red circle moves left and a large blue square grows on a white background'."""
    phrases = [_object_phrase(o.size, o.colour, o.shape, o.motion) for o in scene.objects]
    return " and ".join(phrases) + f" on a {scene.background} background"


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every applicable (question, answer) pair, in the table's template order
    and, within a template, in caption order."""
    objs = scene.objects
    qa: list[tuple[str, str]] = [
        ("what color is the background?", scene.background),
        ("how many objects are there?", NUMBER_WORDS[len(objs)]),
    ]
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    qa += [(f"what color is the {o.shape}?", o.colour) for o in objs if shapes.count(o.shape) == 1]
    qa += [(f"what shape is the {o.colour} object?", o.shape) for o in objs if colours.count(o.colour) == 1]
    # (colour, shape) is unique within a legal scene, so these always apply.
    qa += [(f"what does the {o.colour} {o.shape} do?", MOTION_PHRASES[o.motion]) for o in objs]
    qa += [(f"is the {o.colour} {o.shape} small or large?", o.size) for o in objs]
    return qa
