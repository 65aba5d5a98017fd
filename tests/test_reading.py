"""bench/reading.py: labels follow WORLD.md's caption order, and the bench trains and scores each variant."""

from __future__ import annotations

import json

import pytest

from bench import reading
from qformer import world


def test_labels_are_the_scene_in_caption_order_with_none_for_a_missing_second_object():
    one = world.Scene("gray", (world.WorldObject("diamond", "large", "orange", "shrinks", 64, 64),))
    two = world.Scene(
        "black",
        (world.WorldObject("circle", "small", "red", "left", 30, 64), world.WorldObject("square", "large", "blue", "grows", 90, 40)),
    )
    y = reading.labels([one, two]).tolist()
    assert reading.HEADS == [
        "background",
        "count",
        "size 1",
        "colour 1",
        "shape 1",
        "motion 1",
        "size 2",
        "colour 2",
        "shape 2",
        "motion 2",
    ]
    # gray, one object, large orange diamond shrinks; then "none" (the last class) for each slot of object 2.
    assert y[0] == [2, 0, 1, 5, 3, 5, 2, 6, 4, 7]
    # black, two objects, small red circle left; large blue square grows.
    assert y[1] == [0, 1, 0, 0, 0, 0, 1, 2, 1, 4]
    assert [reading.classes(h) for h in reading.HEADS] == [3, 2, 2, 6, 4, 7, 3, 7, 5, 8]


@pytest.mark.backbones
def test_reading_bench_trains_each_variant_and_reports_every_slot(tmp_path, capsys):
    results = reading.main(
        [
            "--train",
            "8",
            "--test",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--variant",
            "frames",
            "--variant",
            "tubelets + grid positions",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert list(results) == ["frames", "tubelets + grid positions"]
    for history in results.values():
        assert [h["step"] for h in history] == [2]
        assert all(0.0 <= history[-1][k] <= 1.0 for k in reading.HEADS)
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert "test-iid accuracy after 2 steps" in capsys.readouterr().out
