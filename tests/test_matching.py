"""bench/matching.py: its AUROC exactly, and every figure end to end on a tiny bridge with a scorer."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config

from bench import matching
from qformer import Bridge
from qformer.world.negatives import CHANGED_SLOTS


def test_auroc_counts_pairs_ordered_and_ties_as_half():
    assert matching.auroc([0.9, 0.8], [0.1, 0.8]) == 0.875  # 0.9 > both, 0.8 > 0.1, 0.8 = 0.8 counts half
    assert matching.auroc([0.6, 0.7], [0.1, 0.2, 0.5]) == 1.0
    assert matching.auroc([0.1], [0.2, 0.3]) == 0.0


def test_matching_bench_reports_every_figure(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_config(tiny_dirs, qformer_tokenizer=tiny_dirs["llm"])
    Bridge(replace(cfg, qformer=replace(cfg.qformer, stage1_heads=True))).save_pretrained(tmp_path / "b")
    out = tmp_path / "m.json"
    args = ["--bridge", str(tmp_path / "b"), "--clips", "3", "--search", "4", "--filter", "2", "--threshold", "0", "--json", str(out)]
    results = matching.main(args)
    assert json.loads(out.read_text()) == results
    match = results["match"]
    assert set(match) == {"auroc"} | {f"auroc_{slot}" for slot in CHANGED_SLOTS}
    assert all(0.0 <= v <= 1.0 for v in match.values())
    for way in ("itc", "itm"):
        s = results["search"][way]
        # Four clips, five results asked for: every query's own clip is among them.
        assert s["recall@5"] == 1.0 and 0.0 <= s["recall@1"] <= 1.0 and s["seconds_per_query"] > 0
    f = results["filter"]  # threshold 0 keeps every caption
    assert f["share_kept"] == 1.0 and f["slot_accuracy_kept"] == f["slot_accuracy_all"] and f["threshold"] == 0.0
    assert "match AUROC" in capsys.readouterr().out


def test_a_bridge_without_a_scorer_is_refused(tiny_dirs, tmp_path):
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "b")
    with pytest.raises(SystemExit, match="this bridge has no scorer"):
        matching.main(["--bridge", str(tmp_path / "b")])
