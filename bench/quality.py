"""How good is a bridge? Held-out world captions and VQA, and easy-VQA test accuracy.

    python -m bench.quality [--bridge DIR] [--world N] [--easy-vqa N] [--splits S,S] [--captions-only]
                            [--num-beams NB] [--json FILE]

World sets: the first N clips of `test-iid` and of `test-novel` (unseen colour-shape pairs), scored
slot by slot as WORLD.md says; world VQA: every applicable WORLD.md question about those clips;
easy-VQA: the first N questions of its test split (all 9673 with --easy-vqa 0). `--splits
train,test-iid` compares a bridge on the clips it trained on (`demos/world_data.py` writes the first
`train` clips) with held-out ones: if it scores its own clips no better, it underfits, and more
clips would not help it. A caption-first bridge answers as it always does (Bridge.ask): after its own
caption of the clip; for two-object questions the bench also says how often that caption (as the caption
set above got it) implies the right answer, and how often the answer is right when it does.
`--num-beams NB` decodes every caption and answer by beam search (Bridge.caption), greedy by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from qformer import Bridge, world
from qformer.bridge import DEFAULT_BRIDGE


def batched(items, n):
    for i in range(0, len(items), n):
        yield items[i : i + n]


OBJECT_SLOTS = ("size", "colour", "shape", "motion")


def counts() -> defaultdict:
    """Counts of [right, asked] by key."""
    return defaultdict(lambda: [0, 0])


def rates(tallies: dict) -> dict:
    return {k: c / t for k, (c, t) in tallies.items() if t}


def swapped(pred: str, ref: str) -> bool:
    """Does a caption of a two-object clip name the objects in the wrong order?

    True when more of the objects' slots match with the prediction's two objects taken the other way
    round. WORLD.md scores objects in order (the leftmost first), so a swap scores each object against
    the other one even when both are described right.
    """
    p, r = world.parse_caption(pred), world.parse_caption(ref)
    if p is None or r is None or len(p.objects) != 2 or len(r.objects) != 2:
        return False

    def matches(objects):
        return sum(getattr(a, k) == getattr(b, k) for a, b in zip(objects, r.objects) for k in OBJECT_SLOTS)

    return matches(p.objects[::-1]) > matches(p.objects)


def crossed(pred: str, ref: str) -> dict[str, int]:
    """Of a two-object caption in the right order: per object slot, how many of its two objects have the
    other object's value there (a colour, shape, motion or size bound to the wrong object, rather than
    misread). Empty for a caption that does not name two objects or names them the wrong way round."""
    p, r = world.parse_caption(pred), world.parse_caption(ref)
    if p is None or r is None or len(p.objects) != 2 or len(r.objects) != 2 or swapped(pred, ref):
        return {}
    return {
        k: sum(getattr(got, k) == getattr(other, k) != getattr(want, k) for got, want, other in zip(p.objects, r.objects, r.objects[::-1]))
        for k in OBJECT_SLOTS
    }


# WORLD.md names the object whose centre is further left in frame 0 first. Centres closer in x than this
# (one token of an 8 x 8 grid over the clip's 128 px) leave the order, and which features are whose
# object, to less than one token of such a grid.
CLOSE_PX = 16


def closeness(scene: world.Scene) -> str:
    """ "close" or "apart": how far apart in x a two-object clip's centres are in frame 0."""
    (x0, _), (x1, _) = (o.centre_at(0) for o in scene.objects)
    return "close" if abs(x1 - x0) < CLOSE_PX else "apart"


