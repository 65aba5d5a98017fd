"""qformer index (every clip embedded once, exactly once through kills) and qformer search (ITC candidates
re-ranked by ITM), with a tiny stage-1 bridge as its own scorer."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_match_records import scorer_bridge_dir  # noqa: F401 -- a fixture
from test_recaption import TIMEOUT_S, bridge_dir, write_clips  # noqa: F401 -- bridge_dir: a fixture

from qformer import Bridge
from qformer.cli import main
from qformer.index import Index, parts, read_entries
from qformer.scorer import similarity

TEXT = "a red circle moves left"


def index(out: Path, bridge: str, *inputs, batch_size: int = 2) -> int:
    return main(["index", *map(str, inputs), "--out", str(out), "--bridge", bridge, "--workers", "0", "--batch-size", str(batch_size)])


@pytest.fixture(scope="module")
def small_index(scorer_bridge_dir, tmp_path_factory):  # noqa: F811
    """Five clips and a broken file, indexed: (index dir, the clips' paths)."""
    root = tmp_path_factory.mktemp("index")
    clips = write_clips(root / "clips", 5)
    (root / "clips" / "broken.mp4").write_bytes(b"not a video")
    assert index(root / "index", scorer_bridge_dir, root / "clips") == 0
    return root / "index", clips


def search(capsys, *args: str) -> list[str]:
    capsys.readouterr()
    assert main(["search", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_index_holds_each_clip_once_with_the_scorers_embeddings(small_index, scorer_bridge_dir, capsys):  # noqa: F811
    directory, clips = small_index
    entries = [e for p in parts(directory) for e in read_entries(p)]
    assert sorted(e["path"] for e in entries if "error" not in e) == clips
    assert [Path(e["path"]).name for e in entries if "error" in e] == ["broken.mp4"]
    loaded = Index(directory)
    bridge = Bridge.from_pretrained(scorer_bridge_dir)
    paths = [e["path"] for e in loaded.entries]
    torch.testing.assert_close(loaded.embeddings, bridge.embed_clips(paths), atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.features[[0, 3]], bridge.scorer.clip_features([paths[0], paths[3]]), atol=1e-5, rtol=0)
    # A rerun finds everything indexed, the broken file included (its error is recorded, not retried).
    assert index(directory, scorer_bridge_dir, directory.parent / "clips") == 0
    assert capsys.readouterr().out.strip() == "indexed 0, failed 0, 6 already indexed"


def test_search_ranks_by_itm_over_the_itc_candidates(small_index, scorer_bridge_dir, capsys):  # noqa: F811
    directory, clips = small_index
    bridge = Bridge.from_pretrained(scorer_bridge_dir)
    # Five clips, fewer than --rerank 16: ITM re-ranks them all, so the order is Bridge.match's.
    probs = bridge.match(clips, [TEXT] * len(clips))
    expected = sorted(zip(clips, probs), key=lambda p: -p[1])
    found = [json.loads(line) for line in search(capsys, str(directory), TEXT, "--json", "--top", "3", "--rerank", "16")]
    assert [f["path"] for f in found] == [p for p, _ in expected[:3]]
    assert [f["score"] for f in found] == pytest.approx([s for _, s in expected[:3]], abs=1e-5)
    assert all(f["start_s"] == 0.0 and f["end_s"] == 1.0 for f in found)
    # Without re-ranking (the default): ITC's cosines.
    sims = similarity(bridge.embed_clips(clips), bridge.embed_texts([TEXT]))[:, 0].tolist()
    by_itc = sorted(zip(clips, sims), key=lambda p: -p[1])
    found = [json.loads(line) for line in search(capsys, str(directory), TEXT, "--json")]
    assert [f["path"] for f in found] == [p for p, _ in by_itc]
    assert [f["score"] for f in found] == pytest.approx([s for _, s in by_itc], abs=1e-5)
    # The plain listing: score and path, best first.
    threads = torch.get_num_threads()
    lines = search(capsys, str(directory), TEXT, "--top", "2", "--rerank", "16")
    assert lines == [f"{s:.4f}  {p}" for p, s in expected[:2]]
    assert torch.get_num_threads() == threads  # searched on one thread, and the caller's count given back


def test_the_clip_whose_caption_is_the_query_comes_first(small_index, scorer_bridge_dir, capsys):  # noqa: F811
    """Each clip's best caption among a few, by the scorer: searching that caption finds that clip first."""
    directory, clips = small_index
    bridge = Bridge.from_pretrained(scorer_bridge_dir)
    captions = ["a red circle moves left", "a blue square grows", "a green diamond stays still", "two yellow triangles", "a white square"]
    probs = torch.tensor([bridge.match(clips, [c] * len(clips)) for c in captions])  # (captions, clips)
    caption, clip = divmod(int(probs.argmax()), len(clips))  # the pair that fits best of all
    assert probs[caption].argmax() == clip
    found = [json.loads(line) for line in search(capsys, str(directory), captions[caption], "--json", "--top", "1", "--rerank", "16")]
    assert [f["path"] for f in found] == [clips[clip]]


def test_search_never_loads_the_llm_or_the_vision_encoder(small_index, monkeypatch, capsys):
    import adapters.llm
    import adapters.vision
    import qformer.bridge
    import qformer.scorer

    def refuse(*args, **kwargs):
        raise AssertionError("search loaded a backbone")

    for module, name in ((adapters.llm, "load_llm"), (qformer.bridge, "load_llm"), (adapters.vision, "load_vision")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(qformer.bridge, "load_vision", refuse)
    monkeypatch.setattr(qformer.scorer, "load_vision", refuse)
    directory, _ = small_index
    assert len(search(capsys, str(directory), TEXT, "--json")) == 5


def test_a_search_imports_no_model_classes_no_dynamo_and_no_decoders(small_index):
    """What keeps a cold search fast: transformers (AutoTokenizer alone took 0.8 s), torch._dynamo (drawing
    initial weights on the meta device imports it, about 1 s), PyAV and Pillow are never imported, nor the
    web and launch libraries."""
    directory, _ = small_index
    code = (
        "import sys\n"
        "from qformer.cli import main\n"
        f"assert main(['search', {str(directory)!r}, {TEXT!r}, '--json']) == 0\n"
        "heavy = ('transformers', 'torch._dynamo', 'av', 'PIL', 'gradio', 'accelerate')\n"
        "print(sorted(m for m in sys.modules if m.startswith(tuple(h + '.' for h in heavy)) or m in heavy))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT_S, capture_output=True, text=True)
    lines = run.stdout.splitlines()
    assert len(lines) == 6 and all(json.loads(line)["path"] for line in lines[:5])
    assert lines[5] == "[]"


def test_index_and_search_need_a_scorer_and_an_index(tmp_path, bridge_dir, scorer_bridge_dir, small_index, capsys):  # noqa: F811
    import shutil

    write_clips(tmp_path / "clips", 1)
    assert index(tmp_path / "index", bridge_dir, tmp_path / "clips") == 2
    assert f"{bridge_dir}: qformer index needs a scorer" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()
    # An index of another bridge is refused (its embeddings are in another space); so is a directory of other files.
    directory, _ = small_index
    other = shutil.copytree(scorer_bridge_dir, tmp_path / "other")
    assert index(directory, str(other), tmp_path / "clips") == 2
    assert f"{directory}: is an index of the bridge {scorer_bridge_dir!r}, not {str(other)!r}" in capsys.readouterr().err
    assert index(tmp_path / "clips", scorer_bridge_dir, tmp_path / "clips") == 2
    assert "holds files and no index.json, so it is no index" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "clips"), TEXT]) == 2
    assert "no index.json, so it is no index" in capsys.readouterr().err
    assert main(["search", str(directory), TEXT, "--rerank", "-1"]) == 2
    assert "--rerank must be 0 or more, got -1" in capsys.readouterr().err


def kill_after_first_part(command: list[str], directory: Path) -> int:
    """Start command, SIGKILL it once the index holds a part, and return how many parts it holds then."""
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    while not (directory.is_dir() and parts(directory)):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before writing a part"
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait()
    return len(parts(directory))


@pytest.mark.slow
def test_sigkill_then_rerun_indexes_every_clip_exactly_once(tmp_path, scorer_bridge_dir):  # noqa: F811
    clips = write_clips(tmp_path / "clips", 40)
    settings = ["--bridge", scorer_bridge_dir, "--batch-size", "1", "--workers", "1"]
    assert main(["index", str(tmp_path / "clips"), "--out", str(tmp_path / "reference"), *settings]) == 0

    out = tmp_path / "index"
    command = [sys.executable, "-m", "qformer.cli", "index", str(tmp_path / "clips"), "--out", str(out), *settings]
    written = kill_after_first_part(command, out)
    assert 1 <= written < len(clips), "the kill came too late to test anything"
    resumed = subprocess.run(command, check=True, timeout=TIMEOUT_S, capture_output=True, text=True)
    assert resumed.stdout.strip().endswith(f", {written} already indexed")
    got, reference = Index(out), Index(tmp_path / "reference")
    assert Counter(e["path"] for e in got.entries) == Counter(clips)
    order = {e["path"]: i for i, e in enumerate(reference.entries)}
    rows = [order[e["path"]] for e in got.entries]
    torch.testing.assert_close(got.embeddings, reference.embeddings[rows])
    assert not list(out.glob(".*.tmp"))
