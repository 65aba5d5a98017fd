"""Parity with transformers: BLIP-2, InstructBLIP and InstructBLIP-Video checkpoints (OPT and T5 language models), BERT
initialisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint

from adapters.checkpoint import CheckpointError
from qformer import Bridge, QFormer, QFormerConfig
from qformer.convert import load_bert_into_qformer


def _tiny_blip2(path, cross_every=2, seed=0):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            encoder_hidden_size=32,
            vocab_size=100,
            cross_attention_frequency=cross_every,
        ).to_dict(),
        text_config=OPTConfig(
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            vocab_size=120,
            word_embed_proj_dim=40,
            max_position_embeddings=64,
        ).to_dict(),
        num_query_tokens=5,
        image_token_index=110,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    # transformers zero-initialises the queries; give them values so the test can see a wrong mapping.
    with torch.no_grad():
        model.query_tokens.normal_()
        for p in model.qformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("cross_every", [1, 2])
def test_from_blip2_matches_transformers_logits_and_greedy_tokens(tmp_path, cross_every):
    hf = _tiny_blip2(tmp_path / "blip2", cross_every)
    bridge = Bridge.from_blip2(tmp_path / "blip2").eval()
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.randint(4, 100, (2, 7))
    ids[:, 0] = 2  # OPT's BOS
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding in the second row
    Q = hf.config.num_query_tokens
    image_ids = torch.full((2, Q), hf.config.image_token_index)
    with torch.no_grad():
        theirs = hf(
            pixel_values=px, input_ids=torch.cat([image_ids, ids], 1), attention_mask=torch.cat([torch.ones_like(image_ids), mask], 1)
        ).logits[:, Q:]
        ours = bridge(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    assert ours.shape == theirs.shape == (2, 7, 120)
    valid = mask.bool()
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-4), (ours[valid] - theirs[valid]).abs().max()

    prompt = ids[:, :4]
    with torch.no_grad():
        theirs_gen = hf.generate(
            pixel_values=px, input_ids=torch.cat([image_ids, prompt], 1), max_new_tokens=6, do_sample=False, min_new_tokens=6
        )
        ours_gen = bridge.generate(pixel_values=px, input_ids=prompt, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(ours_gen, theirs_gen[:, -6:])


def test_from_blip2_rejects_other_checkpoints(tmp_path, tiny_dirs):
    with pytest.raises(
        CheckpointError, match=r"config.json: expected a BLIP-2, InstructBLIP or InstructBLIP-Video checkpoint .* found 'llama'"
    ):
        Bridge.from_blip2(tiny_dirs["llm"])


IMAGES = [np.full((40, 48, 3), colour, np.uint8) for colour in ((200, 30, 30), (30, 30, 220))]
PROMPT = "what color is the background ?"


@pytest.mark.parametrize("kind, llm", [("blip-2", "t5"), ("instructblip", "opt"), ("instructblip", "t5")])
def test_checkpoint_directories_match_transformers(tmp_path, kind, llm):
    hf, processor = tiny_checkpoint(tmp_path / "ckpt", kind, llm)
    bridge = Bridge.from_pretrained(tmp_path / "ckpt")
    assert bridge.config.instruct == (kind == "instructblip") and bridge.llm.is_encoder_decoder == (llm == "t5")
    inputs = processor(images=IMAGES, text=[PROMPT] * 2, return_tensors="pt")
    px = torch.stack([bridge.vision.preprocess(image) for image in IMAGES])  # (B, 1, 3, H, W)
    assert torch.equal(px[:, 0], inputs.pixel_values)
    # The prompt reaches the LLM (and an InstructBLIP Q-Former) verbatim, as the processor tokenises it.
    batch = bridge._prompt_batch([PROMPT] * 2, [[], []])
    Q = hf.config.num_query_tokens
    assert torch.equal(batch["input_ids"], inputs.input_ids[:, Q:])
    if kind == "instructblip":
        assert torch.equal(batch["instruction_ids"], inputs.qformer_input_ids)

    start = 1 if llm == "t5" else inputs.input_ids.shape[1]  # a decoder's start token, or the prompt
    with torch.no_grad():
        theirs = hf.generate(**inputs, max_new_tokens=6, min_new_tokens=6)[:, start:]
        ours = bridge.generate(px, **batch, max_new_tokens=6, min_new_tokens=6)
        assert torch.equal(ours, theirs), (ours, theirs)
        captions = processor.batch_decode(hf.generate(**inputs, max_new_tokens=6)[:, start:], skip_special_tokens=True)
        assert bridge.ask(IMAGES, [PROMPT] * 2, max_new_tokens=6) == [c.strip() for c in captions]

        if llm == "t5":
            # BLIP-2's prefix-LM: the prompt into the encoder, the answer as the decoder's labels.
            answer = processor.tokenizer(["green image"] * 2, return_tensors="pt").input_ids
            theirs = hf(**inputs, labels=answer)
            ids = torch.cat([batch["input_ids"], answer], 1)
            labels = torch.cat([torch.full_like(batch["input_ids"], -100), answer], 1)
            ours = bridge(px, ids, torch.ones_like(ids), labels, **{k: v for k, v in batch.items() if "instruction" in k})
            assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)
        else:
            theirs = hf(**inputs)
            theirs.logits = theirs.logits[:, Q:]
            ours = bridge(px, **batch)
    assert ours.logits.shape == theirs.logits.shape
    assert (ours.logits - theirs.logits).abs().max() < 1e-4


@pytest.mark.parametrize("llm", ["opt", "t5"])
def test_instructblip_video_checkpoint_matches_transformers(tmp_path, llm):
    """InstructBLIP-Video without its processor, whose video processor needs torchvision: both models get the
    same pixel values (B, 4, 3, H, W) and the ids that processor makes ("<video>" 4 x queries times, then the
    prompt; the Q-Former's own tokens of it)."""
    from transformers import AutoTokenizer

    hf, _ = tiny_checkpoint(tmp_path / "ckpt", "instructblipvideo", llm)
    bridge = Bridge.from_pretrained(tmp_path / "ckpt")
    assert bridge.config.qformer.frame_queries and bridge.config.num_frames == 4
    assert bridge.llm.is_encoder_decoder == (llm == "t5")
    # Two prompts of one length: padding is left out, as the processor and a bridge put it in different places.
    prompts = ["what color is the background ?", "how many objects are there ?"]
    batch = bridge._prompt_batch(prompts, [[], []])
    text = AutoTokenizer.from_pretrained(tmp_path / "ckpt")(prompts, return_tensors="pt")
    qtext = AutoTokenizer.from_pretrained(tmp_path / "ckpt" / "qformer_tokenizer")(prompts, return_tensors="pt")
    assert torch.equal(batch["input_ids"], text.input_ids) and torch.equal(batch["instruction_ids"], qtext.input_ids)
    video = torch.full((2, 4 * hf.config.num_query_tokens), hf.config.video_token_index)
    inputs = dict(
        input_ids=torch.cat([video, text.input_ids], 1),
        attention_mask=torch.cat([torch.ones_like(video), text.attention_mask], 1),
        qformer_input_ids=qtext.input_ids,
        qformer_attention_mask=qtext.attention_mask,
    )
    torch.manual_seed(1)
    px = torch.randn(2, 4, 3, 32, 32)
    start = 1 if llm == "t5" else inputs["input_ids"].shape[1]  # a decoder's start token, or the prompt
    with torch.no_grad():
        theirs = hf.generate(pixel_values=px, **inputs, max_new_tokens=6, min_new_tokens=6)[:, start:]
        ours = bridge.generate(px, **batch, max_new_tokens=6, min_new_tokens=6)
        assert torch.equal(ours, theirs), (ours, theirs)
        # Every frame counts, in its place: reversed, the frames give other tokens.
        assert not torch.equal(bridge.generate(px.flip(1), **batch, max_new_tokens=6, min_new_tokens=6), ours)

        if llm == "t5":
            answer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")(["green image"] * 2, return_tensors="pt").input_ids
            theirs = hf(pixel_values=px, **inputs, labels=answer)
            ids = torch.cat([batch["input_ids"], answer], 1)
            labels = torch.cat([torch.full_like(batch["input_ids"], -100), answer], 1)
            ours = bridge(px, ids, torch.ones_like(ids), labels, **{k: v for k, v in batch.items() if "instruction" in k})
            assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)
        else:
            theirs = hf(pixel_values=px, **inputs)
            theirs.logits = theirs.logits[:, video.shape[1] :]
            ours = bridge(px, **batch)
        assert ours.logits.shape == theirs.logits.shape
        # Relative as well: the two sum in other orders, and on CPUs without AVX512 logits near 13 differed by 2e-4.
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)

        # Clips through Bridge.ask: 4 frames sampled from each, read as the pixels above are.
        clips = [np.random.default_rng(i).integers(0, 256, (8, 40, 48, 3), dtype=np.uint8) for i in range(2)]
        px = torch.stack([bridge.vision.preprocess(clip[1::2]) for clip in clips])  # frames 1, 3, 5, 7: the centres of 4 parts
        ids = hf.generate(pixel_values=px, **inputs, max_new_tokens=6)[:, start:]
        expected = [t.strip() for t in bridge.llm.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        assert bridge.ask(clips, prompts, max_new_tokens=6) == expected


def _tiny_bert(path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=90, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40
        ),
        add_pooling_layer=False,
    ).eval()
    with torch.no_grad():
        model.embeddings.token_type_embeddings.weight.normal_()  # so forgetting the token-type fold shows
    model.save_pretrained(path)
    return model


