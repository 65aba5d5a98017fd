"""Shot-aware recaption on real files made here: cuts between generated-world clips, manifest spans and
columns, several prompts, --retry-failed, kills, shards."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import launch_two_processes
from test_recaption import TIMEOUT_S, bridge_dir, kill_after_first_record  # noqa: F401 -- bridge_dir: a fixture

from qformer import recaption as rc
from qformer import world
from qformer.cli import main
from qformer.shots import detect_cuts

CLIP_S = world.FRAMES / world.FPS  # 2.0 s
PROMPTS = ["Describe the clip.", "What moves?"]


def world_video(path: Path, backgrounds: list[str], start: int = 0) -> list[float]:
    """World clips with these backgrounds, one after another in one MP4 (hard cuts); the true cut times."""
    pool = (world.scene("test-iid", i) for i in itertools.count(start))
    scenes = [next(s for s in pool if s.background == bg) for bg in backgrounds]
    world.write_mp4(np.concatenate([world.render(s) for s in scenes]), path)
    return [k * CLIP_S for k in range(1, len(scenes))]


def records(path) -> list[dict]:
    return rc.read_records(str(path))


def recaption(*args: str) -> int:
    return main(["recaption", *args, "--workers", "0", "--max-new-tokens", "3"])


# ---------------------------------------------------------------- cuts


def test_cuts_between_world_clips_fall_within_a_frame_of_the_true_ones(tmp_path):
    # Five cuts with the same background on both sides, four with another.
    truth = world_video(tmp_path / "cuts.mp4", ["white", "white", "black", "black", "black", "gray", "gray", "white", "gray", "gray"])
    cuts = detect_cuts(str(tmp_path / "cuts.mp4"))
    frame = 1 / world.FPS
    assert len(cuts) == len(truth)
    assert all(abs(c - t) <= frame for c, t in zip(cuts, truth)), (cuts, truth)
    # Inside a span: only its cuts, measured from the start of the file.
    assert detect_cuts(str(tmp_path / "cuts.mp4"), start_s=3.0, end_s=9.0) == pytest.approx([4.0, 6.0, 8.0], abs=frame)


def test_shots_are_captioned_each_with_every_prompt(tmp_path, bridge_dir, capsys):
    (tmp_path / "clips").mkdir()
    world_video(tmp_path / "clips" / "a.mp4", ["white", "white", "black"])
    world_video(tmp_path / "clips" / "b.mp4", ["gray"], start=50)
    out = tmp_path / "shots.jsonl"
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    assert recaption(str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir, "--shots", *prompts) == 0
    assert capsys.readouterr().out.startswith("done 8, failed 0, ")
    got = [(Path(r["path"]).name, r["shot"], r["start_s"], r["end_s"], r["prompt"]) for r in records(out)]
    shots = [("a.mp4", 0, 0.0, 2.0), ("a.mp4", 1, 2.0, 4.0), ("a.mp4", 2, 4.0, 6.0), ("b.mp4", 0, 0.0, 2.0)]
    assert sorted(got) == sorted((*s, p) for s in shots for p in PROMPTS)
    assert {(r["shot_threshold"], r["min_shot_s"]) for r in records(out)} == {(3.0, 0.5)}
    assert all(r["caption"] and r["num_frames"] == 4 and r["error"] is None for r in records(out))

    # Without --shots each file is one record per prompt: shot 0 from 0 to its duration.
    whole = tmp_path / "whole.jsonl"
    assert recaption(str(tmp_path / "clips"), "--out", str(whole), "--bridge", bridge_dir, *prompts) == 0
    got = [(Path(r["path"]).name, r["shot"], r["start_s"], r["end_s"], r["duration_s"], r["prompt"]) for r in records(whole)]
    assert sorted(got) == sorted((name, 0, 0.0, d, d, p) for name, d in (("a.mp4", 6.0), ("b.mp4", 2.0)) for p in PROMPTS)

    # Other shot settings, or one prompt fewer, would mix two kinds of captions: refused before a model loads.
    for other in (["--shots", "--min-shot-s", "1", *prompts], ["--shots", "--prompt", PROMPTS[0]]):
        assert recaption(str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir, *other) == 2
        assert "already holds captions made with" in capsys.readouterr().err
    # One prompt more adds its records to every shot.
    assert recaption(str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir, "--shots", *prompts, "--prompt", "Name it.") == 0
    assert capsys.readouterr().out.startswith("done 4, failed 0, ")
    assert Counter(r["prompt"] for r in records(out)) == {PROMPTS[0]: 4, PROMPTS[1]: 4, "Name it.": 4}


def test_vision_encoder_runs_once_per_shot_whatever_the_prompts(tmp_path, tiny_bridge, monkeypatch):
    world_video(tmp_path / "a.mp4", ["white", "white", "black"])
    frames = []
    encode = tiny_bridge.vision.encode
    monkeypatch.setattr(tiny_bridge.vision, "encode", lambda x: frames.append(len(x)) or encode(x))
    summary = rc.recaption(
        rc.discover([str(tmp_path / "a.mp4")]),
        str(tmp_path / "out.jsonl"),
        tiny_bridge,
        "tiny",
        prompts=PROMPTS + ["Name it."],
        workers=0,
        max_new_tokens=2,
        progress=False,
        shots=(3.0, 0.5),
    )
    assert (summary.done, summary.inputs) == (9, 1)
    assert sum(frames) == 3 * 4  # three shots of four frames, once


# ---------------------------------------------------------------- manifests: spans and columns


def write_manifest(tmp_path: Path) -> Path:
    """Two files of world clips; rows with id, split, a span and a caption column (a record field)."""
    world_video(tmp_path / "one.mp4", ["white", "white", "black", "gray"])
    world_video(tmp_path / "two.mp4", ["black", "gray", "gray"], start=40)
    rows = [
        {"video": "one.mp4", "id": 7, "split": "train", "start": 0.0, "end": 4.0, "caption": "two shapes"},
        {"video": "one.mp4", "id": 8, "split": "train", "start": 4.0, "end": 8.0, "caption": "a square"},
        {"video": "two.mp4", "id": 9, "split": "test", "start": 2.0, "end": 6.0, "caption": "a circle"},
        {"video": "two.mp4", "id": 10, "split": "test", "start": 0.5, "end": 20.0, "caption": "all of it"},
    ]
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_manifest_rows_caption_their_span_and_carry_their_columns(tmp_path, bridge_dir, capsys):
    manifest = write_manifest(tmp_path)
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    out = tmp_path / "out.jsonl"
    assert recaption(str(manifest), "--out", str(out), "--bridge", bridge_dir, *prompts) == 0
    got = sorted((r["id"], r["prompt"], r["split"], r["start_s"], r["end_s"], r["source_caption"], r["shot"]) for r in records(out))
    spans = {7: ("train", 0.0, 4.0, "two shapes"), 8: ("train", 4.0, 8.0, "a square"), 9: ("test", 2.0, 6.0, "a circle")}
    spans[10] = ("test", 0.5, 6.0, "all of it")  # its end past the clip's stops there
    assert got == sorted((i, p, *spans[i], 0) for i in spans for p in PROMPTS)
    assert all(r["caption"] and r["error"] is None and r["num_frames"] == 4 for r in records(out))

    # Parquet: the carried columns with their types.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "out.parquet"
    assert recaption(str(manifest), "--out", str(table), "--bridge", bridge_dir, *prompts) == 0
    schema = pq.read_schema(table)
    assert schema.names == [*rc.RECORD_SCHEMA, "id", "split", "start", "end", "source_caption"]
    assert [schema.field(n).type for n in ("id", "split", "start", "source_caption")] == [
        pa.int64(),
        pa.string(),
        pa.float64(),
        pa.string(),
    ]
    key = lambda r: (r["id"], r["prompt"])  # noqa: E731
    assert sorted(records(table), key=key) == sorted(records(out), key=key)
    assert [(r["id"], r["prompt"]) for r in records(table)] == [(i, p) for i in (7, 8, 10, 9) for p in PROMPTS]  # by path, then span

    # With --shots each row's span is cut: rows 7, 8 and 9 hold two clips each, row 10 parts of three.
    cut = tmp_path / "cut.jsonl"
    assert recaption(str(manifest), "--out", str(cut), "--bridge", bridge_dir, "--shots", "--prompt", PROMPTS[0]) == 0
    got = sorted((r["id"], r["shot"], r["start_s"], r["end_s"]) for r in records(cut))
    assert got == [
        (7, 0, 0.0, 2.0),
        (7, 1, 2.0, 4.0),
        (8, 0, 4.0, 6.0),
        (8, 1, 6.0, 8.0),
        (9, 0, 2.0, 4.0),
        (9, 1, 4.0, 6.0),
        (10, 0, 0.5, 2.0),
        (10, 1, 2.0, 4.0),
        (10, 2, 4.0, 6.0),
    ]


def test_a_bad_span_in_a_manifest_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "rows.csv").write_text("video,start,end\na.mp4,3,1\n")
    assert main(["recaption", str(tmp_path / "rows.csv"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith("rows.csv: row 1: the span from 3 s to 1 s is empty or negative")


def test_retry_failed_replaces_errors_and_keeps_one_record_per_key(tmp_path, bridge_dir, capsys):
    world_video(tmp_path / "ok.mp4", ["white"])
    (tmp_path / "rows.csv").write_text("video,id\nok.mp4,1\nlater.mp4,2\n")
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    for out in (tmp_path / "out.jsonl", tmp_path / "out.parquet"):
        base = [str(tmp_path / "rows.csv"), "--out", str(out), "--bridge", bridge_dir, *prompts]
        assert recaption(*base) == 0
        assert capsys.readouterr().out.startswith("done 2, failed 2, ")
        errors = {r["id"]: r["error"] for r in records(out)}
        assert errors["1"] is None and errors["2"] == f"{tmp_path / 'later.mp4'}: no such file"
        world_video(tmp_path / "later.mp4", ["black"])  # the missing file arrives
        assert recaption(*base) == 0  # errors are records: nothing to do
        assert capsys.readouterr().out.startswith("done 0, failed 0, ")
        assert recaption(*base, "--retry-failed") == 0
        assert capsys.readouterr().out.startswith("done 2, failed 0, ")
        final = records(out)
        assert sorted((r["id"], r["prompt"], r["error"]) for r in final) == [(i, p, None) for i in ("1", "2") for p in PROMPTS]
        assert all(r["caption"] for r in final)
        (tmp_path / "later.mp4").unlink()


def test_shards_with_shots_merge_every_shot_once(tmp_path, bridge_dir, capsys):
    (tmp_path / "clips").mkdir()
    for k, backgrounds in enumerate((["white", "white"], ["black"], ["gray", "black", "gray"])):
        world_video(tmp_path / "clips" / f"{k}.mp4", backgrounds, start=20 * k)
    out = tmp_path / "all.jsonl"
    base = [str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir, "--shots", "--batch-size", "2"]
    assert recaption(*base, "--shard", "1/2") == 0
    assert "2 inputs of other shards still to do" in capsys.readouterr().out and not out.exists()
    assert recaption(*base, "--shard", "0/2") == 0
    assert f"merged the records of 3 inputs into {out}" in capsys.readouterr().out
    got = [(Path(r["path"]).name, r["shot"], r["start_s"]) for r in records(out)]
    assert got == [("0.mp4", 0, 0.0), ("0.mp4", 1, 2.0), ("1.mp4", 0, 0.0), ("2.mp4", 0, 0.0), ("2.mp4", 1, 2.0), ("2.mp4", 2, 4.0)]


# ---------------------------------------------------------------- kills


@pytest.mark.slow
@pytest.mark.parametrize("shots", [False, True])
def test_sigkill_then_rerun_records_every_row_shot_and_prompt_exactly_once(tmp_path, bridge_dir, shots):
    manifest = write_manifest(tmp_path)
    settings = ["--bridge", bridge_dir, "--batch-size", "1", "--workers", "1", "--max-new-tokens", "24"]
    settings += [a for p in PROMPTS for a in ("--prompt", p)] + (["--shots"] if shots else [])
    reference = tmp_path / "reference.jsonl"
    assert main(["recaption", str(manifest), "--out", str(reference), *settings]) == 0

    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "qformer.cli", "recaption", str(manifest), "--out", str(out), *settings]
    written = kill_after_first_record(command, out)
    assert 1 <= written < len(records(reference)), "the kill came too late to test anything"

    subprocess.run(command, check=True, timeout=TIMEOUT_S, capture_output=True)
    final = records(out)
    key = lambda r: (r["id"], r["shot"], r["prompt"])  # noqa: E731
    assert Counter(map(key, final)) == Counter(map(key, records(reference)))
    assert max(Counter(map(key, final)).values()) == 1
    assert sorted(final, key=key) == sorted(records(reference), key=key)
    assert {r["id"]: r["split"] for r in final} == {7: "train", 8: "train", 9: "test", 10: "test"}


@pytest.mark.slow
def test_accelerate_launch_with_shots(tmp_path, bridge_dir):
    (tmp_path / "clips").mkdir()
    for k, backgrounds in enumerate((["white", "white"], ["black"], ["gray", "black", "gray"])):
        world_video(tmp_path / "clips" / f"{k}.mp4", backgrounds, start=20 * k)
    settings = ["--bridge", bridge_dir, "--shots", "--workers", "1", "--max-new-tokens", "8"]
    single = tmp_path / "single.jsonl"
    assert main(["recaption", str(tmp_path / "clips"), "--out", str(single), *settings]) == 0
    out = tmp_path / "two.jsonl"
    launch = [*launch_two_processes(), "-m", "qformer.cli", "recaption", str(tmp_path / "clips"), "--out", str(out), *settings]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=TIMEOUT_S, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"merged the records of 3 inputs into {out}" in result.stdout
    assert records(out) == sorted(records(single), key=lambda r: (r["path"], r["shot"]))
    assert len(records(out)) == 6
