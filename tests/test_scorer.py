"""Bridge.match / embed_clips / embed_texts and a bridge's scorer, saved in and loaded from scorer/."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open

from qformer import Bridge
from qformer.bridge import SCORER_DIR, WEIGHTS_NAME, load_scorer, save_scorer
from qformer.scorer import clip_features, load_tokenizer, similarity


def clips(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(n)]


def stage1_config(tiny_dirs, heads: bool = True):
    cfg = tiny_config(tiny_dirs, qformer_tokenizer=tiny_dirs["llm"])
    return replace(cfg, qformer=replace(cfg.qformer, stage1_heads=heads))


@pytest.fixture
def stage1_bridge(tiny_dirs):
    torch.manual_seed(0)
    return Bridge(stage1_config(tiny_dirs)).eval()


def test_match_and_embeddings_have_their_shapes_and_unit_norms(stage1_bridge):
    texts = ["a red circle moves left", "a blue square grows", "a green diamond stays still"]
    scores = stage1_bridge.match(clips(3), texts)
    assert len(scores) == 3 and all(isinstance(s, float) and 0.0 < s < 1.0 for s in scores)
    q = stage1_bridge.config.qformer
    clip_emb, text_emb = stage1_bridge.embed_clips(clips(3)), stage1_bridge.embed_texts(texts)
    assert clip_emb.shape == (3, q.num_queries, q.embed_dim) and text_emb.shape == (3, q.embed_dim)
    torch.testing.assert_close(clip_emb.norm(dim=-1), torch.ones(3, q.num_queries))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(3))
    sim = similarity(clip_emb, text_emb)
    assert sim.shape == (3, 3)
    torch.testing.assert_close(sim[1, 2], (clip_emb[1] @ text_emb[2]).max())
    # One clip scored alone gets the same score as in the batch.
    assert stage1_bridge.match(clips(3)[1:2], texts[1:2])[0] == pytest.approx(scores[1], abs=1e-6)
    with pytest.raises(ValueError, match="3 clips and 2 texts"):
        stage1_bridge.match(clips(3), texts[:2])


def test_a_bridge_without_heads_or_scorer_says_so(tiny_dirs, tmp_path):
    torch.manual_seed(0)
    bridge = Bridge(stage1_config(tiny_dirs, heads=False))
    assert bridge.scorer is None
    with pytest.raises(ValueError, match="embed_clips needs a scorer: this bridge has no scorer/ directory beside its weights and no"):
        bridge.embed_clips(clips(1))
    bridge.save_pretrained(tmp_path / "b")
    assert load_scorer(tmp_path / "b") is None


def test_heads_a_stage_2_bridge_kept_are_no_scorer(tiny_dirs, tmp_path):
    """Stage 1 never sets LoRA, an instructed Q-Former or caption-first answers: a bridge with any of them went
    through stage 2, whose Q-Former its old heads no longer fit (the first default bridge scores at chance)."""
    torch.manual_seed(0)
    stage1 = Bridge(stage1_config(tiny_dirs, heads=True))
    assert stage1.scorer is not None
    stage2 = Bridge(replace(stage1_config(tiny_dirs, heads=True), caption_first=True))
    assert stage2.heads is not None and stage2.scorer is None
    stage2.save_pretrained(tmp_path / "b")
    assert load_scorer(tmp_path / "b") is None


def test_a_scorer_saved_in_scorer_keeps_only_what_differs_and_loads_back(tiny_dirs, tmp_path):
    """A generative bridge (no heads) with a scorer trained from its Q-Former, one attention weight changed:
    scorer/ holds that weight and the heads; Bridge.match of the loaded bridge is the scorer's own."""
    torch.manual_seed(0)
    bridge = Bridge(stage1_config(tiny_dirs, heads=False))
    bridge.save_pretrained(tmp_path / "b")
    scorer = Bridge(stage1_config(tiny_dirs), vision=bridge.vision, llm=bridge.llm).eval()
    scorer.qformer.load_state_dict(bridge.qformer.state_dict())
    scorer.projection.load_state_dict(bridge.projection.state_dict())
    with torch.no_grad():
        scorer.qformer.layers[1].self_attn.query.weight.add_(0.5)
    save_scorer(scorer, tmp_path / "b")

    with safe_open(str(tmp_path / "b" / SCORER_DIR / WEIGHTS_NAME), "pt") as f:
        held = set(f.keys())
    assert held == {"qformer.layers.1.self_attn.query.weight"} | {f"heads.{k}" for k in scorer.heads.state_dict()}

    loaded = Bridge.from_pretrained(tmp_path / "b", vision=bridge.vision, llm=bridge.llm)
    assert loaded.heads is None and loaded.scorer is not None
    texts = ["a red circle moves left", "a blue square grows"]
    assert loaded.scorer.match(clips(2), texts) == pytest.approx(scorer.match(clips(2), texts), abs=1e-6)
    torch.testing.assert_close(loaded.embed_clips(clips(2)), scorer.embed_clips(clips(2)))
    # The same scorer without the bridge: no LLM and no vision encoder until clips are given.
    alone = load_scorer(tmp_path / "b")
    assert alone._vision[0] is None
    torch.testing.assert_close(alone.embed_texts(texts), scorer.embed_texts(texts))
    assert alone._vision[0] is None


