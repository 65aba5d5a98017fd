"""The bridge on tiny backbones: frozen means frozen, round trips, video, prompts and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from qformer import Bridge, LoraConfig, QFormerConfig
from qformer.model import QFormer, grid_positions


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _batch(bridge, B=2, T=None):
    torch.manual_seed(3)
    shape = (B, 3, 32, 32) if T is None else (B, T, 3, 32, 32)
    ids = torch.randint(6, 40, (B, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    return dict(pixel_values=torch.randn(shape), input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def test_frozen_means_frozen(tiny_bridge):
    bridge = tiny_bridge.train()
    vision0, llm0, q0 = _snapshot(bridge.vision), _snapshot(bridge.llm), _snapshot(bridge.qformer)
    trainable = [p for p in bridge.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        loss = bridge(**_batch(bridge, T=2)).loss
        loss.backward()
        assert all(p.grad is None for p in bridge.vision.parameters())
        assert all(p.grad is None for p in bridge.llm.parameters())
        opt.step()
        opt.zero_grad()
    for before, module in ((vision0, bridge.vision), (llm0, bridge.llm)):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(q0[k], v) for k, v in bridge.qformer.state_dict().items())
    # Exactly the Q-Former (queries and temporal embedding included) and the projection train.
    expected = {id(p) for p in bridge.qformer.parameters()} | {id(p) for p in bridge.projection.parameters()}
    assert {id(p) for p in trainable} == expected
    assert {n for n, p in bridge.qformer.named_parameters()} >= {"query_tokens", "temporal_embed"}


def test_backbones_stay_in_eval_mode(tiny_bridge):
    tiny_bridge.train()
    assert tiny_bridge.qformer.training
    assert not any(m.training for m in tiny_bridge.vision.modules())
    assert not any(m.training for m in tiny_bridge.llm.modules())


def test_parameter_counts(tiny_bridge):
    trainable, total = tiny_bridge.parameter_counts()
    own = sum(p.numel() for p in tiny_bridge.qformer.parameters()) + sum(p.numel() for p in tiny_bridge.projection.parameters())
    backbones = sum(p.numel() for p in tiny_bridge.vision.parameters()) + sum(p.numel() for p in tiny_bridge.llm.parameters())
    assert trainable == own
    assert total == own + backbones


def test_save_and_load_round_trip(tiny_bridge, tiny_dirs, tmp_path):
    bridge = tiny_bridge.eval()
    with torch.no_grad():
        bridge.qformer.temporal_embed.normal_()  # non-zero, so a lost temporal embedding shows
    batch = _batch(bridge, T=3)
    batch.pop("labels")
    with torch.no_grad():
        before = bridge(**batch).logits
    tokens = bridge.generate(**batch, max_new_tokens=5, min_new_tokens=5)
    bridge.save_pretrained(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bridge.safetensors", "bridge_config.json"]
    with safe_open(str(tmp_path / "b" / "bridge.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("qformer.", "projection.")) for k in keys)
    assert json.loads((tmp_path / "b" / "bridge_config.json").read_text())["llm"] == tiny_dirs["llm"]

    loaded = Bridge.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.equal(before, after)
    assert torch.equal(tokens, loaded.generate(**batch, max_new_tokens=5, min_new_tokens=5))


def test_a_loaded_bridge_is_ready_to_answer(tiny_dirs, tmp_path):
    """from_pretrained gives eval mode: with the Q-Former's dropout on, the same question could get another answer."""
    from dataclasses import replace

    cfg = tiny_config(tiny_dirs)
    torch.manual_seed(0)
    Bridge(replace(cfg, qformer=replace(cfg.qformer, dropout=0.5))).save_pretrained(tmp_path / "b")
    loaded = Bridge.from_pretrained(tmp_path / "b")
    assert not loaded.training and not loaded.qformer.training
    batch = _batch(loaded, T=2)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, loaded(**batch).logits)


@pytest.mark.parametrize(
    "qformer", [{}, {"stage1_heads": True}, {"tubelet_frames": 2, "vision_norm": False}, {"num_layers": 3, "cross_attention_every": 2}]
)
def test_shapes_read_without_initial_weights_are_those_of_a_built_bridge(tiny_dirs, qformer):
    from dataclasses import replace

    from qformer.bridge import trainable_parts, trainable_shapes

    cfg = tiny_config(tiny_dirs)
    cfg = replace(cfg, qformer=replace(cfg.qformer, **qformer))
    built = {f"{part}.{k}": tuple(v.shape) for part, m in trainable_parts(cfg).items() for k, v in m.state_dict().items()}
    assert trainable_shapes(cfg) == built
    assert ("heads.itm.weight" in built) == bool(qformer.get("stage1_heads"))


