"""Match scores in recaption records (scored on the features the caption was written from) and `qformer filter`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_recaption import bridge_dir, records, write_clips  # noqa: F401 -- bridge_dir: a fixture
from test_scorer import stage1_config

from qformer import Bridge
from qformer import recaption as rc
from qformer.cli import main


@pytest.fixture(scope="module")
def scorer_bridge_dir(tiny_dirs, tmp_path_factory) -> str:
    """A tiny stage-1 bridge: its heads fit its Q-Former, so it is its own scorer."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("scorer") / "bridge"
    Bridge(stage1_config(tiny_dirs)).save_pretrained(d)
    return str(d)


def recaption(clips: Path, out: Path, bridge: str, *more: str) -> int:
    return main(["recaption", str(clips), "--out", str(out), "--bridge", bridge, "--workers", "0", "--max-new-tokens", "4", *more])


def test_records_carry_the_scorers_match_of_their_caption(tmp_path, scorer_bridge_dir, capsys):
    clips = write_clips(tmp_path / "clips", 3)
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out.jsonl"
    assert (
        recaption(tmp_path / "clips", out, scorer_bridge_dir, "--batch-size", "2", "--prompt", "Describe the clip.", "--prompt", "What?")
        == 0
    )
    got = records(out)
    assert list(got[0]) == list(rc.RECORD_SCHEMA)
    good = [r for r in got if r["error"] is None]
    assert len(good) == 6 and all(isinstance(r["match"], float) and 0.0 < r["match"] < 1.0 for r in good)
    assert [r["match"] for r in got if r["error"] is not None] == [None, None]
    # The score is Bridge.match of the same clip, decoded on its own, and the same caption.
    bridge = Bridge.from_pretrained(scorer_bridge_dir)
    expected = bridge.match([r["path"] for r in good], [r["caption"] for r in good])
    assert [r["match"] for r in good] == pytest.approx(expected, abs=1e-5)
    assert sorted({r["path"] for r in good}) == clips


def test_a_captioning_bridge_scores_by_its_own_captioning_and_older_outputs_resume(tmp_path, bridge_dir, capsys):
    paths = write_clips(tmp_path / "clips", 2)
    out = tmp_path / "out.jsonl"
    assert recaption(tmp_path / "clips", out, bridge_dir) == 0
    got = records(out)
    bridge = Bridge.from_pretrained(bridge_dir)
    assert bridge.scorer is None  # no scorer needed: the bridge judges by its own caption loss
    assert [r["match"] for r in got] == pytest.approx(bridge.match(paths, [r["caption"] for r in got]), abs=1e-5)
    capsys.readouterr()
    # --no-match: the same captions, match null; the output resumes either way.
    bare = tmp_path / "bare.jsonl"
    assert recaption(tmp_path / "clips", bare, bridge_dir, "--no-match") == 0
    assert [(r["caption"], r["match"]) for r in records(bare)] == [(r["caption"], None) for r in got]
    assert recaption(tmp_path / "clips", bare, bridge_dir) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("done 0, failed 0")
    # An output written before records had a match resumes: its records are kept, the missing one is made.
    first, _ = records(out)
    del first["match"]
    out.write_text(json.dumps(first) + "\n")
    assert recaption(tmp_path / "clips", out, bridge_dir) == 0
    assert capsys.readouterr().out.startswith("done 1, failed 0")
    assert ["match" in r for r in records(out)] == [False, True]


# ---------------------------------------------------------------- qformer filter


def scored_records(tmp_path: Path, name: str) -> Path:
    """An output of five records: match 0.9, 0.5, 0.2, an error (null) and a record written before scores (null)."""
    base = dict.fromkeys(rc.RECORD_SCHEMA) | {"shot": 0, "prompt": "Describe the clip.", "bridge": "b", "num_beams": 1}
    rows = [base | {"path": f"/c/{i}.mp4", "caption": f"caption {i}", "match": m} for i, m in enumerate((0.9, 0.5, 0.2))]
    rows += [base | {"path": "/c/3.mp4", "error": "/c/3.mp4: cannot decode"}, base | {"path": "/c/4.mp4", "caption": "caption 4"}]
    out = str(tmp_path / name)
    rc._write_atomic(out, rows)
    return Path(out)


@pytest.mark.parametrize("source, kept", [("all.jsonl", "kept.parquet"), ("all.parquet", "kept.jsonl"), ("all.parquet", "kept.parquet")])
def test_filter_keeps_the_records_that_reach_min_match(tmp_path, capsys, source, kept):
    src = scored_records(tmp_path, source)
    assert main(["filter", str(src), "--min-match", "0.5", "--out", str(tmp_path / kept)]) == 0
    assert capsys.readouterr().err.strip() == "kept 2, dropped 3 (2 without a match score) at --min-match 0.5"
    got = rc.read_records(str(tmp_path / kept))
    assert [(r["path"], r["match"]) for r in got] == [("/c/0.mp4", 0.9), ("/c/1.mp4", 0.5)]
    assert got == [r for r in rc.read_records(str(src)) if r["match"] is not None and r["match"] >= 0.5]
    if kept.endswith(".parquet"):
        import pyarrow.parquet as pq

        assert str(pq.read_schema(tmp_path / kept).field("match").type) == "double"


def test_filter_prints_jsonl_without_out(tmp_path, capsys):
    src = scored_records(tmp_path, "all.jsonl")
    assert main(["filter", str(src), "--min-match", "0.3"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == ["/c/0.mp4", "/c/1.mp4"]
    assert captured.err.strip() == "kept 2, dropped 3 (2 without a match score) at --min-match 0.3"
    assert main(["filter", str(src), "--min-match", "0.95"]) == 0
    assert capsys.readouterr().out == ""


def test_filter_refuses_unscored_outputs_bad_thresholds_and_its_own_source(tmp_path, bridge_dir, capsys):
    write_clips(tmp_path / "clips", 1)
    out = tmp_path / "out.jsonl"
    assert recaption(tmp_path / "clips", out, bridge_dir) == 0
    (record,) = records(out)
    out.write_text(json.dumps(record | {"match": None}) + "\n")  # as an error, or a record made before scores
    capsys.readouterr()
    assert main(["filter", str(out), "--min-match", "0.5"]) == 2
    assert capsys.readouterr().err.startswith(f"qformer filter: error: {out}: none of its 1 records has a match score")
    assert main(["filter", str(out), "--min-match", "1.5"]) == 2
    assert "--min-match is a probability, from 0 to 1; got 1.5" in capsys.readouterr().err
    src = scored_records(tmp_path, "all.jsonl")
    before = src.read_bytes()
    assert main(["filter", str(src), "--min-match", "0.5", "--out", str(src)]) == 2
    assert f"{src}: is the file being filtered" in capsys.readouterr().err
    assert src.read_bytes() == before