def test_a_scorer_is_not_saved_beside_a_bridge_it_cannot_take_its_other_weights_from(tiny_dirs, tmp_path):
    """Saved with init (the bridge it learnt on), a scorer keeps only what differs from there and takes the rest
    from the bridge beside it: one with other queries, or no bridge at all, is refused and nothing is written."""
    from adapters.checkpoint import CheckpointError

    torch.manual_seed(0)
    cfg = stage1_config(tiny_dirs, heads=False)
    bridge = Bridge(cfg)
    bridge.save_pretrained(tmp_path / "b")
    other = replace(cfg, qformer=replace(cfg.qformer, num_queries=cfg.qformer.num_queries + 1))
    Bridge(other, vision=bridge.vision, llm=bridge.llm).save_pretrained(tmp_path / "other")
    scorer = Bridge(stage1_config(tiny_dirs), vision=bridge.vision, llm=bridge.llm).eval()
    scorer.qformer.load_state_dict(bridge.qformer.state_dict())

    with pytest.raises(CheckpointError, match=r"other/bridge.safetensors: lacks or reshapes 1 weights .*qformer.query_tokens"):
        save_scorer(scorer, tmp_path / "other", init=tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty/bridge_config.json: cannot be read"):
        save_scorer(scorer, tmp_path / "empty", init=tmp_path / "b")
    assert not (tmp_path / "other" / SCORER_DIR).exists() and not (tmp_path / "empty" / SCORER_DIR).exists()


def test_a_stage1_bridge_directory_is_its_own_scorer(stage1_bridge, tmp_path):
    stage1_bridge.save_pretrained(tmp_path / "s1")
    texts = ["a red circle moves left"]
    alone = load_scorer(tmp_path / "s1")
    torch.testing.assert_close(alone.embed_texts(texts), stage1_bridge.embed_texts(texts))
    assert alone.match(clips(1), texts) == pytest.approx(stage1_bridge.match(clips(1), texts), abs=1e-6)


def test_search_ranks_by_itc_then_reranks_the_best_by_itm(stage1_bridge):
    from qformer.search import rank

    scorer = stage1_bridge.scorer
    features = scorer.clip_features(clips(5))
    embeddings = scorer.embed_features(features)
    text = "a red circle moves left"
    sims = similarity(embeddings, scorer.embed_texts([text]))[:, 0]
    by_itc = rank(scorer, embeddings, None, text, top=5)
    assert [i for i, _ in by_itc] == sims.argsort(descending=True).tolist()
    assert [s for _, s in by_itc] == pytest.approx(sims.sort(descending=True).values.tolist(), abs=1e-6)
    # The 3 best by ITC, re-ranked by ITM's probability; the rest keep ITC's order after them.
    top3 = [i for i, _ in by_itc[:3]]
    probs = scorer.match_features(features[top3], [text] * 3).tolist()
    reranked = rank(scorer, embeddings, features, text, top=5, rerank=3)
    expected = sorted(zip(top3, probs), key=lambda p: -p[1])
    assert [i for i, _ in reranked[:3]] == [i for i, _ in expected]
    assert [p for _, p in reranked[:3]] == pytest.approx([p for _, p in expected], abs=1e-6)
    assert [i for i, _ in reranked[3:]] == [i for i, _ in by_itc[3:]]
    assert len(rank(scorer, embeddings, features, text, top=2, rerank=3)) == 2


# Padding to the longest, truncation (the repeated word), words outside the vocabulary, accents, CJK, an empty text.
TOKENIZER_TEXTS = [
    "a red circle moves left",
    "A Small GREEN triangle shrinks on a gray background.",
    "",
    "Café naïve résumé 東京 über",
    "two yellow triangles ? . , : unknownword",
    "word " * 80,
]


def assert_tokens_as_autotokenizer(directory: str, max_length: int) -> None:
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(directory)(TOKENIZER_TEXTS, padding=True, truncation=True, max_length=max_length)
    got = load_tokenizer(directory, max_length).encode_batch(TOKENIZER_TEXTS)
    assert [e.ids for e in got] == expected["input_ids"]
    assert [e.attention_mask for e in got] == expected["attention_mask"]
    assert {len(e.ids) for e in got} == {min(max_length, max(map(len, expected["input_ids"])))}


@pytest.mark.parametrize("max_length", [8, 64, 512])
def test_the_scorers_tokenizer_gives_autotokenizers_ids_for_the_tiny_tokenizers(tiny_dirs, tmp_path, max_length):
    from conftest import blip_tokenizer

    blip_tokenizer("<bos> $A <eos>").save_pretrained(tmp_path / "cls-sep")  # special tokens around the text, as BERT's
    for directory in (tiny_dirs["llm"], str(tmp_path / "cls-sep")):
        assert_tokens_as_autotokenizer(directory, max_length)


@pytest.mark.backbones
@pytest.mark.parametrize("max_length", [8, 64, 512])
def test_the_scorers_tokenizer_gives_autotokenizers_ids_for_minilm(tmp_path, max_length):
    """MiniLM's tokenizer.json pads and truncates to 128 of its own; the scorer's padding and truncation replace
    them. Without tokenizer.json (a BERT directory of vocab.txt) AutoTokenizer reads the directory."""
    import shutil
    from pathlib import Path

    from adapters.offline import minilm_dir

    assert_tokens_as_autotokenizer(minilm_dir(), max_length)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(minilm_dir()) / name, tmp_path / name)
    assert_tokens_as_autotokenizer(str(tmp_path), max_length)
    assert load_tokenizer("minilm", max_length).encode("a red circle").ids == [101, 1037, 2417, 4418, 102]


