"""Tiny Hugging Face backbones built from configs, saved to real directories, shared by the tests."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

from qformer import BridgeConfig, QFormerConfig
from qformer.convert import QFORMER_TOKENIZER_DIR

WORDS = (
    "a the on and is what color shape does do how many objects are there background small large red green blue "
    "yellow purple orange black white gray circle square triangle diamond moves left right up down grows shrinks "
    "stays still one two describe clip image question answer ? . , :"
).split()
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]


def free_port() -> int:
    """A TCP port nothing listens on now, for a server or a process group a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes() -> list[str]:
    """The start of an `accelerate launch` command for two processes on this machine. `--cpu` alone starts one
    (several need MPI); `--multi_gpu` starts them through torchrun, and without CUDA they run on the CPU."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip


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


def tiny_llama(tok, path, **overrides) -> str:
    """A tiny Llama (32 wide, 2 layers unless `overrides` say otherwise) with tokenizer `tok`, saved to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, **(sizes | overrides)
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def autograd_left_on():
    """A test (or the code it runs) that turns autograd off for the process makes every later training test fail
    far from the cause: each test must leave it as it found it."""
    yield
    assert torch.is_grad_enabled(), "this test left autograd disabled for the tests after it"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{'llm': dir, 'vision': dir, 'vit': dir}: a tiny Llama with a chat-template tokenizer, a tiny CLIP vision tower, a tiny ViT."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tiny_llama(make_tokenizer(), root / "llm")
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


def blip_tokenizer(template: str):
    """The tests' vocabulary without a chat template, adding special tokens as `template` says (tokenizers'
    TemplateProcessing): "<bos> $A" as OPT's and Llama's tokenizers do, "$A <eos>" as T5's, "<bos> $A <eos>"
    as a BERT's [CLS] ... [SEP]."""
    from tokenizers import processors

    tok = make_tokenizer()
    tok.chat_template = None
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in ("<bos>", "<eos>") if t in template]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return tok


def tiny_checkpoint(path, model_type: str = "blip-2", llm: str = "opt", seed: int = 0):
    """A tiny random transformers BLIP-2 ("blip-2"), InstructBLIP ("instructblip") or InstructBLIP-Video
    ("instructblipvideo") with an OPT ("opt") or Flan-T5-style ("t5") language model, saved with its processor
    as users have them; returns the model and the processor read back from `path`.

    InstructBLIP-Video's processor cannot be built here: its video processor needs torchvision, which has no
    build for this machine's torch. Its directory holds the processor's tokenizers as it saves them (the LLM's
    with "<video>" added, the Q-Former's in qformer_tokenizer/), no video processor config, and the processor
    returned is None."""
    import transformers as tf

    torch.manual_seed(seed)
    tok = blip_tokenizer("$A <eos>" if llm == "t5" else "<bos> $A")
    qtok = blip_tokenizer("<bos> $A <eos>")
    vocab = len(tok) + 1  # the processor adds "<image>" ("<video>")
    if llm == "t5":
        text = tf.T5Config(
            vocab_size=vocab, d_model=40, d_kv=10, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
        )  # fmt: skip
    else:
        text = tf.OPTConfig(
            vocab_size=vocab, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=40,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
    kinds = {
        "blip-2": (tf.Blip2Config, tf.Blip2VisionConfig, tf.Blip2QFormerConfig, tf.Blip2ForConditionalGeneration),
        "instructblip": (
            tf.InstructBlipConfig,
            tf.InstructBlipVisionConfig,
            tf.InstructBlipQFormerConfig,
            tf.InstructBlipForConditionalGeneration,
        ),
        "instructblipvideo": (
            tf.InstructBlipVideoConfig,
            tf.InstructBlipVideoVisionConfig,
            tf.InstructBlipVideoQFormerConfig,
            tf.InstructBlipVideoForConditionalGeneration,
        ),
    }
    video = model_type == "instructblipvideo"
    config_cls, vision_cls, qformer_cls, model_cls = kinds[model_type]
    config = config_cls(
        vision_config=vision_cls(  # its default initializer_range (1e-10) makes every image look alike
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            initializer_range=0.02,
        ).to_dict(),  # fmt: skip
        qformer_config=qformer_cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            encoder_hidden_size=32,
            vocab_size=len(qtok),
            max_position_embeddings=64,
        ).to_dict(),  # fmt: skip
        text_config=text.to_dict(),
        num_query_tokens=3,
        **{"video_token_index" if video else "image_token_index": len(tok)},
        tie_word_embeddings=llm != "t5",  # Flan-T5's output head is its own
    )
    model = model_cls(config).eval()
    with torch.no_grad():
        # transformers starts the queries at zero and random logits are nearly flat: spread both (and the
        # path from the image), so that a wrong mapping shows and greedy choices are clear-cut.
        model.query_tokens.normal_()
        for p in model.qformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for layer in model.qformer.encoder.layer:
            if layer.has_cross_attention:
                layer.crossattention.attention.value.weight.mul_(5)
                layer.crossattention.output.dense.weight.mul_(5)
        model.language_projection.weight.mul_(5)
        if llm == "opt":  # T5 scales its own (its output head shares them, so its start token would always win)
            model.language_model.get_input_embeddings().weight.mul_(3 if video else 10)
        if video:
            # At their initial scale the LM's layers pass on little but the last prompt token's embedding, and
            # greedy tokens would be the same whatever the frames; larger layers make them depend on the frames.
            head = model.language_model.get_output_embeddings()
            for m in model.language_model.modules():
                if isinstance(m, torch.nn.Linear) and m is not head:
                    m.weight.mul_(10 if llm == "opt" else 3)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    if video:  # as InstructBlipVideoProcessor saves its tokenizers
        tok.add_tokens([tf.AddedToken("<video>", normalized=False, special=True)], special_tokens=True)
        assert tok.convert_tokens_to_ids("<video>") == config.video_token_index
        tok.save_pretrained(path)
        qtok.save_pretrained(Path(path) / QFORMER_TOKENIZER_DIR)
        return model, None
    images = tf.BlipImageProcessor(size={"height": 32, "width": 32})
    if model_type == "blip-2":
        processor = tf.Blip2Processor(images, tok, num_query_tokens=3)
    else:
        processor = tf.InstructBlipProcessor(images, tok, qtok, num_query_tokens=3)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    processor.save_pretrained(path)
    return model, tf.AutoProcessor.from_pretrained(path)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine spinning OpenMP threads
    make each step several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
