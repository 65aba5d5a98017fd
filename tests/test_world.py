"""Tests of the generated-clips world (qformer/world/ against qformer/world/WORLD.md)."""

from __future__ import annotations

import collections
import math
import re

import numpy as np
import pytest

from qformer import world as w
from qformer.world import Scene, WorldObject
from qformer.world.scenes import _reserved_for_test

BG = {name: np.array(rgb, dtype=np.uint8) for name, rgb in w.BACKGROUNDS.items()}
COL = {name: np.array(rgb, dtype=np.uint8) for name, rgb in w.COLOURS.items()}


def obj(shape="square", size="small", colour="red", motion="still", x=64, y=64) -> WorldObject:
    return WorldObject(shape=shape, size=size, colour=colour, motion=motion, x=x, y=y)


def painted(frame: np.ndarray, colour: str) -> np.ndarray:
    """Boolean mask of the pixels of exactly this colour."""
    r, g, b = COL[colour]
    return (frame[..., 0] == r) & (frame[..., 1] == g) & (frame[..., 2] == b)


def extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(first row, last row, first column, last column) of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[Scene]]:
    return {
        "train": [w.scene("train", i) for i in range(2000)],
        "test-iid": [w.scene("test-iid", i) for i in range(500)],
        "test-novel": [w.scene("test-novel", i) for i in range(500)],
    }


@pytest.fixture(scope="module")
def world_sample() -> list[Scene]:
    rng = np.random.default_rng(123)
    return [w.sample_scene(rng) for _ in range(3000)]


# ---------------------------------------------------------------- rendering


def test_render_shape_dtype_background_and_centre_colour():
    clip = w.render(Scene("gray", (obj("circle", colour="blue", x=40, y=70),)))
    assert clip.shape == (16, 128, 128, 3) and clip.dtype == np.uint8
    for t in (0, 7, 15):
        for r, c in ((0, 0), (0, 127), (127, 0), (127, 127)):
            assert np.array_equal(clip[t, r, c], BG["gray"])
        # the four pixels around the centre point
        for r, c in ((69, 39), (69, 40), (70, 39), (70, 40)):
            assert np.array_equal(clip[t, r, c], COL["blue"])
    # nothing but background and object colour: no antialiasing
    assert np.all(np.all(clip == BG["gray"], axis=-1) | painted(clip, "blue"))


