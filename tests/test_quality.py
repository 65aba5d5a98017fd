"""bench/quality.py end to end on a tiny bridge: every figure is computed and well-formed."""
from __future__ import annotations


import pytest
import torch

from qformer import Bridge

from conftest import load_script, tiny_config

pytestmark = pytest.mark.backbones  # reads the easy-VQA test split from its package




def test_quality_bench_runs_and_reports_every_score(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "b")
    results = load_script("bench/quality.py").main(["--bridge", str(tmp_path / "b"), "--world", "2", "--easy-vqa", "3", "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    for key in ("world test-iid captions", "world test-novel captions", "world test-iid vqa", "world test-novel vqa", "easy-vqa test"):
        assert key in results
    iid = results["world test-iid captions"]
    assert iid["clips"] == 2 and 0.0 <= iid["slot_accuracy"] <= 1.0
    assert set(iid["per_slot"]) >= {"background", "count", "size", "colour", "shape", "motion"}
    assert results["easy-vqa test"]["questions"] == 3
    assert "slot accuracy" in printed and (tmp_path / "r.json").exists()
