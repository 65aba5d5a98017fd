"""bench/grounding.py: a bridge whose visual prompt is one constant shows no gap and no spread; a live one shows both."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config

from bench import grounding
from qformer import Bridge


def test_spread_is_the_std_across_clips_over_the_rms():
    x = torch.tensor([[1.0], [3.0]])  # std across clips sqrt(2), RMS sqrt(5)
    assert grounding.spread(x) == pytest.approx(math.sqrt(2) / math.sqrt(5))


def test_a_collapsed_prompt_shows_no_gap_and_no_spread_and_a_live_one_shows_both(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    live = Bridge(tiny_config(tiny_dirs))
    live.save_pretrained(tmp_path / "live")
    collapsed = Bridge(tiny_config(tiny_dirs))
    with torch.no_grad():  # the projection ignores the queries: the same prompt for every clip
        collapsed.projection.weight.zero_()
        collapsed.projection.bias.normal_()
    collapsed.save_pretrained(tmp_path / "collapsed")

    dead = grounding.main(
        ["--bridge", str(tmp_path / "collapsed"), "--clips", "4", "--batch-size", "3", "--json", str(tmp_path / "d.json")]
    )
    assert dead["prompt_spread"] == 0.0
    assert dead["caption_loss_right_clip"] == pytest.approx(dead["caption_loss_wrong_clip"], abs=1e-6)
    assert dead["query_spread"] > 0  # the Q-Former still sees the clips; the projection drops them
    assert "gap (0 = clip ignored)" in capsys.readouterr().out and (tmp_path / "d.json").exists()

    alive = grounding.main(["--bridge", str(tmp_path / "live"), "--clips", "4", "--batch-size", "3"])
    assert alive["prompt_spread"] > 0
    assert abs(alive["gap"]) > 1e-6


def test_one_clip_cannot_be_paired_with_another(tiny_dirs, tmp_path, capsys):
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "b")
    with pytest.raises(SystemExit):
        grounding.main(["--bridge", str(tmp_path / "b"), "--clips", "1"])
    assert "--clips 1: pairing a caption with another clip needs at least 2 clips" in capsys.readouterr().err
