"""The offline pretrained backbones load and a bridge over them runs end to end on a real photo and a clip."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.backbones


@pytest.fixture(scope="module")
def offline_bridge():
    from adapters.offline import minilm_dir
    from qformer import Bridge, BridgeConfig
    from qformer.convert import load_bert_into_qformer

    torch.manual_seed(0)
    # Instructed, with the MiniLM tokenizer named by role: the saved config must not hold a site-packages path.
    bridge = Bridge(BridgeConfig(vision_resolution=128, num_frames=4, instruct=True, qformer_tokenizer="minilm"))
    load_bert_into_qformer(bridge.qformer, minilm_dir())
    return bridge.eval()


def test_efficientnet_lite0_recognises_a_real_photo():
    import skimage.data

    from adapters.vision import load_vision

    vision = load_vision("efficientnet-lite0")
    with torch.no_grad():
        cat = vision.net(vision.preprocess(skimage.data.chelsea())).argmax(-1).item()
        cup = vision.net(vision.preprocess(skimage.data.coffee())).argmax(-1).item()
    assert 281 <= cat <= 285  # ImageNet's domestic cats (tabby ... Egyptian cat)
    assert cup == 967  # espresso
    assert vision.encode(vision.preprocess(skimage.data.coffee())).shape == (1, 49, 1280)


def test_efficientnet_lite0_block_features_are_the_network_s_own():
    import skimage.data

    from adapters.vision import load_vision

    vision = load_vision("efficientnet-lite0", layer=10, resolution=128)
    px = vision.preprocess(skimage.data.coffee())
    captured = []
    hook = vision.net._blocks[10].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        vision.net.extract_features(px)
    hook.remove()
    tokens = vision.encode(px)
    assert (vision.width, vision.num_tokens, tuple(tokens.shape)) == (112, 64, (1, 64, 112))  # stride 16: 8x8
    assert torch.equal(tokens, captured[0].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="blocks 0..15; got layer 16"):
        load_vision("efficientnet-lite0", layer=16)


def test_smollm2_loads_with_its_chat_template():
    from adapters.llm import load_llm

    llm = load_llm("smollm2-135m-instruct")
    assert llm.width == 576
    ids, at = llm.chat_prompt("what color is the background?")
    text = llm.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert llm.tokenizer.decode(ids[at:]).startswith("what color is the background?")
    assert not any(p.requires_grad for p in llm.parameters())


def test_bridge_over_offline_backbones_captions_a_photo_and_a_clip(offline_bridge, tmp_path):
    import skimage.data

    from qformer import world

    clip_path = tmp_path / "world clip.mp4"
    world.write_mp4(world.render(world.scene("test-iid", 0)), clip_path)
    caps = offline_bridge.caption([skimage.data.astronaut(), str(clip_path)], max_new_tokens=8)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)

    px = torch.stack([offline_bridge.vision.preprocess(world.render(world.scene("test-iid", 1))[::4])])
    assert px.shape == (1, 4, 3, 128, 128) and px.dtype == torch.float32
    feats = offline_bridge.frame_features(px)
    assert feats.shape == (1, 4, 16, 1280) and feats.dtype == torch.float32
    prompt = offline_bridge.visual_prompt(features=feats)
    assert prompt.shape == (1, 32, 576) and prompt.dtype == torch.float32
    offline_bridge.save_pretrained(tmp_path / "bridge")
    assert '"qformer_tokenizer": "minilm"' in (tmp_path / "bridge" / "bridge_config.json").read_text()
    trainable, total = offline_bridge.parameter_counts()
    own = sum(p.numel() for m in (offline_bridge.qformer, offline_bridge.projection) for p in m.parameters())
    assert trainable == own and total - own > 100_000_000  # SmolLM2-135M and EfficientNet-Lite0 stay frozen


def test_gemma3_loads_for_rebridging_and_speaks_in_the_format_it_knows():
    import torch

    from adapters.llm import load_llm

    llm = load_llm("gemma3-270m")
    assert llm.width == 640
    # The offline Gemma-3-270M is the pretrained base model: it never learned Gemma's turn tokens (the
    # answer "Paris<end_of_turn>" costs 31 nats at <end_of_turn>), so it gets BLIP-2's plain question format.
    tok = llm.tokenizer
    ids, at = llm.chat_prompt("What is the capital of France?")
    assert at == 0 and tok.decode(ids) == "<bos>Question: What is the capital of France? Answer:"
    with torch.no_grad():
        logits = llm(llm.embed(torch.tensor([ids])), torch.ones(1, len(ids), dtype=torch.long))
    assert tok.decode(int(logits[0, -1].argmax())) == " Paris"
    told, _ = llm.chat_prompt("what shape is the red object?", system="Answer in one word.")
    assert tok.decode(told) == "<bos>Answer in one word. Question: what shape is the red object? Answer:"
    assert llm.chat_prompt("what shape is the red object?", system="") == llm.chat_prompt("what shape is the red object?")