def test_a_half_precision_scorer_loads_in_full_precision_and_scores_as_its_bridge(stage1_bridge, tmp_path):
    stage1_bridge.save_pretrained(tmp_path / "b", dtype=torch.float16)
    scorer = load_scorer(tmp_path / "b")
    assert {p.dtype for p in scorer.parameters()} == {torch.float32}
    assert {p.device.type for p in scorer.parameters()} == {"cpu"}
    loaded = Bridge.from_pretrained(tmp_path / "b").eval()
    texts = ["a red circle moves left", "a blue square grows"]
    assert torch.equal(scorer.embed_texts(texts), loaded.embed_texts(texts))
    torch.testing.assert_close(scorer.embed_texts(texts), stage1_bridge.embed_texts(texts), atol=1e-2, rtol=0)


def test_a_captioning_bridge_matches_by_its_own_caption_loss(tiny_dirs):
    """Bridge.match of a bridge that captions: exp of minus the caption loss of the text as the clip's caption,
    each pair as if scored alone (left padding and batching change nothing), with no scorer."""
    torch.manual_seed(0)
    bridge = Bridge(stage1_config(tiny_dirs, heads=False)).eval()
    assert bridge.scorer is None
    texts = ["a red circle moves left", "a blue square", "a green diamond stays still on a gray background"]
    scores = bridge.match(clips(3), texts)
    for clip, text, score in zip(clips(3), texts, scores):
        features = clip_features(bridge.config, bridge.vision, [clip], "cpu")
        batch = bridge.answer_batch([bridge.config.caption_prompt], [text])
        with torch.no_grad():
            loss = bridge(**batch, features=features).loss
        assert score == pytest.approx(float(torch.exp(-loss)), rel=1e-4)
    assert all(0.0 < s <= 1.0 for s in scores)
    assert bridge.match(clips(3)[1:2], texts[1:2])[0] == pytest.approx(scores[1], rel=1e-4)
    with pytest.raises(ValueError, match="3 clips and 2 texts"):
        bridge.match(clips(3), texts[:2])