def world_captions(bridge: Bridge, split: str, n: int, batch_size: int, num_beams: int = 1) -> tuple[dict, list[str]]:
    """The scores of the bridge's captions of the first `n` clips of `split`, and the captions."""
    scenes = [world.scene(split, i) for i in range(n)]
    # Also by object count: one-object clips have no object order to get wrong, so a slot the bridge
    # cannot read shows plainly; two-object clips show what the order costs.
    totals, by_count = counts(), {1: counts(), 2: counts()}
    exact = correct = total = swaps = 0
    crossings = dict.fromkeys(OBJECT_SLOTS, 0)
    by_closeness = {k: {"clips": 0, "right": 0, "slots": 0, "swaps": 0} for k in ("close", "apart")}
    captions = []
    for chunk in batched(scenes, batch_size):
        preds = bridge.caption([world.render(s) for s in chunk], batch_size=batch_size, num_beams=num_beams)
        captions += preds
        for s, pred in zip(chunk, preds):
            ref = world.caption(s)
            score = world.score_caption(pred, ref)
            exact += score["exact"]
            correct += score["correct"]
            total += score["total"]
            swap = swapped(pred, ref)
            swaps += swap
            for k, n_crossed in crossed(pred, ref).items():
                crossings[k] += n_crossed
            if len(s.objects) == 2:
                group = by_closeness[closeness(s)]
                group["clips"] += 1
                group["right"] += score["correct"]
                group["slots"] += score["total"]
                group["swaps"] += swap
            for slot, (c, t) in score["slots"].items():
                for tally in (totals, by_count[len(s.objects)]):
                    tally[slot][0] += c
                    tally[slot][1] += t
    one, two = by_count[1], by_count[2]
    return {
        "clips": n,
        "exact_match": exact / n,
        "slot_accuracy": correct / total,
        "per_slot": rates(totals),
        "one_object_clips": one["background"][1],
        "one_object_per_slot": rates(one),
        "two_object_clips": two["background"][1],
        "two_object_per_slot": rates(two),
        "two_object_swapped": swaps / two["background"][1] if two["background"][1] else 0.0,
        # Per slot: the share of two-object clips' objects given the other object's value (in captions in
        # the right order), as against a value neither object has, which shows in per_slot alone.
        "two_object_crossed": {k: n / (2 * two["background"][1]) for k, n in crossings.items()} if two["background"][1] else {},
        **{
            f"two_object_{k}": {
                "clips": g["clips"],
                "slot_accuracy": g["right"] / g["slots"] if g["slots"] else None,
                "swapped": g["swaps"] / g["clips"] if g["clips"] else None,
            }
            for k, g in by_closeness.items()
        },
    }, captions


def question_slot(question: str) -> str:
    """The caption slot a WORLD.md question asks about (so the background's colour is not an object's)."""
    if question == "what color is the background?":
        return "background"
    for start, slot in (
        ("how many", "count"),
        ("what color", "colour"),
        ("what shape", "shape"),
        ("what does", "motion"),
        ("is the", "size"),
    ):
        if question.startswith(start):
            return slot
    raise ValueError(f"not a WORLD.md question: {question!r}")


def other_object_answers(scene: world.Scene) -> dict[str, str]:
    """For a two-object clip: each question about one object, with the answer it has about the other
    one, where that differs (so an answer that names the wrong object can be told from a wrong reading)."""
    if len(scene.objects) != 2:
        return {}
    wrong = {}
    for o, other in zip(scene.objects, scene.objects[::-1]):
        wrong[f"what color is the {o.shape}?"] = other.colour
        wrong[f"what shape is the {o.colour} object?"] = other.shape
        wrong[f"what does the {o.colour} {o.shape} do?"] = world.MOTION_PHRASES[other.motion]
        wrong[f"is the {o.colour} {o.shape} small or large?"] = other.size
    return {q: wrong[q] for q, a in world.questions(scene) if q in wrong and wrong[q] != a}


def caption_answers(caption: str) -> dict[str, str]:
    """The answers a caption implies to the WORLD.md questions: those of the scene it describes, so none
    for an object it does not name (and none at all when it does not parse)."""
    parsed = world.parse_caption(caption)
    return dict(world.questions(parsed)) if parsed is not None else {}  # a parsed caption reads as a scene