def test_half_precision_file_loads_into_a_full_precision_bridge(tiny_bridge, tmp_path):
    bridge = tiny_bridge.eval()
    batch = _batch(bridge, T=2)
    batch.pop("labels")
    bridge.save_pretrained(tmp_path / "full")
    bridge.save_pretrained(tmp_path / "half", dtype=torch.float16)
    full, half = (load_file(str(tmp_path / d / "bridge.safetensors")) for d in ("full", "half"))
    assert {v.dtype for v in half.values()} == {torch.float16}
    assert all(torch.equal(half[k].float(), full[k].half().float()) for k in full)
    loaded = Bridge.from_pretrained(tmp_path / "half").eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, bridge(**batch).logits, atol=1e-2)


def test_lora_trains_and_round_trips(tiny_dirs, tmp_path):
    torch.manual_seed(0)
    bridge = Bridge(tiny_config(tiny_dirs, lora=LoraConfig(r=2, alpha=4)))
    names = [n for n, p in bridge.llm.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    with torch.no_grad():
        for n, p in bridge.llm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # peft starts B at zero; make LoRA change the output
    bridge.eval().save_pretrained(tmp_path / "b")
    batch = _batch(bridge)
    batch.pop("labels")
    loaded = Bridge.from_pretrained(tmp_path / "b").eval()
    with torch.no_grad():
        assert torch.equal(bridge(**batch).logits, loaded(**batch).logits)


def test_image_is_a_one_frame_clip(tiny_bridge):
    bridge = tiny_bridge.eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(bridge.visual_prompt(px), bridge.visual_prompt(px[:, None]))


def test_temporal_embedding_makes_frame_order_visible(tiny_bridge):
    bridge = tiny_bridge.eval()
    with torch.no_grad():  # sharper attention than at initialisation, where it is nearly uniform
        for layer in bridge.qformer.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.query.weight.normal_(std=0.5)
                layer.cross_attn.key.weight.normal_(std=0.5)
    clip = torch.randn(1, 4, 3, 32, 32)
    reversed_clip = clip.flip(1)
    with torch.no_grad():
        # Cross-attention alone is blind to the order of its keys...
        blind = (bridge.visual_prompt(clip) - bridge.visual_prompt(reversed_clip)).abs().max()
        bridge.qformer.temporal_embed.normal_()
        # ...the learned temporal embedding is what lets the queries see motion.
        seeing = (bridge.visual_prompt(clip) - bridge.visual_prompt(reversed_clip)).abs().max()
    assert blind < 1e-5 and seeing > 1e-2


def _tiny_qformer(**overrides) -> QFormer:
    torch.manual_seed(0)
    cfg = QFormerConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        num_queries=4,
        vision_width=6,
        vocab_size=50,
        max_text_len=16,
        dropout=0.0,
        **overrides,
    )
    qf = QFormer(cfg).eval()
    with torch.no_grad():  # weights of a trained size rather than init's 0.02, so attention is not uniform
        for p in qf.parameters():
            if p.dim() == 2:
                p.normal_(std=0.3)
    return qf


def test_a_tubelet_is_one_place_in_every_frame():
    qf = _tiny_qformer(tubelet_frames=4)
    assert qf.temporal_embed is None  # time is in the tubelet's channels
    features = torch.randn(2, 4, 9, 6)  # (B, T, N, Dv): a 3x3 grid
    tokens = qf.vision_tokens(features)  # (B, N, 4 * Dv)
    normed = qf.vision_norm(features)
    assert tokens.shape == (2, 9, 24)
    for n in range(9):
        assert torch.equal(tokens[:, n], torch.cat([normed[:, t, n] for t in range(4)], dim=1))
    with torch.no_grad():
        # Frame order matters with no temporal embedding...
        assert (qf(features) - qf(features.flip(1))).abs().max() > 1e-2
        # ...an image is a still clip, and a longer clip is read at evenly spaced frames (1, 3, 5, 7 of 8).
        image = torch.randn(2, 1, 9, 6)
        assert torch.equal(qf(image), qf(image.expand(2, 4, 9, 6)))
        eight = torch.randn(2, 8, 9, 6)
        assert torch.equal(qf(eight), qf(eight[:, [1, 3, 5, 7]]))


