"""The recaptioner: input discovery, exactly-once resumable output, kills, sharding, merging, bad inputs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import launch_two_processes, tiny_config

from adapters.video import decode_side
from qformer import Bridge
from qformer import recaption as rc
from qformer.cli import main

TIMEOUT_S = 300


def write_video(
    path,
    frames: int = 8,
    size: int = 32,
    fps: int = 8,
    seed: int = 0,
    codec: str = "libx264",
    container: str | None = None,
    solid: bool = False,
    width: int | None = None,
) -> Path:
    """A small clip of random (or solid) frames; frames=0 writes a header and no frame."""
    rng = np.random.default_rng(seed)
    height, width = size, width or size
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if frames == 0:
            out.start_encoding()
        for t in range(frames):
            rgb = np.full((height, width, 3), 90, np.uint8) if solid else rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)


def write_clips(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [str(write_video(folder / f"clip {i:02d} ü.mp4", seed=i)) for i in range(count)]


@pytest.fixture(scope="module")
def bridge_dir(tiny_dirs, tmp_path_factory) -> str:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bridge") / "bridge"
    Bridge(tiny_config(tiny_dirs)).save_pretrained(d)
    return str(d)


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def cli(*args: str) -> list[str]:
    """Command line of the CLI in a fresh interpreter."""
    return [sys.executable, "-m", "qformer.cli", "recaption", *args]


# ---------------------------------------------------------------- discovery


def test_discover_folders_manifests_datasets_and_symlink_loops(tmp_path):
    import datasets

    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    for name in ("b.mp4", "sub/a.MOV", "sub/c.png", "notes.txt"):
        (clips / name).write_bytes(b"x")
    (clips / "sub" / "loop").symlink_to(clips, target_is_directory=True)  # a cycle through an ancestor
    (clips / "self.mp4").symlink_to(clips / "self.mp4")  # a link to itself
    manifest_dir = tmp_path / "m"
    manifest_dir.mkdir()
    (manifest_dir / "list.jsonl").write_text('{"video": "../clips/b.mp4"}\n{"video": "gone.mp4"}\n')
    (manifest_dir / "list.csv").write_text("id,image\n1,../clips/sub/c.png\n")
    datasets.Dataset.from_dict({"path": [str(clips / "b.mp4")]}).save_to_disk(str(tmp_path / "ds"))

    items = rc.discover(
        [str(clips), str(manifest_dir / "list.jsonl"), str(manifest_dir / "list.csv"), str(tmp_path / "ds"), str(tmp_path / "nowhere.mp4")]
    )
    paths = [it.path for it in items]
    assert paths == sorted(set(paths))  # sorted, each once (b.mp4 is named three times)
    by_name = {os.path.relpath(it.path, tmp_path): it for it in items}
    assert set(by_name) == {
        "clips/b.mp4",
        "clips/sub/a.MOV",
        "clips/sub/c.png",
        "clips/sub/loop",
        "clips/self.mp4",
        "m/gone.mp4",
        "nowhere.mp4",
    }
    assert "symlink loop" in by_name["clips/sub/loop"].error
    assert "symlink loop" in by_name["clips/self.mp4"].error
    assert by_name["clips/b.mp4"].error is None and by_name["m/gone.mp4"].error is None  # the decoder will say "no such file"


def test_discover_rejects_a_manifest_without_a_clip_column(tmp_path):
    (tmp_path / "m.csv").write_text("id,label\n1,cat\n")
    with pytest.raises(ValueError, match=r"m\.csv: .*no column naming the clips"):
        rc.discover([str(tmp_path / "m.csv")])


def test_datasets_directory_with_embedded_bytes_and_parquet_output(tmp_path, bridge_dir, capsys):
    import datasets

    clip = write_video(tmp_path / "a.mp4")
    ds = datasets.Dataset.from_dict({"video": [{"bytes": clip.read_bytes(), "path": "a.mp4"}, {"bytes": b"junk", "path": "b.mp4"}]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "captions.parquet"
    assert (
        main(["recaption", str(tmp_path / "ds"), "--out", str(out), "--bridge", bridge_dir, "--workers", "1", "--max-new-tokens", "4"]) == 0
    )
    rows = rc.read_records(str(out))
    assert [r["path"] for r in rows] == [f"{tmp_path}/ds/train#0", f"{tmp_path}/ds/train#1"]
    assert rows[0]["error"] is None and rows[0]["caption"] and rows[0]["num_frames"] == 4
    assert rows[1]["error"].startswith(f"{tmp_path}/ds/train#1: ")  # named after the item, not a temporary file
    assert list(rows[0]) == list(rc.RECORD_SCHEMA)
    # A rerun with another prompt must not replace the Parquet output with captions of two kinds.
    before = out.read_bytes()
    capsys.readouterr()
    reason = refusal(capsys, str(tmp_path / "ds"), "--out", str(out), "--bridge", bridge_dir, "--prompt", "What is there?")
    assert reason.startswith(f"{out}: already holds captions made with bridge")
    assert out.read_bytes() == before


# ---------------------------------------------------------------- exactly once, resume


def test_resume_skips_done_items_and_cuts_a_torn_line(tmp_path, bridge_dir, capsys):
    clips = write_clips(tmp_path / "clips", 6)
    out = tmp_path / "out.jsonl"
    args = [
        "recaption",
        str(tmp_path / "clips"),
        "--out",
        str(out),
        "--bridge",
        bridge_dir,
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--max-new-tokens",
        "6",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().startswith("done 6, failed 0, ")
    full = records(out)
    assert sorted(r["path"] for r in full) == clips

    # A kill mid-write leaves a torn last line; the first two records stay.
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:25])
    assert main(args) == 0
    assert capsys.readouterr().out.strip().startswith("done 4, failed 0, ")
    again = records(out)
    assert Counter(r["path"] for r in again) == Counter(clips)
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(again, key=key) == sorted(full, key=key)

    assert main(args) == 0  # nothing left: nothing redone
    assert capsys.readouterr().out.strip().startswith("done 0, failed 0, ")
    assert len(records(out)) == 6


def test_resume_refuses_another_prompt_or_decoding(tmp_path, bridge_dir, capsys):
    write_clips(tmp_path / "clips", 2)
    out = tmp_path / "out.jsonl"
    base = ["recaption", str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir, "--workers", "0", "--max-new-tokens", "2"]
    assert main(base + ["--num-beams", "2"]) == 0
    assert [r["num_beams"] for r in records(out)] == [2, 2]
    assert main(base + ["--num-beams", "2", "--prompt", "What is there?"]) == 2
    assert "already holds captions made with bridge" in capsys.readouterr().err
    assert main(base) == 2
    assert "--num-beams 2 and no --shots; this run uses" in capsys.readouterr().err
    # Records written before the decoding and the shots were recorded were greedy, of whole clips, and resume as such.
    first, _ = records(out)
    for field in ("num_beams", "shot", "start_s", "end_s", "shot_threshold", "min_shot_s", "match"):
        del first[field]
    out.write_text(json.dumps(first) + "\n")
    assert main(base) == 0
    assert capsys.readouterr().out.startswith("done 1, failed 0")


def test_missing_bridge_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import qformer.bridge

    monkeypatch.setattr(qformer.bridge, "DEFAULT_BRIDGE", tmp_path / "absent")
    assert main(["recaption", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "the default bridge" in capsys.readouterr().err


def test_fps_sampling_batches_clips_of_different_lengths(tmp_path, bridge_dir, capsys):
    # 0.5 s, 1 s and 3 s at 8 fps; sampled at 4 fps: 2, 4 and 12 frames, the last capped at the Q-Former's 8.
    for name, frames in (("short.mp4", 4), ("one-second.mp4", 8), ("long.mp4", 24)):
        write_video(tmp_path / name, frames=frames)
    out = tmp_path / "out.jsonl"
    assert (
        main(
            ["recaption", str(tmp_path), "--out", str(out), "--bridge", bridge_dir, "--fps", "4", "--workers", "0", "--max-new-tokens", "3"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("done 3, failed 0")
    frames = {Path(r["path"]).name: r["num_frames"] for r in records(out)}
    assert frames == {"short.mp4": 2, "one-second.mp4": 4, "long.mp4": 8}


def test_a_second_writer_is_refused(tmp_path):
    journal = rc.Journal(str(tmp_path / "out.jsonl"))
    try:
        with pytest.raises(rc.OutputBusy, match="another recaption process"):
            rc.Journal(str(tmp_path / "out.jsonl"))
    finally:
        journal.close()


def test_decoding_workers_do_not_hold_the_lock(tmp_path):
    # After a kill -9 the decoding workers outlive the main process for a few seconds; if they held the
    # journal's lock, an immediate rerun would be refused as a second writer.
    clips = write_clips(tmp_path / "clips", 2)
    journal = rc.Journal(str(tmp_path / "out.jsonl"))
    dataset = rc.DecodedItems([rc.Item(p) for p in clips], lambda frames: torch.zeros(1), 2, None, None)
    batches = iter(rc._loader(dataset, workers=1, batch_size=1, journal=journal))
    assert next(batches).error is None  # the worker is running
    journal.close()
    rc.Journal(str(tmp_path / "out.jsonl")).close()
    del batches


def kill_after_first_record(command: list[str], out: Path) -> int:
    """Start command, SIGKILL it once out holds a complete record, and return how many lines it holds then."""
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before writing a record"
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait()
    return out.read_bytes().count(b"\n")


@pytest.mark.slow
def test_sigkill_then_rerun_records_every_input_exactly_once(tmp_path, bridge_dir):
    clips = write_clips(tmp_path / "clips", 12)
    settings = ["--bridge", bridge_dir, "--batch-size", "1", "--workers", "1", "--max-new-tokens", "24"]
    reference = tmp_path / "reference.jsonl"
    assert main(["recaption", str(tmp_path / "clips"), "--out", str(reference), *settings]) == 0

    out = tmp_path / "out.jsonl"
    written = kill_after_first_record(cli(str(tmp_path / "clips"), "--out", str(out), *settings), out)
    assert 1 <= written < len(clips), "the kill came too late to test anything"

    resumed = subprocess.run(
        cli(str(tmp_path / "clips"), "--out", str(out), *settings), check=True, timeout=TIMEOUT_S, capture_output=True, text=True
    )
    assert f"{written} already done" in resumed.stdout
    final = records(out)
    assert Counter(r["path"] for r in final) == Counter(clips)
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(final, key=key) == sorted(records(reference), key=key)


# ---------------------------------------------------------------- what --out may name


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a bridge fails the test: a refused --out must be refused before any model loads."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(Bridge, "from_pretrained", load)


def refusal(capsys, *args: str) -> str:
    """Run recaption with args, expecting a refusal: its one error line, without the command's prefix."""
    assert main(["recaption", *args]) == 2
    err = capsys.readouterr().err
    prefix = "qformer recaption: error: "
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err[len(prefix) : -1]


