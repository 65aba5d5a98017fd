"""Every vision encoder family with every LLM family: a bridge builds, trains through train.py with both
backbones left bitwise untouched, saves, loads and generates the same tokens. Tiny random models built
from configs (2 layers, 16 to 64 wide), saved once per session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SPECIALS, WORDS, blip_tokenizer, make_tokenizer
from PIL import Image

import train
from qformer import Bridge, BridgeConfig, QFormerConfig
from qformer.build import new_bridge

TINY_VIT = dict(num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, **TINY_VIT))


def siglip_vision():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, **TINY_VIT))


def dinov2():
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(hidden_size=16, mlp_ratio=2, **TINY_VIT))


def vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(hidden_size=48, intermediate_size=96, **TINY_VIT), add_pooling_layer=False)


VISION = {"clip": clip_vision, "siglip": siglip_vision, "dinov2": dinov2, "vit": vit}

# The tests' word-level tokenizer serves every LLM; its special tokens' ids.
TINY_LM = dict(vocab_size=len(SPECIALS) + len(WORDS), num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, **TINY_LM)
    )


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, **TINY_LM)
    )


def gemma3():
    """Gemma 3's text model alone (Gemma3ForCausalLM): scaled embeddings, sliding-window and global layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            eos_token_id=2,
            **TINY_LM,
        )
    )


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16, eos_token_id=2, **TINY_LM))


def t5():
    """An encoder-decoder (BLIP-2's Flan-T5): the prompt into its encoder, the caption out of its decoder."""
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=TINY_LM["vocab_size"], d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
        )
    )  # fmt: skip


def plain_tokenizer():
    """The tests' tokenizer without a chat template, as BLIP-2's OPT has none: prompted "Question: ... Answer:"."""
    tok = make_tokenizer()
    tok.chat_template = None
    return tok


# Each LLM with its tokenizer: a chat template, none (OPT), or none and eos after the text (T5's).
LLMS = {
    "llama": (llama, make_tokenizer),
    "qwen2": (qwen2, make_tokenizer),
    "gemma3": (gemma3, make_tokenizer),
    "opt": (opt, plain_tokenizer),
    "t5": (t5, lambda: blip_tokenizer("$A <eos>")),
}


@pytest.fixture(scope="session")
def backbone_dirs(tmp_path_factory):
    """{name: directory} of every tiny vision encoder and LLM (with its tokenizer), saved once."""
    root = tmp_path_factory.mktemp("matrix")
    dirs = {}
    torch.manual_seed(0)
    for name, build in VISION.items():
        build().save_pretrained(root / name)
        dirs[name] = str(root / name)
    for name, (build, tokenizer) in LLMS.items():
        build().save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="session")
def pictures(tmp_path_factory):
    """Four captioned 32 px images, as a JSONL manifest."""
    d = tmp_path_factory.mktemp("pictures")
    rows = []
    for i, color in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]):
        a = np.full((32, 32, 3), 128, np.uint8)
        a[8:24, 8 * (i % 2) : 8 * (i % 2) + 16] = color
        Image.fromarray(a).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a {['red', 'green', 'blue', 'yellow'][i]} square"})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / "train.jsonl")


@pytest.fixture(autouse=True)
def one_thread():
    """As in test_train: tiny models run fastest on one thread of a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def backbone_state(bridge: Bridge) -> dict[str, torch.Tensor]:
    return {f"vision.{k}": v.clone() for k, v in bridge.vision.state_dict().items()} | {
        f"llm.{k}": v.clone() for k, v in bridge.llm.state_dict().items()
    }


def greedy_tokens(bridge: Bridge, image) -> torch.Tensor:
    ids, at = bridge.llm.chat_prompt(bridge.config.caption_prompt, system=bridge.config.system_prompt)
    pixels = bridge.vision.preprocess(image)[None]  # (1, 1, 3, H, W)
    return bridge.generate(pixels, torch.tensor([ids]), max_new_tokens=6, visual_position=torch.tensor([at]))


@pytest.mark.parametrize("llm", list(LLMS))
@pytest.mark.parametrize("vision", list(VISION))
def test_any_encoder_with_any_llm_builds_trains_saves_loads_and_generates(vision, llm, backbone_dirs, pictures, tmp_path):
    q = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_queries=4, vocab_size=64, dropout=0.0)
    torch.manual_seed(0)
    start = new_bridge(BridgeConfig(vision=backbone_dirs[vision], llm=backbone_dirs[llm], qformer=q, num_frames=1), qformer_init=None)
    assert start.config.qformer.vision_width == start.vision.width and start.config.llm_width == start.llm.width
    before = backbone_state(start)
    start.save_pretrained(tmp_path / "start")

    out = tmp_path / "trained"
    trained = train.main(
        ["--stage", "2", "--init-from", str(tmp_path / "start"), "--data", pictures, "--output", str(out)]
        + ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--num-workers", "0", "--log-with", "none"]
    )
    # Only the bridge learnt: every backbone tensor is bitwise what was loaded, and none got a gradient.
    after = backbone_state(trained)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items()), [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert all(p.grad is None and not p.requires_grad for p in [*trained.vision.parameters(), *trained.llm.parameters()])
    assert not torch.equal(trained.projection.weight, start.projection.weight)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))

    image = np.array(Image.open(Path(pictures).parent / "0.png"))
    tokens = greedy_tokens(trained.eval(), image)
    loaded = Bridge.from_pretrained(out)
    assert loaded.config == trained.config
    assert tokens.shape[1] > 0 and torch.equal(greedy_tokens(loaded, image), tokens)
