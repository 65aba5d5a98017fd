"""`qformer recaption --ray`: the local engine's records from a Ray Data pipeline on a local Ray (2 CPUs), exactly once through kills."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_recaption import (  # noqa: F401 -- bridge_dir: a fixture
    TIMEOUT_S,
    bridge_dir,
    cli,
    kill_after_first_record,
    records,
    write_clips,
    write_video,
)

from qformer.cli import main

# make setup installs the ray extra; without it only the test of the error it gives runs.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="--ray needs the ray extra: pip install 'qformer[ray]'")

SETTINGS = ("--batch-size", "2", "--max-new-tokens", "6")


def by_key(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["path"], r["shot"], r["prompt"]))


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """The same records, field for field, `match` to 1e-5: Ray batches clips otherwise than the local engine,
    and on CPUs without AVX512 a caption's score moved in its last bits with what shared its batch."""
    got, expected = by_key(got), by_key(expected)
    assert [{k: v for k, v in r.items() if k != "match"} for r in got] == [{k: v for k, v in r.items() if k != "match"} for r in expected]
    for g, e in zip(got, expected):
        assert (g["match"] is None) == (e["match"] is None) and (e["match"] is None or g["match"] == pytest.approx(e["match"], rel=1e-5))


@needs_ray
@pytest.mark.slow
def test_ray_gives_the_local_engines_records_and_error_records(tmp_path, bridge_dir, capsys):
    clips = write_clips(tmp_path / "clips", 5)
    (tmp_path / "clips" / "broken.mp4").write_text("this is not a video\n")
    args = [str(tmp_path / "clips"), "--bridge", bridge_dir, *SETTINGS, "--prompt", "describe", "--prompt", "what moves?"]
    assert main(["recaption", *args, "--out", str(tmp_path / "local.jsonl"), "--workers", "1"]) == 0
    assert main(["recaption", *args, "--out", str(tmp_path / "ray.jsonl"), "--ray"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done 10, failed 2, ")

    local, ray = records(tmp_path / "local.jsonl"), records(tmp_path / "ray.jsonl")
    assert_same_records(ray, local)  # the same captions, fields and error texts
    assert Counter(r["path"] for r in ray) == Counter({path: 2 for path in [*clips, str(tmp_path / "clips" / "broken.mp4")]})
    broken = [r for r in ray if r["path"].endswith("broken.mp4")]
    assert all(r["caption"] is None and "not a decodable video" in r["error"] for r in broken)

    # A rerun finds everything recorded and starts no pipeline.
    assert main(["recaption", *args, "--out", str(tmp_path / "ray.jsonl"), "--ray"]) == 0
    assert "6 already done" in capsys.readouterr().out
    assert records(tmp_path / "ray.jsonl") == ray


@needs_ray
@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun_records_every_input_exactly_once(tmp_path, bridge_dir):
    clips = write_clips(tmp_path / "clips", 12)
    settings = ["--bridge", bridge_dir, "--batch-size", "1", "--max-new-tokens", "24"]
    reference = tmp_path / "reference.jsonl"
    assert main(["recaption", str(tmp_path / "clips"), "--out", str(reference), "--workers", "1", *settings]) == 0

    out = tmp_path / "out.jsonl"
    command = cli(str(tmp_path / "clips"), "--out", str(out), *settings, "--ray")
    written = kill_after_first_record(command, out)
    assert 1 <= written < len(clips), "the kill came too late to test anything"

    resumed = subprocess.run(command, check=True, timeout=TIMEOUT_S, capture_output=True, text=True)
    assert "already done" in resumed.stdout
    final = records(out)
    assert Counter(r["path"] for r in final) == Counter(clips)
    assert_same_records(final, records(reference))


def ray_processes(title: str) -> list[int]:
    """Pids of this machine's Ray workers whose process title starts with `title` (Ray names them by their work)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if entry.name.isdigit() and command.startswith(title):
            found.append(int(entry.name))
    return found


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "title",
    ["ray::MapWorker(MapBatches(Captioner))", "ray::Map(decode_row)"],  # an actor holding the bridge, a decode task's worker
    ids=["actor", "decode-worker"],
)
def test_a_killed_actor_or_decode_worker_is_replaced_and_every_input_recorded_once(tmp_path, bridge_dir, title):
    clips = write_clips(tmp_path / "clips", 12)
    settings = ["--bridge", bridge_dir, "--batch-size", "1", "--max-new-tokens", "24"]
    reference = tmp_path / "reference.jsonl"
    assert main(["recaption", str(tmp_path / "clips"), "--out", str(reference), "--workers", "1", *settings]) == 0

    out = tmp_path / "out.jsonl"
    run = subprocess.Popen(
        cli(str(tmp_path / "clips"), "--out", str(out), *settings, "--ray"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + TIMEOUT_S
    victims: list[int] = []
    while not victims and run.poll() is None and time.monotonic() < deadline:
        if title.endswith("(Captioner))") and not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            time.sleep(0.01)  # the actor once it has written a record: killed in the middle of its work
            continue
        victims = ray_processes(title)
    assert victims, "the run ended before the process could be killed"
    os.kill(victims[0], signal.SIGKILL)
    written = out.read_bytes().count(b"\n") if out.exists() else 0
    output, _ = run.communicate(timeout=TIMEOUT_S)
    assert run.returncode == 0, output[-3000:]
    assert written < len(clips), "the kill came too late to test anything"
    final = records(out)
    assert Counter(r["path"] for r in final) == Counter(clips)  # Ray redid the lost work, and nothing twice
    assert_same_records(final, records(reference))


def test_ray_not_installed_is_one_clear_error(tmp_path, bridge_dir, capsys, monkeypatch):
    write_video(tmp_path / "a.mp4")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["recaption", str(tmp_path / "a.mp4"), "--out", str(tmp_path / "out.jsonl"), "--bridge", bridge_dir, "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ray needs Ray Data" in err and "pip install 'qformer[ray]'" in err, err
    assert not (tmp_path / "out.jsonl").exists()
