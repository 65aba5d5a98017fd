"""Parsing a caption with WORLD.md's grammar and scoring captions and answers against the reference
("Scoring a caption")."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .language import MOTION_PHRASES
from .scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene


@dataclass(frozen=True)
class ParsedObject:
    """The caption slots of one object (motion is the key of MOTION_PHRASES)."""

    size: str
    colour: str
    shape: str
    motion: str


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says: positions are not part of the grammar."""

    background: str
    objects: tuple[ParsedObject, ...]

    @classmethod
    def from_scene(cls, scene: Scene) -> ParsedCaption:
        return cls(
            scene.background,
            tuple(ParsedObject(o.size, o.colour, o.shape, o.motion) for o in scene.objects),
        )


def _alternatives(words: Iterable[str]) -> str:
    return "|".join(re.escape(w) for w in words)


_PHRASE_TO_MOTION = {phrase: motion for motion, phrase in MOTION_PHRASES.items()}
_OBJECT_RE = f"a ({_alternatives(SIZES)}) ({_alternatives(COLOURS)}) ({_alternatives(SHAPES)}) ({_alternatives(_PHRASE_TO_MOTION)})"
_CAPTION_RE = re.compile(f"{_OBJECT_RE}(?: and {_OBJECT_RE})? on a ({_alternatives(BACKGROUNDS)}) background")


def normalise(text: str) -> str:
    """Lower case, surrounding whitespace trimmed, one final full stop removed."""
    text = text.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def parse_caption(text: str) -> ParsedCaption | None:
    """Parse a caption with the grammar (after `normalise`); None if it does
    not parse. Inside the caption the grammar is strict (single spaces)."""
    m = _CAPTION_RE.fullmatch(normalise(text))
    if m is None:
        return None
    g = m.groups()
    objects = [ParsedObject(g[0], g[1], g[2], _PHRASE_TO_MOTION[g[3]])]
    if g[4] is not None:
        objects.append(ParsedObject(g[4], g[5], g[6], _PHRASE_TO_MOTION[g[7]]))
    return ParsedCaption(g[8], tuple(objects))


SLOT_NAMES: tuple[str, ...] = ("background", "count", "size", "colour", "shape", "motion")


def score_caption(pred: str, ref: str) -> dict:
    """Score a predicted caption against a reference caption.

    Returns {"exact": bool, "correct": int, "total": int, "accuracy": float,
    "slots": {slot: (correct, total)}}. `exact` compares the raw strings.
    The reference has 2 + 4 n slots: background, count and, per reference
    object matched in order, size, colour, shape and motion. A prediction
    that does not parse scores 0 on every slot; reference objects the
    prediction lacks score 0; extra predicted objects add no slots (they
    only cost the count slot).
    """
    parsed_ref = parse_caption(ref)
    if parsed_ref is None:
        raise ValueError(f"reference caption does not parse: {ref!r}")
    n = len(parsed_ref.objects)
    totals = {"background": 1, "count": 1, "size": n, "colour": n, "shape": n, "motion": n}
    correct = dict.fromkeys(SLOT_NAMES, 0)
    parsed = parse_caption(pred)
    if parsed is not None:
        correct["background"] = int(parsed.background == parsed_ref.background)
        correct["count"] = int(len(parsed.objects) == n)
        for p, r in zip(parsed.objects, parsed_ref.objects):
            for slot in ("size", "colour", "shape", "motion"):
                correct[slot] += int(getattr(p, slot) == getattr(r, slot))
    total = sum(totals.values())
    right = sum(correct.values())
    return {
        "exact": pred == ref,
        "correct": right,
        "total": total,
        "accuracy": right / total,
        "slots": {slot: (correct[slot], totals[slot]) for slot in SLOT_NAMES},
    }


def score_answer(pred: str, ref: str) -> bool:
    """VQA accuracy for one answer: exact match after `normalise`."""
    return normalise(pred) == normalise(ref)