def test_bert_init_matches_bert_on_text(tmp_path):
    bert = _tiny_bert(tmp_path / "bert")
    qf = QFormer(
        QFormerConfig(
            hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48, vocab_size=90, max_text_len=40, vision_width=16, num_queries=3
        )
    )
    load_bert_into_qformer(qf, str(tmp_path / "bert"))
    qf.eval()
    ids = torch.randint(1, 90, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = qf(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-5)
    # The query feed-forward starts as a copy of the text one (BLIP-2's initialisation).
    assert torch.equal(qf.layers[1].mlp_query.fc_in.weight, qf.layers[1].mlp_text.fc_in.weight)


def test_bert_init_names_the_mismatch(tmp_path):
    _tiny_bert(tmp_path / "bert")
    qf = QFormer(QFormerConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=48, vocab_size=90, max_text_len=40))
    with pytest.raises(ValueError, match="hidden size 32 != 64"):
        load_bert_into_qformer(qf, str(tmp_path / "bert"))


@pytest.mark.backbones
def test_minilm_init_matches_bertmodel():
    from transformers import AutoTokenizer, BertModel

    from adapters.offline import minilm_dir

    path = minilm_dir()
    qf = QFormer(QFormerConfig()).eval()
    load_bert_into_qformer(qf, path)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a small red circle moves left", "what color is the background?"], padding=True, return_tensors="pt")
    bert = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    with torch.no_grad():
        theirs = bert(**enc).last_hidden_state
        ours = qf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    valid = enc["attention_mask"].bool()
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-4)