NOT_OURS = "is not an output of qformer recaption"
FIELDS = (
    "a record's are path, shot, start_s, end_s, caption, num_frames, duration_s, error, bridge, prompt, num_beams, "
    "shot_threshold, min_shot_s, match"
)


@pytest.mark.parametrize("name", ["movie.mp4", "movie.jsonl"])
def test_a_binary_file_as_out_is_left_whole_and_refused_before_a_model_loads(tmp_path, bridge_dir, capsys, no_model_loads, name):
    write_clips(tmp_path / "clips", 1)
    out = tmp_path / name
    # An MP4's first box, then bytes without a newline: the journal used to cut such a file to nothing.
    noise = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes().replace(b"\n", b"")
    out.write_bytes(b"\0\0\0\x20ftypisom" + noise)
    before = out.read_bytes()
    reason = refusal(capsys, str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir)
    assert out.read_bytes() == before
    expected = {
        "movie.mp4": f"{out}: --out names a clip, image or CSV file; records go to a .jsonl or .parquet file",
        "movie.jsonl": f"{out}: {NOT_OURS} (a binary file); refusing to write to it, choose another --out",
    }
    assert reason == expected[name]


def test_a_parquet_manifest_as_out_is_refused_and_keeps_its_columns(tmp_path, bridge_dir, capsys, no_model_loads):
    import pyarrow as pa
    import pyarrow.parquet as pq

    clips = write_clips(tmp_path / "clips", 2)
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"video": clips, "label": ["a cat", "a dog"], "score": [0.5, 0.25]}), manifest)
    before = manifest.read_bytes()
    # As an input and the output at once.
    assert refusal(capsys, str(manifest), "--out", str(manifest), "--bridge", bridge_dir) == (
        f"{manifest}: is one of the inputs ({manifest}); recaption would overwrite it, choose another --out"
    )
    # As the output alone: a table of other columns.
    assert refusal(capsys, str(tmp_path / "clips"), "--out", str(manifest), "--bridge", bridge_dir) == (
        f"{manifest}: {NOT_OURS} (its fields are label, score, video; {FIELDS}); refusing to write to it, choose another --out"
    )
    assert manifest.read_bytes() == before
    assert pq.read_table(manifest).to_pydict() == {"video": clips, "label": ["a cat", "a dog"], "score": [0.5, 0.25]}