@pytest.mark.parametrize("size,side", [("small", 20), ("large", 36)])
def test_square_is_exactly_s_by_s(size, side):
    clip = w.render(Scene("black", (obj("square", size, "green", x=40, y=50),)))
    for t in (0, 15):
        mask = painted(clip[t], "green")
        assert mask.sum() == side * side
        assert extent(mask) == (50 - side // 2, 50 + side // 2 - 1, 40 - side // 2, 40 + side // 2 - 1)


def test_circle_and_diamond_span_s_pixels():
    for shape in ("circle", "diamond"):
        mask = painted(w.render(Scene("white", (obj(shape, "small", "orange", x=30, y=90),)))[0], "orange")
        assert extent(mask) == (80, 99, 20, 39)  # S = 20 rows and columns
        assert mask[89].sum() == mask[90].sum() == 20  # full width through the centre
        box = mask[80:100, 20:40]
        assert np.array_equal(box, box[::-1]) and np.array_equal(box, box[:, ::-1])  # symmetric
    diamond = w.shape_mask("diamond", 20)
    assert np.flatnonzero(diamond[0]).tolist() == [9, 10]  # tips are two pixels wide
    circle = w.shape_mask("circle", 20)
    assert circle.sum() == pytest.approx(math.pi * 100, rel=0.03)


def test_triangle_apex_up_base_s():
    mask = painted(w.render(Scene("white", (obj("triangle", "small", "purple", x=64, y=64),)))[0], "purple")
    top, bottom, left, right = extent(mask)
    # Box rows 54..73. The apex is the top middle point of the box; the pixel
    # centres of row 54 lie 0.5 below it where the triangle is only 0.5 px
    # wide, so the first painted row is 55, two pixels straddling the apex.
    assert not mask[54].any()
    assert top == 55 and np.flatnonzero(mask[55]).tolist() == [63, 64]
    assert bottom == 73 and mask[73].sum() == 20 and (left, right) == (54, 73)  # base = S
    widths = mask[55:74].sum(axis=1)
    assert np.all(np.diff(widths) >= 0)  # widens downwards: apex up


@pytest.mark.parametrize("size,side", [("small", 20), ("large", 36)])
def test_grows_and_shrinks_sizes(size, side):
    small_end, large_end = round(0.6 * side), round(1.4 * side)
    for motion, first, last in (("grows", small_end, large_end), ("shrinks", large_end, small_end)):
        clip = w.render(Scene("black", (obj("square", size, "yellow", motion, x=64, y=64),)))
        widths = [int(painted(clip[t], "yellow").any(axis=0).sum()) for t in range(16)]
        assert widths[0] == first and widths[15] == last
        assert widths == [round((0.6 + 0.8 * t / 15) * side if motion == "grows" else (1.4 - 0.8 * t / 15) * side) for t in range(16)]
        # the centre stays put
        assert extent(painted(clip[15], "yellow"))[2] == 64 - last // 2


@pytest.mark.parametrize("motion,dx,dy", [("right", 40, 0), ("left", -40, 0), ("up", 0, -40), ("down", 0, 40)])
def test_moving_centre_travels_40px(motion, dx, dy):
    o = obj("circle", "small", "red", motion, x=64, y=64)
    clip = w.render(Scene("white", (o,)))
    centres = []
    for t in range(16):
        rows, cols = np.nonzero(painted(clip[t], "red"))
        centres.append((cols.mean(), rows.mean()))
        assert painted(clip[t], "red").sum() == w.shape_mask("circle", 20).sum()  # size unchanged
    assert centres[15][0] - centres[0][0] == pytest.approx(dx)
    assert centres[15][1] - centres[0][1] == pytest.approx(dy)
    step = centres[1][0] - centres[0][0] + centres[1][1] - centres[0][1]
    assert abs(step) == 3  # round(40 / 15) = 3: positions are whole pixels
    assert [o.centre_at(t) for t in (0, 15)] == [(64, 64), (64 + dx, 64 + dy)]


def test_second_object_is_drawn_on_top():
    square = obj("square", "large", "blue", "still", x=30, y=64)  # box columns 12..47
    circle = obj("circle", "small", "red", "left", x=70, y=64)  # frame 0: 60..79, frame 15: 20..39
    s = Scene("white", (square, circle))
    assert w.rule_violations(s) == []
    clip = w.render(s)
    assert np.array_equal(clip[0, 64, 30], COL["blue"])
    assert np.array_equal(clip[15, 64, 30], COL["red"])


# ---------------------------------------------------------------- sampling rules


def test_start_range_is_exactly_the_in_frame_positions():
    for size in w.SIZES:
        for motion in w.MOTIONS:
            x_min, x_max, y_min, y_max = w.start_range(size, motion)

            def inside(x: int, y: int, size=size, motion=motion) -> bool:
                o = obj("square", size, "red", motion, x=x, y=y)
                return all(
                    left >= 0 and top >= 0 and left + s <= 128 and top + s <= 128 for left, top, s in (o.box_at(f) for f in range(16))
                )

            assert inside(x_min, y_min) and inside(x_max, y_max)
            assert not inside(x_min - 1, y_min) and not inside(x_max + 1, y_max)
            assert not inside(x_min, y_min - 1) and not inside(x_min, y_max + 1)
    # a growing large object needs room for 1.4 S = 50 px at the end
    assert w.start_range("large", "grows") == (25, 103, 25, 103)
    assert w.start_range("small", "left") == (50, 118, 10, 118)


def test_sampled_objects_stay_inside_every_frame(world_sample):
    for s in world_sample[:150]:
        for o in s.objects:
            # every pixel of the shape's mask made it into the frame
            counts = painted(w.render(Scene(s.background, (o,))), o.colour).sum(axis=(1, 2))
            assert counts.tolist() == [w.shape_mask(o.shape, o.side_at(t)).sum() for t in range(16)]
    for s in world_sample:
        for o in s.objects:
            for t in range(16):
                left, top, side = o.box_at(t)
                assert 0 <= left and left + side <= 128 and 0 <= top and top + side <= 128


def test_sampled_scenes_obey_the_rules(world_sample):
    for s in world_sample:
        assert w.rule_violations(s) == []
        assert len(s.objects) in (1, 2)
        if len(s.objects) == 2:
            a, b = s.objects
            assert (a.shape, a.colour) != (b.shape, b.colour)
            assert a.x < b.x  # caption order: further left first
            # frame-0 boxes computed from the spec directly, not from box_at
            boxes = []
            for o in (a, b):
                side = round({"grows": 0.6, "shrinks": 1.4}.get(o.motion, 1.0) * o.side)
                boxes.append((o.x - side // 2, o.y - side // 2, side))
            (al, at, asz), (bl, bt, bsz) = boxes
            assert al + asz <= bl or bl + bsz <= al or at + asz <= bt or bt + bsz <= at


def test_rule_violations_catch_broken_scenes():
    overlapping = Scene("white", (obj(x=40, y=40), obj("circle", x=50, y=45)))
    assert any("overlap" in p for p in w.rule_violations(overlapping))
    same = Scene("white", (obj(x=20, y=20), obj(x=100, y=100)))
    assert any("share shape and colour" in p for p in w.rule_violations(same))
    same_x = Scene("white", (obj(x=40, y=20), obj("circle", x=40, y=100)))
    assert any("same x" in p for p in w.rule_violations(same_x))
    outside = Scene("white", (obj(motion="right", x=100, y=64),))
    assert any("leaves the frame" in p for p in w.rule_violations(outside))
    with pytest.raises(ValueError):
        obj(colour="pink")


def test_attributes_are_uniform(world_sample):
    def close(counter: collections.Counter, values, n: int) -> None:
        p = 1 / len(values)
        sd = math.sqrt(n * p * (1 - p))
        for v in values:
            assert abs(counter[v] - n * p) < 5 * sd, (v, counter)

    close(collections.Counter(len(s.objects) for s in world_sample), (1, 2), len(world_sample))
    close(collections.Counter(s.background for s in world_sample), tuple(w.BACKGROUNDS), len(world_sample))
    objects = [o for s in world_sample for o in s.objects]
    # colour and shape are symmetric under every rejection rule
    close(collections.Counter(o.colour for o in objects), tuple(w.COLOURS), len(objects))
    close(collections.Counter(o.shape for o in objects), w.SHAPES, len(objects))
    # size and motion change the chance of a frame-0 overlap, so rejection
    # skews them in two-object scenes; one-object scenes are never rejected
    singles = [s.objects[0] for s in world_sample if len(s.objects) == 1]
    close(collections.Counter(o.size for o in singles), tuple(w.SIZES), len(singles))
    close(collections.Counter(o.motion for o in singles), w.MOTIONS, len(singles))
    # start positions: uniform over the allowed range
    xs = [(o.x - w.start_range(o.size, o.motion)[0]) / (np.subtract(*w.start_range(o.size, o.motion)[1::-1]) + 1) for o in singles]
    assert abs(np.mean(xs) - 0.5) < 0.03


# ---------------------------------------------------------------- splits


def test_scene_is_deterministic_and_stable():
    assert w.scene("train", 5) == w.scene("train", 5)
    assert np.array_equal(w.render(w.scene("test-novel", 3)), w.render(w.scene("test-novel", 3)))
    assert w.scene("train", 0) == Scene("white", (WorldObject("diamond", "large", "red", "right", 41, 24),))
    assert w.caption(w.scene("train", 0)) == "a large red diamond moves right on a white background"
    assert w.scene("train", 1) != w.scene("train", 0)
    assert w.scene("test-iid", 0) != w.scene("train", 0)


def test_split_arguments_are_checked():
    with pytest.raises(ValueError):
        w.scene("validation", 0)
    with pytest.raises(ValueError):
        w.scene("train", -1)


def test_held_out_pairs(splits):
    assert w.HELD_OUT == {("purple", "triangle"), ("yellow", "square")}
    assert not any(w.has_held_out(s) for s in splits["train"])
    assert not any(w.has_held_out(s) for s in splits["test-iid"])
    assert all(w.has_held_out(s) for s in splits["test-novel"])
    for split in splits.values():
        assert all(w.rule_violations(s) == [] for s in split)
    # test-novel is not only the held-out object: both counts occur
    assert {len(s.objects) for s in splits["test-novel"]} == {1, 2}


def test_splits_never_share_a_clip(splits):
    train = set(splits["train"])
    # (a split may repeat a clip: it is a sequence of independent draws)
    assert train.isdisjoint(splits["test-iid"]) and train.isdisjoint(splits["test-novel"])
    assert set(splits["test-iid"]).isdisjoint(splits["test-novel"])
    # disjointness of train and test-iid holds for every index, by construction
    assert not any(_reserved_for_test(s) for s in splits["train"])
    assert all(_reserved_for_test(s) for s in splits["test-iid"])


# ---------------------------------------------------------------- captions and questions


def test_caption_matches_the_spec_example():
    s = Scene("white", (obj("circle", "small", "red", "left", x=60, y=30), obj("square", "large", "blue", "grows", x=90, y=90)))
    assert w.caption(s) == "a small red circle moves left and a large blue square grows on a white background"
    one = Scene("gray", (obj("diamond", "large", "orange", "still"),))
    assert w.caption(one) == "a large orange diamond stays still on a gray background"


def test_parse_round_trips(world_sample, splits):
    for s in world_sample[:1000] + splits["test-novel"][:100]:
        text = w.caption(s)
        assert re.fullmatch(r"[a-z ]+", text)
        expected = w.ParsedCaption.from_scene(s)
        assert w.parse_caption(text) == expected
        assert w.parse_caption("  " + text.upper() + ".  ") == expected


def test_parse_rejects_non_grammar():
    for bad in (
        "",
        "a small red circle moves left",
        "a small red circle on a white background",
        "a small red circle moves left on a white background..",
        "a tiny red circle grows on a white background",
        "a small red circle  grows on a white background",
        "small red circle grows on a white background",
        "a small red circle grows and a small red circle grows and a small red circle grows on a white background",
    ):
        assert w.parse_caption(bad) is None, bad


def test_score_caption():
    ref = "a small red circle moves left and a large blue square grows on a white background"
    full = w.score_caption(ref, ref)
    assert full["exact"] and full["correct"] == full["total"] == 10 and full["accuracy"] == 1.0
    assert full["slots"] == {"background": (1, 1), "count": (1, 1), "size": (2, 2), "colour": (2, 2), "shape": (2, 2), "motion": (2, 2)}
    # one wrong slot of each kind: (n - 1) / n
    for old, new, slot in (
        ("white", "black", "background"),
        ("blue", "green", "colour"),
        ("small red", "large red", "size"),
        ("square", "diamond", "shape"),
        ("moves left", "stays still", "motion"),
    ):
        r = w.score_caption(ref.replace(old, new), ref)
        assert not r["exact"] and r["correct"] == 9 and r["total"] == 10 and r["accuracy"] == 0.9
        assert r["slots"][slot][0] == r["slots"][slot][1] - 1
    assert w.score_caption(ref.replace("white", "gray"), ref)["slots"]["background"] == (0, 1)
    normalised = w.score_caption("  A small red circle moves left and a large blue square grows on a WHITE background.", ref)
    assert not normalised["exact"] and normalised["accuracy"] == 1.0
    junk = w.score_caption("a red thing", ref)
    assert not junk["exact"] and junk["correct"] == 0 and junk["total"] == 10
    fewer = w.score_caption("a small red circle moves left on a white background", ref)
    assert fewer["correct"] == 5 and fewer["slots"]["count"] == (0, 1) and fewer["slots"]["size"] == (1, 2)
    one_ref = "a small red circle moves left on a white background"
    extra = w.score_caption(ref, one_ref)  # the extra object adds no slots, it costs the count
    assert extra["total"] == 6 and extra["correct"] == 5 and extra["slots"]["count"] == (0, 1)
    with pytest.raises(ValueError):
        w.score_caption(ref, "not a caption")


def test_score_answer():
    assert w.score_answer("Red.", "red")
    assert w.score_answer("  two ", "two")
    assert w.score_answer("moves left", "moves left")
    assert not w.score_answer("blue", "red")
    assert not w.score_answer("red circle", "red")


def test_questions_single_object():
    s = Scene("black", (obj("triangle", "large", "green", "up", x=64, y=80),))
    assert w.questions(s) == [
        ("what color is the background?", "black"),
        ("how many objects are there?", "one"),
        ("what color is the triangle?", "green"),
        ("what shape is the green object?", "triangle"),
        ("what does the green triangle do?", "moves up"),
        ("is the green triangle small or large?", "large"),
    ]


def test_questions_only_where_applicable():
    same_shape = Scene("white", (obj("circle", "small", "red", x=20, y=20), obj("circle", "large", "blue", "shrinks", x=90, y=90)))
    qa = dict(w.questions(same_shape))
    assert not any(q.startswith("what color is the circle") for q in qa)
    assert qa["what shape is the red object?"] == "circle" and qa["what shape is the blue object?"] == "circle"
    assert qa["what does the blue circle do?"] == "shrinks" and qa["is the red circle small or large?"] == "small"
    assert qa["how many objects are there?"] == "two" and len(qa) == 2 + 2 + 2 + 2

    same_colour = Scene("white", (obj("circle", colour="red", x=20, y=20), obj("square", colour="red", x=90, y=90)))
    qa = dict(w.questions(same_colour))
    assert not any(q.startswith("what shape is") for q in qa)
    assert qa["what color is the circle?"] == "red" and qa["what color is the square?"] == "red"
    assert len(qa) == 2 + 2 + 2 + 2


def test_questions_follow_the_templates(world_sample):
    templates = [
        (r"what color is the background\?", set(w.BACKGROUNDS)),
        (r"how many objects are there\?", {"one", "two"}),
        (r"what color is the (circle|square|triangle|diamond)\?", set(w.COLOURS)),
        (r"what shape is the (red|green|blue|yellow|purple|orange) object\?", set(w.SHAPES)),
        (r"what does the [a-z]+ [a-z]+ do\?", set(w.MOTION_PHRASES.values())),
        (r"is the [a-z]+ [a-z]+ small or large\?", set(w.SIZES)),
    ]
    for s in world_sample[:500]:
        qa = w.questions(s)
        assert len({q for q, _ in qa}) == len(qa)  # no question twice
        for q, a in qa:
            assert sum(bool(re.fullmatch(t, q)) and a in answers for t, answers in templates) == 1, (q, a)


# ---------------------------------------------------------------- video files


def test_write_mp4_round_trip(tmp_path):
    import av

    s = Scene("gray", (obj("triangle", "small", "purple", "right", x=30, y=40), obj("diamond", "large", "yellow", "shrinks", x=80, y=80)))
    clip = w.render(s)
    path = tmp_path / "clip.mp4"
    w.write_mp4(clip, path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 8
    decoded = w.read_mp4(path)
    assert decoded.shape == (16, 128, 128, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - clip.astype(int)).mean() < 3
