"""demos/world_data.py: the demo bridge's training manifests."""

from __future__ import annotations

import json

import pytest

from demos import world_data
from qformer import world


@pytest.mark.parametrize(
    "question, answer, facts",
    [
        ("what is the blue shape?", "rectangle", {"colour": "blue", "shape": "rectangle"}),
        ("what color is the triangle?", "red", {"colour": "red", "shape": "triangle"}),
        ("what is the color of the circle?", "teal", {"colour": "teal", "shape": "circle"}),
        ("what color is the shape?", "gray", {"colour": "gray"}),
        ("what shape does the image contain?", "circle", {"shape": "circle"}),
        ("is there a red shape in the image?", "yes", {"colour": "red"}),
        ("is there a red shape in the image?", "no", {}),
        ("does the image not contain a rectangle?", "no", {"shape": "rectangle"}),
        ("is no yellow shape present?", "yes", {}),
        ("is there not a blue shape?", "no", {"colour": "blue"}),
    ],
)
def test_easy_vqa_questions_say_what_they_say_about_the_shape(question, answer, facts):
    assert world_data.easy_facts(question, answer) == facts


def test_question_rows_carry_their_clip_s_caption(tmp_path):
    world_data.main([str(tmp_path), "--clips", "3"])
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    captions = {r["video"]: r["caption"] for r in read("world_captions.jsonl")}
    assert list(captions.values()) == [world.caption(world.scene("train", i)) for i in range(3)]
    vqa = read("world_vqa.jsonl")
    assert len(vqa) == sum(len(world.questions(world.scene("train", i))) for i in range(3))
    assert all(r["caption"] == captions[r["video"]] for r in vqa)

    easy_captions, easy_vqa = read("easy_captions.jsonl"), read("easy_vqa.jsonl")
    assert (len(easy_captions), len(easy_vqa)) == (3542, 38575)  # of the 4,000 training images, 38,575 questions
    assert easy_captions[0]["caption"] == "a blue rectangle" and easy_captions[0]["image"].endswith("train/images/0.png")
    by_image = {r["image"]: r["caption"] for r in easy_captions}
    assert all(r.get("caption") == by_image.get(r["image"]) for r in easy_vqa)


def test_first_starts_at_a_later_scene(tmp_path):
    world_data.main([str(tmp_path), "--clips", "2", "--first", "5"])
    rows = [json.loads(line) for line in (tmp_path / "world_captions.jsonl").read_text().splitlines()]
    rows = [{k: r[k] for k in ("video", "caption")} for r in rows]
    assert rows == [{"video": f"clips/train-{i:06d}.mp4", "caption": world.caption(world.scene("train", i))} for i in (5, 6)]
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == ["train-000005.mp4", "train-000006.mp4"]


def test_objects_keeps_only_the_scenes_with_that_many_objects(tmp_path):
    world_data.main([str(tmp_path), "--clips", "8", "--objects", "2"])
    two = [i for i in range(8) if len(world.scene("train", i).objects) == 2]
    assert 0 < len(two) < 8  # the first 8 scenes mix one and two objects, so the filter has work to do
    rows = [json.loads(line) for line in (tmp_path / "world_captions.jsonl").read_text().splitlines()]
    rows = [{k: r[k] for k in ("video", "caption")} for r in rows]
    assert rows == [{"video": f"clips/train-{i:06d}.mp4", "caption": world.caption(world.scene("train", i))} for i in two]
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == [f"train-{i:06d}.mp4" for i in two]


def test_caption_rows_carry_one_slot_changed_negatives(tmp_path):
    world_data.main([str(tmp_path), "--clips", "2"])
    rows = [json.loads(line) for line in (tmp_path / "world_captions.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        s = world.scene("train", i)
        # Per object its size, colour, shape and motion, then the background; each differs in one word.
        assert len(row["negatives"]) == 4 * len(s.objects) + 1
        own = world.parse_caption(row["caption"])
        slots = lambda p: [p.background] + [getattr(o, k) for o in p.objects for k in ("size", "colour", "shape", "motion")]  # noqa: E731
        for negative in row["negatives"]:
            assert sum(a != b for a, b in zip(slots(own), slots(world.parse_caption(negative)))) == 1