def test_a_jsonl_manifest_as_out_is_a_clear_error(tmp_path, bridge_dir, capsys, no_model_loads):
    write_clips(tmp_path / "clips", 1)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"video": "clips/clip 00 ü.mp4", "label": "a cat"}) + "\n")
    before = manifest.read_bytes()
    assert refusal(capsys, str(manifest), "--out", str(manifest), "--bridge", bridge_dir) == (
        f"{manifest}: is one of the inputs ({manifest}); recaption would overwrite it, choose another --out"
    )
    assert manifest.read_bytes() == before


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"id": 1, "text": "a cat"}\n{"id": 2, "te', f"(its fields are id, text; {FIELDS})"),
        ("notes about the clips\nsecond line", "(its first line is not a JSON object)"),
        ("[1, 2]\n", "(its first line is not a JSON object)"),
        ("a note without a newline", "(no complete line, and it does not begin as a record)"),
    ],
)
def test_a_foreign_jsonl_as_out_is_left_whole(tmp_path, bridge_dir, capsys, no_model_loads, content, reason):
    write_clips(tmp_path / "clips", 1)
    out = tmp_path / "notes.jsonl"
    out.write_text(content)
    assert refusal(capsys, str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir) == (
        f"{out}: {NOT_OURS} {reason}; refusing to write to it, choose another --out"
    )
    assert out.read_text() == content