def test_grid_positions_are_exact_and_let_attention_tell_places_apart():
    s, c = math.sin(1.0), math.cos(1.0)
    # A 2x2 grid, width 5: one frequency (1) per axis, [sin row, cos row, sin col, cos col], one zero channel.
    assert torch.allclose(
        grid_positions(4, 5), torch.tensor([[0, 1, 0, 1, 0], [0, 1, s, c, 0], [s, c, 0, 1, 0], [s, c, s, c, 0]], dtype=torch.float32)
    )
    with pytest.raises(ValueError, match="square grid"):
        grid_positions(17, 8)  # e.g. a ViT's patches with its class token
    # Counted on an 8 x 8 grid, every other token of a 16 x 16 one sits exactly where the 8 x 8 tokens do.
    assert torch.equal(grid_positions(64, 40, 8), grid_positions(64, 40))
    fine = grid_positions(256, 40, 8).view(16, 16, 40)
    assert torch.allclose(fine[::2, ::2], grid_positions(64, 40).view(8, 8, 40), atol=1e-6)
    # ... and the one between them half a step on: at frequency 1, sin and cos of 0.5 (10 channels each).
    assert torch.allclose(fine[1, 1, [0, 10, 20, 30]], torch.tensor([math.sin(0.5), math.cos(0.5)] * 2))
    features = torch.randn(1, 1, 9, 6)
    swapped = features[:, :, [1, 0, 2, 3, 4, 5, 6, 7, 8]]  # the first two places trade contents
    with torch.no_grad():
        # Without positions, cross-attention reads a set of tokens: where a thing is cannot matter.
        plain = _tiny_qformer()
        assert torch.allclose(plain(features), plain(swapped), atol=1e-5)
        placed = _tiny_qformer(grid_positions=True)
        assert (placed(features) - placed(swapped)).abs().max() > 1e-2


def test_too_many_frames_is_a_clear_error(tiny_bridge):
    with pytest.raises(ValueError, match="at most 8"):
        tiny_bridge.visual_prompt(torch.randn(1, 9, 3, 32, 32))


def test_visual_prompt_is_spliced_where_asked(tiny_bridge):
    bridge = tiny_bridge.eval()
    px = torch.randn(1, 3, 32, 32)
    ids = torch.randint(6, 40, (1, 5))
    with torch.no_grad():
        ours = bridge(pixel_values=px, input_ids=ids, visual_position=torch.tensor([2])).logits
        text = bridge.llm.embed(ids)
        embeds = torch.cat([text[:, :2], bridge.visual_prompt(px), text[:, 2:]], dim=1)
        full = bridge.llm(embeds, torch.ones(embeds.shape[:2], dtype=torch.long))
    Q = bridge.config.qformer.num_queries
    assert torch.allclose(ours, torch.cat([full[:, :2], full[:, 2 + Q :]], dim=1), atol=1e-6)


def test_system_prompt_opens_every_chat_and_is_never_a_target(tiny_bridge):
    question, answer = "what color is the background ?", "white"
    plain = tiny_bridge.answer_batch([question], [answer])
    tiny_bridge.config.system_prompt = "describe the clip"
    told = tiny_bridge.answer_batch([question], [answer])
    tok = tiny_bridge.llm.tokenizer
    assert tok.decode(told["input_ids"][0]).startswith(
        "<bos> <unk> describe the clip <eos> <|user|>"
    )  # <|system|> is not in the tiny vocabulary
    assert told["input_ids"].shape[1] == plain["input_ids"].shape[1] + 5
    assert told["visual_position"].item() == plain["visual_position"].item() + 5
    targets = lambda batch: batch["labels"][batch["labels"] != -100].tolist()  # noqa: E731
    assert targets(told) == targets(plain) == tok(f"{answer} <eos>", add_special_tokens=False)["input_ids"]


