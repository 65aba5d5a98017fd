"""Tiny Hugging Face backbones built from configs, saved to real directories, shared by the tests."""

from __future__ import annotations

import pytest
import torch

from qformer import BridgeConfig, QFormerConfig

WORDS = (
    "a the on and is what color shape does do how many objects are there background small large red green blue "
    "yellow purple orange black white gray circle square triangle diamond moves left right up down grows shrinks "
    "stays still one two describe clip image question answer ? . , :"
).split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = (
        "<bos>{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return fast


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{'llm': dir, 'vision': dir, 'vit': dir}: a tiny Llama with a chat-template tokenizer, a tiny CLIP vision tower, a tiny ViT."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tok = make_tokenizer()
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(root / "vision")
    ViTModel(
        ViTConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ).save_pretrained(root / "vit")
    return {"llm": str(root / "llm"), "vision": str(root / "vision"), "vit": str(root / "vit")}


def tiny_config(dirs, **overrides) -> BridgeConfig:
    q = QFormerConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        num_queries=4,
        vision_width=24,
        vocab_size=len(SPECIALS) + len(WORDS),
        max_text_len=64,
        max_frames=8,
        dropout=0.0,
    )
    cfg = BridgeConfig(qformer=q, vision=dirs["vision"], llm=dirs["llm"], llm_width=32, num_frames=4)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def tiny_bridge(tiny_dirs):
    from qformer import Bridge

    torch.manual_seed(0)
    return Bridge(tiny_config(tiny_dirs))