def test_a_directory_as_out_is_refused(tmp_path, bridge_dir, capsys, no_model_loads):
    write_clips(tmp_path / "clips", 1)
    out = tmp_path / "captions.jsonl"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert refusal(capsys, str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir) == (
        f"{out}: is a directory; --out must name a file"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_an_input_clip_as_out_is_refused(tmp_path, bridge_dir, capsys, no_model_loads):
    [clip] = write_clips(tmp_path / "clips", 1)
    before = Path(clip).read_bytes()
    assert refusal(capsys, str(tmp_path / "clips"), "--out", clip, "--bridge", bridge_dir) == (
        f"{clip}: is one of the inputs ({clip}); recaption would overwrite it, choose another --out"
    )
    # Under another name: a hard link is the same file.
    link = tmp_path / "captions.jsonl"
    os.link(clip, link)
    assert refusal(capsys, str(tmp_path / "clips"), "--out", str(link), "--bridge", bridge_dir) == (
        f"{link}: is one of the inputs ({clip}); recaption would overwrite it, choose another --out"
    )
    assert Path(clip).read_bytes() == before


def test_journals_of_out_are_checked_as_out_is(tmp_path, bridge_dir, capsys, no_model_loads):
    write_clips(tmp_path / "clips", 2)
    foreign = '{"id": 1}\n{"id": 2'
    # Another shard's journal is read to skip done inputs and to merge; a Parquet output's journal is appended to.
    for out, journal, shard in (
        (tmp_path / "a.jsonl", tmp_path / "a.jsonl.shard-1-of-2.jsonl", ["--shard", "0/2"]),
        (tmp_path / "b.parquet", tmp_path / "b.parquet.journal.jsonl", []),
    ):
        journal.write_text(foreign)
        assert refusal(capsys, str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir, *shard) == (
            f"{journal}: {NOT_OURS} (its fields are id; {FIELDS}); refusing to write to it, choose another --out"
        )
        assert journal.read_text() == foreign and not out.exists()


def test_another_prompt_leaves_a_torn_journal_whole_and_the_same_one_resumes(tmp_path, bridge_dir, capsys, monkeypatch):
    write_clips(tmp_path / "clips", 3)
    out = tmp_path / "out.jsonl"
    base = ["recaption", str(tmp_path / "clips"), "--out", str(out), "--bridge", bridge_dir, "--workers", "0", "--max-new-tokens", "3"]
    assert main(base) == 0
    full = records(out)
    lines = out.read_bytes().splitlines(keepends=True)
    torn = lines[0] + lines[1][:25]  # a kill in the middle of the second record
    out.write_bytes(torn)
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(Bridge, "from_pretrained", lambda *a: pytest.fail("a model was loaded before the settings were checked"))
        assert refusal(capsys, *base[1:], "--prompt", "What is there?") == (
            f"{out}: already holds captions made with bridge {bridge_dir!r}, prompt 'Describe the clip.', --num-beams 1 and no --shots; "
            f"this run uses bridge {bridge_dir!r}, prompt 'What is there?', --num-beams 1 and no --shots. Rerun with those, or write "
            "to another --out"
        )
    assert out.read_bytes() == torn  # not cut: the file was not yet known to be this run's journal
    assert main(base) == 0
    assert capsys.readouterr().out.startswith("done 2, failed 0")
    assert records(out)[0] == full[0] and sorted(r["path"] for r in records(out)) == sorted(r["path"] for r in full)


def test_journal_and_recaption_refuse_a_foreign_file_from_python(tmp_path, tiny_bridge):
    import pyarrow as pa
    import pyarrow.parquet as pq

    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b'{"id": 1}\n{"id": 2')
    with pytest.raises(ValueError, match="^" + re.escape(f"{notes}: {NOT_OURS} (its fields are id;")):
        rc.Journal(str(notes))
    assert notes.read_bytes() == b'{"id": 1}\n{"id": 2'
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    rc.Journal(str(empty)).close()  # an empty file is a journal with no record yet
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b'{"pa')  # a kill within the first record's first bytes
    rc.Journal(str(torn)).close()
    assert torn.read_bytes() == b""
    rc.Journal(str(notes.with_name("new.jsonl"))).close()

    [clip] = write_clips(tmp_path / "clips", 1)
    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"video": [clip], "label": ["a cat"]}), table)
    before = table.read_bytes()
    with pytest.raises(ValueError, match="^" + re.escape(f"{table}: {NOT_OURS} (its fields are label, video;")):
        rc.recaption(rc.discover([clip]), str(table), tiny_bridge, "tiny", workers=0, max_new_tokens=2, progress=False)
    assert table.read_bytes() == before
    with pytest.raises(ValueError, match="^" + re.escape(f"{clip}: is one of the inputs")):
        rc.recaption(rc.discover([clip]), clip, tiny_bridge, "tiny", workers=0, max_new_tokens=2, progress=False)