def test_batched_answers_equal_single_answers(tiny_bridge):
    bridge = tiny_bridge.eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    questions = ["what color is the background ?", "how many objects are there ?", "describe"]
    batched = bridge.ask(images, questions, max_new_tokens=6)
    single = [bridge.answer(img, q, max_new_tokens=6) for img, q in zip(images, questions)]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_caption_takes_paths_pil_and_arrays_alike(tiny_bridge, tmp_path):
    import av

    bridge = tiny_bridge.eval()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo one.png")
    with av.open(str(tmp_path / "clip.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(16):
            frame = np.full((48, 64, 3), 16 * t, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    caps = bridge.caption([str(tmp_path / "photo one.png"), Image.fromarray(image), image, tmp_path / "clip.mp4"], max_new_tokens=4)
    assert len(caps) == 4 and all(isinstance(c, str) for c in caps)
    assert caps[0] == caps[1] == caps[2]


def test_missing_file_is_an_error_naming_it(tiny_bridge, tmp_path):
    from adapters.video import ClipError

    with pytest.raises(ClipError, match="nothing-here.mp4"):
        tiny_bridge.caption([str(tmp_path / "nothing-here.mp4")])


def test_a_missing_bridge_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs/old/checkpoints/step-7: no such bridge directory"):
        Bridge.from_pretrained(tmp_path / "runs" / "old" / "checkpoints" / "step-7")


def test_backbones_that_do_not_fit_are_named(tiny_dirs):
    with pytest.raises(ValueError, match="16-wide features but this bridge's Q-Former reads 24"):
        Bridge(tiny_config(tiny_dirs, vision=tiny_dirs["vit"]))
    with pytest.raises(ValueError, match="is 32 wide but this bridge projects into 64"):
        Bridge(tiny_config(tiny_dirs, llm_width=64))


def test_instructed_bridge_reads_the_question(tiny_dirs):
    torch.manual_seed(0)
    bridge = Bridge(tiny_config(tiny_dirs, instruct=True, qformer_tokenizer=tiny_dirs["llm"])).eval()
    px = torch.randn(1, 3, 32, 32)
    tok = bridge.qformer_tokenizer
    a = tok(["what color is the background ?"], return_tensors="pt")
    b = tok(["how many objects are there ?"], return_tensors="pt")
    with torch.no_grad():
        va = bridge.visual_prompt(px, instruction_ids=a["input_ids"], instruction_mask=a["attention_mask"])
        vb = bridge.visual_prompt(px, instruction_ids=b["input_ids"], instruction_mask=b["attention_mask"])
    assert va.shape == vb.shape == (1, 4, 32)
    assert not torch.allclose(va, vb)
    assert isinstance(bridge.answer(np.zeros((32, 32, 3), np.uint8), "what color is the background ?", max_new_tokens=3), str)


def test_a_caption_first_bridge_answers_after_its_own_caption(tiny_bridge):
    bridge = tiny_bridge.eval()
    prompt = bridge.config.caption_prompt
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    captions = bridge.caption(images)
    assert all(captions)
    earlier = [("how many objects are there ?", "one")]
    # What it must do, spelled out on the same weights: the caption as the chat's first turn.
    expected = bridge.ask(
        images,
        ["what color is the background ?", prompt, "describe"],
        [[(prompt, captions[0])], [], [(prompt, captions[2]), *earlier]],
        max_new_tokens=6,
    )
    bridge.config.caption_first = True
    histories = [[], [], list(earlier)]
    got = bridge.ask(images, ["what color is the background ?", prompt, "describe"], histories, max_new_tokens=6)
    assert got == expected
    assert got[1] == bridge.caption(images[1], max_new_tokens=6)[0]  # the caption prompt itself is asked as it is
    assert histories == [[], [], earlier]  # the caller's histories are left as they were
    # A chat that already opens with a caption is not captioned again.
    opened = [(prompt, "a red square")]
    answer = bridge.answer(images[0], "describe", opened, max_new_tokens=6)
    bridge.config.caption_first = False
    assert answer == bridge.answer(images[0], "describe", opened, max_new_tokens=6)


def test_beam_search_decodes_the_caption_turn_as_the_answer(tiny_bridge):
    bridge = tiny_bridge.eval()
    prompt = bridge.config.caption_prompt
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    beams = bridge.caption(images, num_beams=3)
    assert beams != bridge.caption(images)  # on these weights beam search and greedy differ, so the rest can tell
    questions = ["what color is the background ?", "describe", "how many objects are there ?"]
    expected = bridge.ask(images, questions, [[(prompt, c)] for c in beams], max_new_tokens=6, num_beams=3)
    bridge.config.caption_first = True
    try:
        assert bridge.ask(images, questions, max_new_tokens=6, num_beams=3) == expected
    finally:
        bridge.config.caption_first = False
    with pytest.raises(ValueError, match="num_beams must be 1 .greedy. or more, not 0"):
        bridge.caption(images[0], num_beams=0)


def test_the_decoding_layout_keeps_values_and_ties_and_makes_rows_independent_of_the_batch(tmp_path):
    """lay_out_for_decoding stores the frozen LLM's Linear weights column-major (Bridge.from_pretrained does it):
    no value changes, tied weights stay one tensor, trainable LoRA weights are left as saved, and each row's
    logits at a decoding step come out with the same bits whether it is decoded among 64 rows or among 8."""
    from conftest import make_tokenizer, tiny_llama

    from adapters.llm import load_llm

    torch.manual_seed(0)
    # Wide enough that MKL's sgemm takes its small-batch path, where some CPUs give row-major weights' rows other bits at another batch size.
    path = tiny_llama(make_tokenizer(), tmp_path / "llm", hidden_size=256, intermediate_size=1024, tie_word_embeddings=True)
    llm = load_llm(path, lora=LoraConfig(r=2, alpha=4)).eval()
    base = llm.model.get_base_model()
    before = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    params = dict(llm.model.named_parameters())
    ids = torch.randint(4, len(llm.tokenizer), (64, 1))  # one token a row, as at every decoding step

    def last_logits(rows):
        with torch.no_grad():
            return llm(llm.embed(rows), torch.ones_like(rows))[:, -1]

    row_major_64 = last_logits(ids)
    assert llm.lay_out_for_decoding() is llm
    after = dict(llm.model.named_parameters())
    assert all(after[n] is params[n] and torch.equal(after[n], before[n]) for n in before)
    assert base.lm_head.weight is base.get_input_embeddings().weight
    frozen = base.model.layers[0].mlp.up_proj.weight
    assert not frozen.is_contiguous() and frozen.t().is_contiguous()
    assert all(p.is_contiguous() for n, p in after.items() if "lora_" in n)
    col_major_64, col_major_8 = last_logits(ids), last_logits(ids[:8])
    assert torch.equal(col_major_64[:8], col_major_8)
    assert torch.allclose(col_major_64, row_major_64, atol=1e-4)
    # Whether row-major weights give those rows other bits depends on the CPU's sgemm kernels (on a CPU with
    # AMX they did; on an AMD EPYC with AVX512 and no AMX they do not), so they are not compared: the layout's
    # promise is the equality above, on every CPU.


def test_caption_and_match_decode_the_pixels_the_recaptioner_and_training_decode(tiny_bridge, tmp_path, monkeypatch):
    """A large image or video reaches the vision encoder with the same pixels through Bridge.caption, the
    recaptioner and training: decoded at most twice the encoder's input side (decode_side), then preprocessed."""
    from adapters.video import decode_side
    from qformer.data import ClipDataset, ManifestSource
    from qformer.recaption import DecodedItems, discover

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    frames = tiny_bridge.config.num_frames
    side = decode_side(tiny_bridge.vision)
    assert side is not None and side < 420  # the decoder shrinks this image
    item = discover([str(tmp_path / "big.png")])[0]
    recaptioned = DecodedItems([item], tiny_bridge.vision.preprocess, frames, None, side, tiny_bridge.config.frame_sampling)[0]
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "big.png", "caption": "noise"}) + "\n")
    source = ManifestSource(str(tmp_path / "train.jsonl"))
    trained = ClipDataset([source], frames, None, tiny_bridge.vision.preprocess, sampling=tiny_bridge.config.frame_sampling, max_side=side)[
        0
    ]

    seen = []
    monkeypatch.setattr(tiny_bridge, "answer_pixels", lambda pixels, questions, *a, **kw: seen.append(pixels) or ["x"] * len(questions))
    tiny_bridge.caption([str(tmp_path / "big.png"), Image.open(tmp_path / "big.png")])
    assert torch.equal(seen[0][0], recaptioned.shots[0].pixels)  # a path
    assert torch.equal(seen[0][1], recaptioned.shots[0].pixels)  # a PIL image of the same file
    assert torch.equal(trained["pixels"], recaptioned.shots[0].pixels)
