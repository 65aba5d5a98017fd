"""Captions that differ from a scene's own in exactly one slot: what a matching head must tell apart.

A scene's caption with one object's size, colour, shape or motion, or the background, changed to another
value. Such a caption is a hard negative for the clip: every other word still fits it. Training a scorer
with them (train.py reads a manifest's `negatives` column) and measuring it (bench.matching) both use them.
"""

from __future__ import annotations

import random
from dataclasses import replace

from .language import caption
from .scenes import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, SIZES, Scene

# The slots of one object that a change may touch, with the values each may take.
OBJECT_SLOTS = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": tuple(SHAPES), "motion": tuple(MOTIONS)}
# Every kind of change, as bench.matching reports them.
CHANGED_SLOTS = (*OBJECT_SLOTS, "background")


def one_slot_changes(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(slot, caption) for each object's size, colour, shape and motion and for the background, each slot
    changed to another value drawn by `rng`; objects keep their caption order, so only that slot's word differs
    from the scene's caption."""
    out = []
    for i, obj in enumerate(scene.objects):
        for slot, values in OBJECT_SLOTS.items():
            value = rng.choice([v for v in values if v != getattr(obj, slot)])
            objects = list(scene.objects)
            objects[i] = replace(obj, **{slot: value})
            out.append((slot, caption(replace(scene, objects=tuple(objects)))))
    background = rng.choice([b for b in BACKGROUNDS if b != scene.background])
    out.append(("background", caption(replace(scene, background=background))))
    return out
