"""bench/rebridge.py end to end on tiny backbones: two arms trained (or the bridge's alone), every checkpoint scored, table, JSON and PNG."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_tokenizer, tiny_config, tiny_llama

from bench import rebridge
from demos import world_data
from qformer import Bridge
from qformer.config import LoraConfig

pytestmark = pytest.mark.backbones  # the MiniLM arm and the easy-VQA training split come from their packages


def test_rebridge_trains_both_arms_scores_every_checkpoint_and_reuses_finished_runs(tiny_dirs, tmp_path, capfd):
    # The new LLM is wider than the source's (48 against 32), so the projection must be new.
    tiny_llama(make_tokenizer(), tmp_path / "new-llm", hidden_size=48)
    torch.manual_seed(0)
    # A source with LoRA adapters and tubelets: each arm gets both.
    config = tiny_config(tiny_dirs, lora=LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    Bridge(replace(config, qformer=replace(config.qformer, tubelet_frames=config.num_frames))).save_pretrained(tmp_path / "source")
    world_data.main([str(tmp_path / "data"), "--clips", "4"])

    argv = [
        "--data",
        str(tmp_path / "data"),
        "--source",
        str(tmp_path / "source"),
        "--llm",
        str(tmp_path / "new-llm"),
        "--steps",
        "3",
        "--projection-steps",
        "1",
        "--eval-every",
        "1",
        "--world",
        "2",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]
    results = rebridge.main(argv)
    printed = capfd.readouterr().out
    assert "new projection into" in printed and "(48 wide)" in printed
    assert results["steps"] == [1, 2, 3]
    assert results["step_at_95"] in (None, 1, 2, 3) and "0.95 of the source: " in printed
    assert set(results["slot_accuracy"]) == {"from-bridge", "from-minilm"}
    assert all(len(v) == 3 and all(0.0 <= a <= 1.0 for a in v) for v in results["slot_accuracy"].values())
    assert json.loads((tmp_path / "out" / "rebridge.json").read_text()) == results
    assert (tmp_path / "out" / "rebridge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    minilm_arm = Bridge.from_pretrained(tmp_path / "out" / "from-minilm").config
    assert minilm_arm.qformer.hidden_size == 384  # MiniLM
    assert minilm_arm.lora == Bridge.from_pretrained(tmp_path / "out" / "from-bridge").config.lora == config.lora
    assert minilm_arm.qformer.tubelet_frames == Bridge.from_pretrained(tmp_path / "out" / "from-bridge").config.qformer.tubelet_frames == 4
    # The first part trains the projection alone: the source's Q-Former is untouched at its end, not after.
    source_q = Bridge.from_pretrained(tmp_path / "source").qformer.state_dict()
    first_q = Bridge.from_pretrained(tmp_path / "out" / "from-bridge" / "projection").qformer.state_dict()
    last_q = Bridge.from_pretrained(tmp_path / "out" / "from-bridge").qformer.state_dict()
    assert all(torch.equal(source_q[k], first_q[k]) for k in source_q)
    assert not all(torch.equal(source_q[k], last_q[k]) for k in source_q)

    # Finished arms are reused, not trained again: the same figures come back.
    again = rebridge.main(argv)
    assert "python train.py" not in capfd.readouterr().out
    assert again["slot_accuracy"] == results["slot_accuracy"]

    # --no-minilm trains and scores the bridge's arm alone: the same figures (same seed), no MiniLM run.
    alone = rebridge.main([*argv[:-1], str(tmp_path / "alone"), "--no-minilm"])
    printed = capfd.readouterr().out
    assert not (tmp_path / "alone" / "from-minilm").exists() and "from MiniLM" not in printed
    assert alone["slot_accuracy"] == {"from-bridge": results["slot_accuracy"]["from-bridge"]}