# ---------------------------------------------------------------- shards


def test_shards_write_their_parts_and_the_last_one_merges(tmp_path, bridge_dir, capsys):
    clips = write_clips(tmp_path / "clips", 5)
    out = tmp_path / "all.jsonl"
    base = [
        "recaption",
        str(tmp_path / "clips"),
        "--out",
        str(out),
        "--bridge",
        bridge_dir,
        "--workers",
        "0",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
    ]
    assert main(base + ["--shard", "1/2"]) == 0
    assert "3 inputs of other shards still to do" in capsys.readouterr().out
    assert not out.exists()
    assert main(base + ["--shard", "0/2"]) == 0
    assert f"merged the records of 5 inputs into {out}" in capsys.readouterr().out
    assert [r["path"] for r in records(out)] == clips  # each once, sorted
    assert [r["path"] for r in records(f"{out}.shard-0-of-2.jsonl")] == clips[0::2]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path, bridge_dir):
    clips = write_clips(tmp_path / "clips", 7)
    settings = ["--bridge", bridge_dir, "--batch-size", "2", "--workers", "1", "--max-new-tokens", "8"]
    single = tmp_path / "single.jsonl"
    assert main(["recaption", str(tmp_path / "clips"), "--out", str(single), *settings]) == 0
    out = tmp_path / "two.jsonl"
    launch = [
        *launch_two_processes(),
        "-m",
        "qformer.cli",
        "recaption",
        str(tmp_path / "clips"),
        "--out",
        str(out),
        *settings,
    ]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard 0/2: done 4, failed 0" in result.stdout and "shard 1/2: done 3, failed 0" in result.stdout
    assert f"merged the records of 7 inputs into {out}" in result.stdout
    assert [r["path"] for r in records(out)] == clips
    assert sorted(records(out), key=lambda r: r["path"]) == sorted(records(single), key=lambda r: r["path"])