def world_vqa(bridge: Bridge, split: str, n: int, batch_size: int, captions: list[str], num_beams: int = 1) -> dict:
    """`captions`: the bridge's captions of the same clips, to tell an answer that follows a wrong caption
    from a wrong answer after a right one. A caption-first bridge answers after them, as Bridge.ask would
    after captioning each clip again for each question (the same decoding), in half the time."""
    items = []
    for i in range(n):
        s = world.scene(split, i)
        frames, other, implied = world.render(s), other_object_answers(s), caption_answers(captions[i])
        history = [(bridge.config.caption_prompt, captions[i])] if bridge.config.caption_first else []
        items += [(frames, q, a, len(s.objects), other.get(q), implied.get(q), history) for q, a in world.questions(s)]
    # Also by object count, as for captions: a question about one of two objects must find the object
    # it names before it can answer; and how often it answers about the other object instead.
    by_kind, by_count, about_other = counts(), {1: counts(), 2: counts()}, counts()
    caption_right, right_after_right_caption = counts(), counts()
    for chunk in batched(items, batch_size):
        preds = bridge.ask([item[0] for item in chunk], [item[1] for item in chunk], [item[-1] for item in chunk], num_beams=num_beams)
        for (_, q, a, objects, other, implied, _), pred in zip(chunk, preds):
            kind, right = question_slot(q), world.score_answer(pred, a)
            for tally in (by_kind, by_count[objects]):
                tally[kind][0] += right
                tally[kind][1] += 1
            if other is not None:
                about_other[kind][0] += world.score_answer(pred, other)
                about_other[kind][1] += 1
            if objects == 2 and kind not in ("background", "count"):
                good = implied is not None and world.score_answer(implied, a)
                caption_right[kind][0] += good
                caption_right[kind][1] += 1
                if good:
                    right_after_right_caption[kind][0] += right
                    right_after_right_caption[kind][1] += 1
    right = sum(c for c, _ in by_kind.values())
    result = {"questions": len(items), "accuracy": right / len(items), "per_slot": rates(by_kind)}
    for objects, name in ((1, "one_object"), (2, "two_object")):
        tally = by_count[objects]
        result[f"{name}_questions"] = sum(t for _, t in tally.values())
        result[f"{name}_per_slot"] = rates(tally)
    result["two_object_about_the_other"] = rates(about_other)
    result["two_object_caption_implies_right"] = rates(caption_right)
    result["two_object_right_when_caption_right"] = rates(right_after_right_caption)
    return result


EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_kind(question: str, answer: str) -> str:
    """What an easy-VQA question asks: the shape, the colour, or yes/no, apart from yes/no with a negation
    ("is there not a red shape?", "is no red shape present?"), where the answer is the other way round."""
    if answer in ("yes", "no"):
        return "yes/no negated" if {"not", "no"} & set(question.rstrip("?").split()) else "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "colour"


