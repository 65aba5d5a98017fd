"""bench/quality.py end to end on a tiny bridge: every figure is computed and well-formed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from bench import quality
from qformer import Bridge, world

pytestmark = pytest.mark.backbones  # reads the easy-VQA test split from its package


def test_quality_bench_runs_and_reports_every_score(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "b")
    results = quality.main(["--bridge", str(tmp_path / "b"), "--world", "2", "--easy-vqa", "5", "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    for key in ("world test-iid captions", "world test-novel captions", "world test-iid vqa", "world test-novel vqa", "easy-vqa test"):
        assert key in results
    iid = results["world test-iid captions"]
    assert iid["clips"] == 2 and 0.0 <= iid["slot_accuracy"] <= 1.0
    assert set(iid["per_slot"]) >= {"background", "count", "size", "colour", "shape", "motion"}
    assert [len(world.scene("test-iid", i).objects) for i in range(2)] == [1, 1]  # so both count as one-object clips
    assert iid["one_object_clips"] == 2
    assert set(iid["one_object_per_slot"]) == {"background", "count", "size", "colour", "shape", "motion"}
    assert "one object:" in printed
    assert iid["two_object_clips"] == 0 and iid["two_object_swapped"] == 0.0 and "two objects:" in printed
    assert iid["two_object_crossed"] == {}
    crossings = results["world test-novel captions"]["two_object_crossed"]  # one two-object clip: 0, 0.5 or 1 per slot
    assert set(crossings) == {"size", "colour", "shape", "motion"} and set(crossings.values()) <= {0.0, 0.5, 1.0}
    vqa = results["world test-iid vqa"]
    assert vqa["one_object_questions"] == vqa["questions"] == sum(len(world.questions(world.scene("test-iid", i))) for i in range(2))
    assert vqa["two_object_questions"] == 0 and vqa["two_object_per_slot"] == {}
    assert set(vqa["one_object_per_slot"]) == {"background", "count", "size", "colour", "shape", "motion"}
    novel = results["world test-novel vqa"]  # its first clip has two objects, its second one
    assert [len(world.scene("test-novel", i).objects) for i in range(2)] == [2, 1]
    assert novel["two_object_questions"] == len(world.questions(world.scene("test-novel", 0)))
    assert novel["one_object_questions"] == len(world.questions(world.scene("test-novel", 1)))
    assert "two objects:" in printed.split("world test-novel VQA")[1]
    # Its two-object clip falls in one group by how far apart in x its centres are in frame 0.
    (x0, _), (x1, _) = (o.centre_at(0) for o in world.scene("test-novel", 0).objects)
    group, other = ("close", "apart") if abs(x1 - x0) < 16 else ("apart", "close")
    captions = results["world test-novel captions"]
    assert captions[f"two_object_{group}"]["clips"] == 1 and 0.0 <= captions[f"two_object_{group}"]["slot_accuracy"] <= 1.0
    assert captions[f"two_object_{other}"] == {"clips": 0, "slot_accuracy": None, "swapped": None}
    assert iid["two_object_close"]["clips"] == iid["two_object_apart"]["clips"] == 0
    assert "centres apart in x in frame 0 by under 16 px" in printed
    asked = {quality.question_slot(q) for q in quality.other_object_answers(world.scene("test-novel", 0))}
    assert asked and set(novel["two_object_about_the_other"]) == asked
    assert vqa["two_object_about_the_other"] == {}  # no two-object clip among test-iid's first two
    assert "answered about the other object: no such questions" in printed.split("world test-novel VQA")[0]
    # A random bridge's captions do not parse, so they imply no answer, and no answer follows a right one.
    asked = {quality.question_slot(q) for q, _ in world.questions(world.scene("test-novel", 0))} - {"background", "count"}
    assert novel["two_object_caption_implies_right"] == dict.fromkeys(asked, 0.0)
    assert novel["two_object_right_when_caption_right"] == {}
    assert "its caption implies the right answer: no such questions" in printed.split("world test-novel VQA")[0]
    easy = results["easy-vqa test"]
    assert easy["questions"] == 5
    # The split's first five: shape, colour, colour, "does the image contain a circle?" (no), "is there not
    # a black shape in the image?" (yes).
    assert set(easy["per_kind"]) == {"shape", "colour", "yes/no", "yes/no negated"}
    assert easy["yes_no_questions"] == 2 and easy["yes_answers"] == 0.5 and easy["said_yes"] in (0.0, 0.5, 1.0)
    assert "the answer is yes for 0.500 of 2" in printed
    assert "slot accuracy" in printed and (tmp_path / "r.json").exists()


def test_each_world_question_is_scored_under_the_slot_it_asks_about():
    question_slot = quality.question_slot
    qa = dict(world.questions(world.scene("test-iid", 2)))  # two objects: every template that applies
    slots = {q: question_slot(q) for q in qa}
    assert slots["what color is the background?"] == "background"
    assert slots["how many objects are there?"] == "count"
    assert {question_slot(q) for q in qa} == {"background", "count", "colour", "shape", "motion", "size"}
    assert all(slot == "colour" for q, slot in slots.items() if q.startswith("what color is the") and q != "what color is the background?")
    with pytest.raises(ValueError, match="not a WORLD.md question"):
        question_slot("why is the sky blue?")


def test_a_two_object_caption_in_the_wrong_order_is_counted_as_swapped():
    swapped = quality.swapped
    ref = "a small red circle moves left and a large blue square grows on a white background"
    other_way = "a large blue square grows and a small red circle moves left on a white background"
    assert world.score_caption(other_way, ref)["slots"]["colour"] == (0, 2)  # scored in order: both wrong
    assert swapped(other_way, ref)
    assert not swapped(ref, ref)
    # One slot wrong each way round is no swap; the other way round must match more.
    assert not swapped("a small blue circle moves left and a large red square grows on a white background", ref)
    assert swapped("a large blue square grows and a small green circle moves left on a white background", ref)
    assert not swapped("a small red circle moves left on a white background", ref)  # one object named
    assert not swapped("two things on white", ref)  # does not parse


def test_a_slot_bound_to_the_other_object_is_counted_as_crossed_and_a_misread_one_is_not():
    crossed = quality.crossed
    ref = "a small red circle moves left and a large blue square grows on a white background"
    none = {"size": 0, "colour": 0, "shape": 0, "motion": 0}
    assert crossed(ref, ref) == none
    # The colours the other way round: both objects have the other's.
    assert crossed("a small blue circle moves left and a large red square grows on a white background", ref) == none | {"colour": 2}
    # The first object's motion is the second's; the second's is neither object's, a misread.
    assert crossed("a small red circle grows and a large blue square shrinks on a white background", ref) == none | {"motion": 1}
    # Where both objects have the same value (large), keeping it is right, not crossed.
    same_size = "a large red circle moves left and a large blue square grows on a white background"
    assert crossed("a large blue circle moves left and a large blue square grows on a white background", same_size) == none | {"colour": 1}
    # A swapped caption counts as a swap, not as crossings; a one-object caption or nonsense counts as neither.
    assert crossed("a large blue square grows and a small red circle moves left on a white background", ref) == {}
    assert crossed("a small red circle moves left on a white background", ref) == {}
    assert crossed("two things on white", ref) == {}


def test_easy_vqa_questions_are_told_apart_by_what_they_ask():
    kind = quality.easy_vqa_kind
    assert kind("what shape is in the image?", "circle") == "shape"
    assert kind("what is the blue shape?", "rectangle") == "shape"
    assert kind("what color is the shape?", "teal") == "colour"
    assert kind("is there a red shape?", "no") == "yes/no"
    assert kind("does the image contain a circle?", "yes") == "yes/no"
    assert kind("is there not a red shape?", "yes") == "yes/no negated"
    assert kind("is no gray shape present?", "yes") == "yes/no negated"
    assert kind("does the image not contain a black shape?", "no") == "yes/no negated"


def test_the_training_split_can_be_scored_beside_a_held_out_one(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "b")
    results = quality.main(["--bridge", str(tmp_path / "b"), "--world", "1", "--easy-vqa", "1", "--splits", "train,test-iid"])
    assert {k for k in results if k.startswith("world")} == {
        "world train captions",
        "world test-iid captions",
        "world train vqa",
        "world test-iid vqa",
    }
    assert results["world train vqa"]["questions"] == len(world.questions(world.scene("train", 0)))
    with pytest.raises(SystemExit):
        quality.main(["--bridge", str(tmp_path / "b"), "--splits", "train,val"])
    assert "unknown world split val" in capsys.readouterr().err


RED_DIAMOND = world.WorldObject(shape="diamond", size="small", colour="red", motion="right", x=14, y=101)
BLUE_SQUARE = world.WorldObject(shape="square", size="small", colour="blue", motion="right", x=52, y=50)
BLUE_DIAMOND = world.WorldObject(shape="diamond", size="large", colour="blue", motion="grows", x=14, y=101)


@pytest.mark.parametrize(
    "objects, expected",
    [
        # Same size and motion: an answer naming the other object's would be right, so those are left out.
        (
            (RED_DIAMOND, BLUE_SQUARE),
            {
                "what color is the diamond?": "blue",
                "what color is the square?": "red",
                "what shape is the red object?": "square",
                "what shape is the blue object?": "diamond",
            },
        ),
        # Both blue: `what shape is the blue object?` is not asked, and the other's colour is no wrong answer.
        (
            (BLUE_DIAMOND, BLUE_SQUARE),
            {
                "what does the blue diamond do?": "moves right",
                "what does the blue square do?": "grows",
                "is the blue diamond small or large?": "small",
                "is the blue square small or large?": "large",
            },
        ),
        ((RED_DIAMOND,), {}),
    ],
)
def test_a_question_about_one_of_two_objects_knows_the_other_objects_answer(objects, expected):
    other_object_answers = quality.other_object_answers
    assert other_object_answers(world.Scene("black", objects)) == expected


def test_a_caption_implies_the_answers_of_the_scene_it_describes():
    caption_answers = quality.caption_answers
    assert caption_answers("a small red circle moves left and a large blue square grows on a white background") == {
        "what color is the background?": "white",
        "how many objects are there?": "two",
        "what color is the circle?": "red",
        "what color is the square?": "blue",
        "what shape is the red object?": "circle",
        "what shape is the blue object?": "square",
        "what does the red circle do?": "moves left",
        "what does the blue square do?": "grows",
        "is the red circle small or large?": "small",
        "is the blue square small or large?": "large",
    }
    # Two red objects: no question asks for the shape of the red one.
    both_red = caption_answers("a small red circle stays still and a small red square shrinks on a gray background")
    assert "what shape is the red object?" not in both_red and both_red["what color is the square?"] == "red"
    assert caption_answers("a red thing on a white background") == {}


def test_answers_are_scored_against_what_the_bridges_own_caption_implies():
    """Counting only: a scripted answerer that knows shapes and nothing else, after a right or a wrong caption."""
    scene = world.scene("test-novel", 0)  # a small yellow square and a large red square, both moving right
    answers = dict(world.questions(scene))

    class ShapesOnly:
        config = SimpleNamespace(caption_first=False)

        def ask(self, frames, questions, histories, num_beams=1):
            return [answers[q] if quality.question_slot(q) == "shape" else "no idea" for q in questions]

    asked = {quality.question_slot(q) for q in answers} - {"background", "count"}
    assert asked == {"shape", "motion", "size"}
    right = quality.world_vqa(ShapesOnly(), "test-novel", 1, 4, [world.caption(scene)])
    assert right["two_object_caption_implies_right"] == {"shape": 1.0, "motion": 1.0, "size": 1.0}
    assert right["two_object_right_when_caption_right"] == {"shape": 1.0, "motion": 0.0, "size": 0.0}
    # The objects' sizes swapped: its size questions now have a caption that says otherwise.
    sizes = quality.world_vqa(
        ShapesOnly(), "test-novel", 1, 4, ["a large yellow square moves right and a small red square moves right on a black background"]
    )
    assert sizes["two_object_caption_implies_right"] == {"shape": 1.0, "motion": 1.0, "size": 0.0}
    assert sizes["two_object_right_when_caption_right"] == {"shape": 1.0, "motion": 0.0}
    wrong = quality.world_vqa(ShapesOnly(), "test-novel", 1, 4, ["a red thing"])
    assert wrong["two_object_caption_implies_right"] == {"shape": 0.0, "motion": 0.0, "size": 0.0}
    assert wrong["two_object_right_when_caption_right"] == {}


def test_captions_only_scores_the_captions_and_nothing_else(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "b")
    results = quality.main(["--bridge", str(tmp_path / "b"), "--world", "1", "--captions-only"])
    assert set(results) == {"world test-iid captions", "world test-novel captions"}
    printed = capsys.readouterr().out
    assert "captions: exact" in printed and "VQA" not in printed


def test_num_beams_reaches_every_caption_and_a_bad_count_is_refused(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    bridge = Bridge(tiny_config(tiny_dirs)).eval()
    clips = [world.render(world.scene("test-iid", i)) for i in range(2)]
    _, captions = quality.world_captions(bridge, "test-iid", 2, 2, num_beams=3)
    assert captions == bridge.caption(clips, num_beams=3) != bridge.caption(clips)
    bridge.save_pretrained(tmp_path / "b")
    with pytest.raises(SystemExit):
        quality.main(["--bridge", str(tmp_path / "b"), "--num-beams", "0"])
    assert "--num-beams must be at least 1, got 0" in capsys.readouterr().err


def test_a_caption_first_bridge_answers_after_the_captions_the_bench_already_has(tiny_dirs):
    """The same answers Bridge.ask gives when it captions each clip itself, with one decode per question."""
    torch.manual_seed(0)
    bridge = Bridge(tiny_config(tiny_dirs, caption_first=True)).eval()
    _, captions = quality.world_captions(bridge, "test-iid", 2, 4)
    asked, generate, ask = [], bridge.generate, bridge.ask
    decodes = []
    bridge.generate = lambda *a, **k: decodes.append(1) or generate(*a, **k)

    def recording_ask(frames, questions, histories=None, num_beams=1):
        preds = ask(frames, questions, histories, num_beams=num_beams)
        asked.append((frames, questions, preds))
        return preds

    bridge.ask = recording_ask
    result = quality.world_vqa(bridge, "test-iid", 2, 4, captions)
    assert len(decodes) == len(asked) > 0 and sum(len(q) for _, q, _ in asked) == result["questions"]
    for frames, questions, preds in asked:
        assert preds == ask(frames, questions)  # the bridge captioning each clip itself


def test_a_caption_first_bridge_captions_each_easy_vqa_image_once(tiny_dirs):
    """The same answers Bridge.ask gives when it captions the image before every question, with one caption
    per image: the first 12 questions are about two images (11 about image 0, 1 about image 1)."""
    torch.manual_seed(0)
    bridge = Bridge(tiny_config(tiny_dirs, caption_first=True)).eval()
    asked, generate, ask, decodes = [], bridge.generate, bridge.ask, []
    bridge.generate = lambda **k: decodes.append(len(k["input_ids"])) or generate(**k)  # one row per prompt decoded

    def recording_ask(items, questions, histories=None, **kwargs):
        preds = ask(items, questions, histories, **kwargs)
        asked.append((items, questions, preds))
        return preds

    bridge.ask = recording_ask
    result = quality.easy_vqa(bridge, 12, 4)
    assert result["questions"] == 12
    # One decode of both images' captions, then one decode per batch of four questions.
    assert decodes == [2, 4, 4, 4]
    for items, questions, preds in asked[1:]:
        assert preds == ask(items, questions)  # the bridge captioning each image itself