# ---------------------------------------------------------------- bad inputs


@pytest.mark.slow
def test_bad_inputs_each_get_a_record_and_never_stop_the_run(tmp_path, bridge_dir, capsys):
    d = tmp_path / "data"
    d.mkdir()
    good = write_video(d / "good clip – ünïcode 名前.mp4")
    (d / "zero-byte.mp4").write_bytes(b"")
    whole = write_video(tmp_path / "whole.mp4", frames=16).read_bytes()
    (d / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (d / "text.mp4").write_text("this is not a video\n")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "png-named.mp4", format="PNG")
    # An AVI whose codec tag nobody decodes: PyAV writes MPEG-4 Part 2, then the FourCC is renamed.
    mpeg4 = write_video(tmp_path / "mpeg4.avi", codec="mpeg4", container="avi").read_bytes()
    (d / "unknown-codec.avi").write_bytes(mpeg4.replace(b"FMP4", b"ZZZZ"))
    write_video(d / "zero-frames.mp4", frames=0)
    write_video(d / "8k.mp4", frames=1, size=4320, width=7680, solid=True)
    write_video(d / "one-hour.mp4", frames=3600, size=16, fps=1, solid=True)
    locked = write_video(d / "no-permission.mp4")
    locked.chmod(0)
    (d / "loop").symlink_to(d, target_is_directory=True)
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"video": "data/missing file.mp4"}) + "\n")

    start = time.monotonic()
    assert (
        main(
            [
                "recaption",
                str(d),
                str(manifest),
                "--out",
                str(tmp_path / "out.jsonl"),
                "--bridge",
                bridge_dir,
                "--workers",
                "2",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    seconds = time.monotonic() - start
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    got = {os.path.relpath(r["path"], tmp_path): r for r in records(tmp_path / "out.jsonl")}
    errors = {name: r["error"] for name, r in got.items()}

    root = os.geteuid() == 0  # root reads a chmod 000 file anyway
    expected_errors = {
        "data/zero-byte.mp4": "empty file",
        "data/truncated.mp4": "not a decodable video",
        "data/text.mp4": "not a decodable video",
        "data/unknown-codec.avi": "unsupported video codec",
        "data/zero-frames.mp4": "not a decodable video",
        "data/loop": "symlink loop",
        "data/missing file.mp4": "no such file",
    }
    if not root:
        expected_errors["data/no-permission.mp4"] = "no read permission"
    captioned = {"data/png-named.mp4": 1, "data/8k.mp4": 4, "data/one-hour.mp4": 4, os.path.relpath(good, tmp_path): 4}
    if root:
        captioned["data/no-permission.mp4"] = 4
    assert sorted(got) == sorted(expected_errors | captioned)  # one record per input
    for name, fragment in expected_errors.items():
        assert errors[name] is not None and fragment in errors[name] and str(tmp_path / name) in errors[name], (name, errors[name])
        assert got[name]["caption"] is None
    for name, frames in captioned.items():
        assert errors[name] is None and got[name]["caption"] and got[name]["num_frames"] == frames, (name, got[name])
    assert got["data/one-hour.mp4"]["duration_s"] == pytest.approx(3600, rel=0.01)
    assert summary.startswith(f"done {len(captioned)}, failed {len(expected_errors)}, ")
    # The hour is sampled by seeking, not decoded whole; generous bound for a slow shared machine.
    assert seconds < 120


def test_a_long_clip_is_sampled_without_decoding_it_all(tmp_path, tiny_bridge):
    import adapters.video as video

    write_video(tmp_path / "hour.mp4", frames=3600, size=16, fps=1, solid=True)
    items = rc.discover([str(tmp_path / "hour.mp4")])
    decoded = rc.DecodedItems(items, tiny_bridge.vision.preprocess, 8, None, decode_side(tiny_bridge.vision))
    before = video.frames_decoded
    sample = decoded[0]
    assert sample.error is None and sample.shots[0].pixels.shape == (8, 3, 32, 32)
    # Each sample seeks to the keyframe before it and decodes on: at most one GOP (libx264: 250 frames) each.
    assert video.frames_decoded - before <= 8 * 250 < 3600
