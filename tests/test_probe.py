"""bench/probe.py: the linear probe learns what is there, class means only what is large, and the bench reports every slot for features, queries and prompts."""
from __future__ import annotations

import torch

from qformer import Bridge

from conftest import load_script, tiny_config


def test_the_probe_reads_a_separable_label_and_not_noise():
    bench = load_script("bench/probe.py")
    torch.manual_seed(0)
    y = torch.randint(0, 3, (60,))
    informative = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(60, 3)
    assert torch.equal(bench.linear_probe(informative[:40], y[:40], informative[40:], 3), y[40:])
    noise = torch.randn(600, 8)
    ny = torch.randint(0, 3, (600,))
    chance = (bench.linear_probe(noise[:300], ny[:300], noise[300:], 3) == ny[300:]).float().mean()
    assert chance < 0.45  # a third, give or take


def test_nearest_class_mean_needs_a_large_difference_where_the_linear_probe_does_not():
    bench = load_script("bench/probe.py")
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert torch.equal(bench.nearest_class_mean(x, y, torch.tensor([[1.0, 9.0], [3.5, -5.0]]), 2), torch.tensor([0, 1]))
    # The label is a 0.01 shift along a dimension buried under 100x larger unrelated variation.
    torch.manual_seed(0)
    y = torch.randint(0, 2, (400,))
    faint = torch.stack([0.01 * y + 0.001 * torch.randn(400), torch.randn(400)], 1)
    assert (bench.linear_probe(faint[:300], y[:300], faint[300:], 2) == y[300:]).float().mean() > 0.95
    assert (bench.nearest_class_mean(faint[:300], y[:300], faint[300:], 2) == y[300:]).float().mean() < 0.7


def test_probe_bench_reports_every_slot_once_per_feature_set_and_per_bridge(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "a")
    Bridge(tiny_config(tiny_dirs, instruct=True, qformer_tokenizer=tiny_dirs["llm"])).save_pretrained(tmp_path / "b")
    results = load_script("bench/probe.py").main(
        ["--bridge", str(tmp_path / "a"), "--bridge", str(tmp_path / "b"), "--train", "6", "--test", "4", "--json", str(tmp_path / "p.json")])
    assert len(results) == 7  # both bridges read the same frozen features: one row for them
    assert [k.split()[0] for k in results] == ["features"] + ["queries", "visual", "visual"] * 2
    assert sum(k.endswith("nearest class mean") for k in results) == 2
    for scores in results.values():
        assert set(scores) == {"colour", "colour, one object", "motion", "motion, one object", "size", "shape"}
    assert all(0.0 <= v <= 1.0 or v != v for s in results.values() for v in s.values())  # nan: no one-object test clip
    assert "probes of the first object" in capsys.readouterr().out and (tmp_path / "p.json").exists()