def easy_vqa(bridge: Bridge, n: int, batch_size: int, num_beams: int = 1) -> dict:
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    items = list(zip(questions, answers, image_ids))[: n or None]
    # A caption-first bridge captions each image once, not once per question (about ten questions an
    # image): Bridge.ask after that caption answers as it would after captioning the image itself.
    histories = {}
    if bridge.config.caption_first:
        images = list(dict.fromkeys(i for _, _, i in items))
        captions = bridge.caption([paths[i] for i in images], batch_size=batch_size, num_beams=num_beams)
        histories = {i: [(bridge.config.caption_prompt, c)] for i, c in zip(images, captions)}
    # For yes/no questions also how often "yes" is the answer and how often the bridge says it: a bridge
    # that leans one way shows it.
    by_kind, yes_answers, said_yes = counts(), 0, 0
    for chunk in batched(items, batch_size):
        preds = bridge.ask(
            [paths[i] for _, _, i in chunk], [q for q, _, _ in chunk], [histories.get(i, []) for _, _, i in chunk], num_beams=num_beams
        )
        for p, (q, a, _) in zip(preds, chunk):
            kind = easy_vqa_kind(q, a)
            by_kind[kind][0] += world.score_answer(p, a)
            by_kind[kind][1] += 1
            yes_answers += a == "yes"
            said_yes += kind.startswith("yes/no") and world.score_answer(p, "yes")
    right = sum(c for c, _ in by_kind.values())
    asked = sum(t for kind, (_, t) in by_kind.items() if kind.startswith("yes/no"))
    return {
        "questions": len(items),
        "accuracy": right / len(items),
        "per_kind": rates(by_kind),
        "yes_no_questions": asked,
        "yes_answers": yes_answers / asked if asked else 0.0,
        "said_yes": said_yes / asked if asked else 0.0,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bridge", default=str(DEFAULT_BRIDGE), help="bridge directory (default: the shipped demo bridge)")
    ap.add_argument("--world", type=int, default=200, help="clips per world split")
    ap.add_argument("--easy-vqa", type=int, default=2000, help="easy-VQA test questions (0 = all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--splits",
        type=lambda v: v.split(","),
        default=["test-iid", "test-novel"],
        metavar="S,S",
        help=f"world splits to score, of {', '.join(world.SPLITS)} (default test-iid,test-novel)",
    )
    ap.add_argument(
        "--captions-only", action="store_true", help="world captions alone (what a recaptioner writes): no world VQA, no easy-VQA"
    )
    ap.add_argument("--num-beams", type=int, default=1, metavar="NB", help="beam search over NB beams (default 1: greedy)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.num_beams < 1:
        ap.error(f"--num-beams must be at least 1, got {args.num_beams}")
    if unknown := [s for s in args.splits if s not in world.SPLITS]:
        ap.error(f"--splits: unknown world split {', '.join(unknown)}; expected some of {', '.join(world.SPLITS)}")
    if not Path(args.bridge).is_dir():
        sys.exit(f"{args.bridge}: no bridge there; pass --bridge DIR (a directory written by Bridge.save_pretrained)")
    bridge = Bridge.from_pretrained(args.bridge).eval()
    print(f"bridge: {args.bridge}" + (" (answers caption-first)" if bridge.config.caption_first else ""))
    print(f"command: python -m bench.quality {' '.join(argv if argv is not None else sys.argv[1:])}")
    results, captions, t0 = {}, {}, time.time()
    for split in args.splits:
        r, captions[split] = world_captions(bridge, split, args.world, args.batch_size, args.num_beams)
        results[f"world {split} captions"] = r
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_slot"].items())
        print(
            f"world {split:10s} captions: exact {r['exact_match']:.3f}  slot accuracy {r['slot_accuracy']:.3f}  ({per}; {r['clips']} clips)"
        )
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["one_object_per_slot"].items())
        print(f"{'':>28}one object: {per}; {r['one_object_clips']} clips")
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["two_object_per_slot"].items())
        print(
            f"{'':>28}two objects: {per}; {r['two_object_clips']} clips, {r['two_object_swapped']:.3f} of them captioned in the wrong order"
        )
        parts = [
            f"{'under' if k == 'close' else 'at least'} {CLOSE_PX} px: "
            + (
                f"slot accuracy {g['slot_accuracy']:.3f}, {g['swapped']:.3f} in the wrong order; {g['clips']} clips"
                if g["clips"]
                else "no clips"
            )
            for k, g in ((k, r[f"two_object_{k}"]) for k in ("close", "apart"))
        ]
        print(f"{'':>28}two objects, centres apart in x in frame 0 by {parts[0]}; by {parts[1]}")
        if r["two_object_crossed"]:
            per = ", ".join(f"{k} {v:.3f}" for k, v in r["two_object_crossed"].items())
            print(f"{'':>28}two objects given the other object's value (captions in the right order): {per}")
    for split in [] if args.captions_only else args.splits:
        r = results[f"world {split} vqa"] = world_vqa(bridge, split, args.world, args.batch_size, captions[split], args.num_beams)
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_slot"].items())
        print(f"world {split:10s} VQA: accuracy {r['accuracy']:.3f}  ({per}; {r['questions']} questions)")
        for name, label in (("one_object", "one object"), ("two_object", "two objects")):
            per = ", ".join(f"{k} {v:.3f}" for k, v in r[f"{name}_per_slot"].items())
            print(f"{'':>23}{label}: {per}; {r[f'{name}_questions']} questions")
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["two_object_about_the_other"].items())
        print(f"{'':>23}two objects, answered about the other object: {per or 'no such questions'}")
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["two_object_caption_implies_right"].items())
        print(f"{'':>23}two objects, its caption implies the right answer: {per or 'no such questions'}")
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["two_object_right_when_caption_right"].items())
        print(f"{'':>23}two objects, answers right when it does: {per or 'no such questions'}")
    if not args.captions_only:
        r = results["easy-vqa test"] = easy_vqa(bridge, args.easy_vqa, args.batch_size, args.num_beams)
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_kind"].items())
        print(f"easy-VQA test: accuracy {r['accuracy']:.3f}  ({per}; {r['questions']} questions)")
        print(
            f"{'':>15}yes/no: the answer is yes for {r['yes_answers']:.3f} of {r['yes_no_questions']}, "
            f"the bridge says yes to {r['said_yes']:.3f}"
        )
    print(f"time: {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
