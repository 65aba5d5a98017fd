"""bench/probe.py: the linear probe learns what is there, class means only what is large, and the bench reports every slot for features, queries and prompts."""

from __future__ import annotations

import torch
from conftest import tiny_config

from bench import probe
from qformer import Bridge, world


def test_the_probe_reads_a_separable_label_and_not_noise():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (60,))
    informative = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(60, 3)
    assert torch.equal(probe.linear_probe(informative[:40], y[:40], informative[40:], 3), y[40:])
    noise = torch.randn(600, 8)
    ny = torch.randint(0, 3, (600,))
    chance = (probe.linear_probe(noise[:300], ny[:300], noise[300:], 3) == ny[300:]).float().mean()
    assert chance < 0.45  # a third, give or take


def test_nearest_class_mean_needs_a_large_difference_where_the_linear_probe_does_not():
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert torch.equal(probe.nearest_class_mean(x, y, torch.tensor([[1.0, 9.0], [3.5, -5.0]]), 2), torch.tensor([0, 1]))
    # The label is a 0.01 shift along a dimension buried under 100x larger unrelated variation.
    torch.manual_seed(0)
    y = torch.randint(0, 2, (400,))
    faint = torch.stack([0.01 * y + 0.001 * torch.randn(400), torch.randn(400)], 1)
    assert (probe.linear_probe(faint[:300], y[:300], faint[300:], 2) == y[300:]).float().mean() > 0.95
    assert (probe.nearest_class_mean(faint[:300], y[:300], faint[300:], 2) == y[300:]).float().mean() < 0.7


def test_probe_bench_reports_every_slot_once_per_feature_set_and_per_bridge(tiny_dirs, tmp_path, capsys):
    torch.manual_seed(0)
    Bridge(tiny_config(tiny_dirs)).save_pretrained(tmp_path / "a")
    Bridge(tiny_config(tiny_dirs, instruct=True, qformer_tokenizer=tiny_dirs["llm"])).save_pretrained(tmp_path / "b")
    results = probe.main(
        [
            "--bridge",
            str(tmp_path / "a"),
            "--bridge",
            str(tmp_path / "b"),
            "--train",
            "6",
            "--test",
            "4",
            "--json",
            str(tmp_path / "p.json"),
        ]
    )
    assert len(results) == 7  # both bridges read the same frozen features: one row for them
    assert [k.split()[0] for k in results] == ["features"] + ["queries", "visual", "visual"] * 2
    assert sum(k.endswith("nearest class mean") for k in results) == 2
    for scores in results.values():
        assert set(scores) == {"colour", "colour, one object", "motion", "motion, one object", "size", "shape"}
    assert all(0.0 <= v <= 1.0 or v != v for s in results.values() for v in s.values())  # nan: no one-object test clip
    assert "probes of the first object" in capsys.readouterr().out and (tmp_path / "p.json").exists()


def test_the_itg_row_reads_the_stage_1_head_word_by_word(tiny_dirs, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(tiny_dirs, qformer_tokenizer=tiny_dirs["llm"])
    config.qformer.stage1_heads = True
    bridge = Bridge(config).eval()
    scenes = [world.scene("test-iid", i) for i in range(4)]
    feats = probe.frame_features(bridge, scenes)
    single = torch.tensor([len(s.objects) == 1 for s in scenes])
    scores = probe.itg_words(bridge, scenes, feats, single)
    assert list(scores) == ["colour", "colour, one object", "motion", "motion, one object", "size", "shape"]
    # An ITG head that always predicts the next word right scores 1 on every slot: force it by making
    # its logits the one-hot of the true next word.
    rows = {}

    def perfect_logits(hidden, word):
        ids = rows["ids"]
        out = torch.full((*ids.shape, word.num_embeddings), -1e4)
        out[:, :-1].scatter_(-1, ids[:, 1:, None], 0.0)
        return out

    forward = bridge.qformer.forward

    def remember(features, input_ids, mask, mode):
        rows["ids"] = input_ids
        return forward(features, input_ids, mask, mode=mode)

    bridge.qformer.forward, bridge.heads.lm_logits = remember, perfect_logits
    assert all(v == 1.0 for v in probe.itg_words(bridge, scenes, feats, single).values())

    # Right everywhere but at colour words: only the colour columns drop, so each slot reads its own words.
    colours = torch.tensor(bridge.qformer_tokenizer.convert_tokens_to_ids(list(world.COLOURS)))

    def colour_blind_logits(hidden, word):
        out = perfect_logits(hidden, word)
        wrong = torch.isin(rows["ids"][:, 1:], colours)
        out[:, :-1][wrong] = 0.0  # a tie over every word: argmax takes id 0 (padding), never the colour
        return out

    bridge.heads.lm_logits = colour_blind_logits
    scores = probe.itg_words(bridge, scenes, feats, single)
    assert scores["colour"] == 0.0 and scores["colour, one object"] == 0.0
    assert scores["size"] == scores["shape"] == scores["motion"] == scores["motion, one object"] == 1.0


def test_text_feature_similarity_is_one_where_the_text_side_is_blind(tiny_dirs):
    torch.manual_seed(0)
    config = tiny_config(tiny_dirs, qformer_tokenizer=tiny_dirs["llm"])
    config.qformer.stage1_heads = True
    bridge = Bridge(config).eval()
    scores = probe.text_feature_similarity(bridge)
    assert list(scores) == ["colour", "motion", "size", "shape", "background"]
    assert all(-1.0 <= v < 1.0 - 1e-6 for v in scores.values())  # a random text side tells every slot apart a little
    # A text side that gives every caption the same feature cannot tell any slot apart.
    bridge.heads.text_proj = torch.nn.Sequential(
        bridge.heads.text_proj, torch.nn.Linear(config.qformer.embed_dim, config.qformer.embed_dim)
    )
    torch.nn.init.zeros_(bridge.heads.text_proj[1].weight)
    torch.nn.init.ones_(bridge.heads.text_proj[1].bias)
    assert all(abs(v - 1.0) < 1e-6 for v in probe.text_feature_similarity(bridge).values())
