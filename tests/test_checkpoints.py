"""Transformers checkpoints as they are, on the command lines: recaption, chat and train.py --init-from; and
a T5 as the LLM of a new bridge through train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import blip_tokenizer, tiny_checkpoint
from PIL import Image

import train
from qformer import Bridge
from qformer.cli import main

REPO = Path(__file__).resolve().parent.parent
COLOURS = ((200, 30, 30), (30, 30, 220), (30, 200, 40), (230, 220, 30))
PROMPT = "what color is the background ?"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Four solid-colour images, with a caption manifest beside them."""
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(COLOURS):
        paths.append(d / f"image{i}.png")
        Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(paths[-1])
    rows = [{"image": p.name, "caption": f"a {name} image"} for p, name in zip(paths, ("red", "blue", "green", "yellow"))]
    (d / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def transformers_captions(model, processor, paths, prompt: str, max_new_tokens: int) -> list[str]:
    """What transformers answers for these images and prompt, the usual way: processor, generate, batch_decode."""
    inputs = processor(images=[np.asarray(Image.open(p)) for p in paths], text=[prompt] * len(paths), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    start = 1 if model.config.text_config.is_encoder_decoder else inputs.input_ids.shape[1]
    return [text.strip() for text in processor.batch_decode(ids[:, start:], skip_special_tokens=True)]


@pytest.mark.parametrize("kind, llm", [("instructblip", "opt"), ("blip-2", "t5")])
def test_recaption_with_a_checkpoint_directory_writes_transformers_captions(tmp_path, images, kind, llm, capsys):
    model, processor = tiny_checkpoint(tmp_path / "ckpt", kind, llm)
    out = tmp_path / "captions.jsonl"
    args = ["recaption", *map(str, images), "--out", str(out), "--bridge", str(tmp_path / "ckpt"), "--prompt", PROMPT]
    assert main([*args, "--workers", "0", "--max-new-tokens", "8"]) == 0
    records = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    expected = transformers_captions(model, processor, images, PROMPT, 8)
    assert [records[str(p)]["caption"] for p in images] == expected
    assert all(records[str(p)]["error"] is None and records[str(p)]["prompt"] == PROMPT for p in images)


def test_chat_with_a_checkpoint_directory_answers_in_the_terminal(tmp_path, images):
    model, processor = tiny_checkpoint(tmp_path / "ckpt", "instructblip", "t5")
    run = subprocess.run(
        [sys.executable, "-m", "qformer.chat", "--bridge", str(tmp_path / "ckpt"), "--image", str(images[0])],
        input=f"{PROMPT}\n/quit\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    # The chat's first question goes to the model verbatim, as transformers would be given it.
    assert run.stdout.splitlines() == transformers_captions(model, processor, images[:1], PROMPT, 48)


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_args(out, data, *extra) -> list[str]:
    common = ["--batch-size", "2", "--num-workers", "0", "--log-with", "none", "--lr", "1e-3", "--max-steps", "2"]
    return ["--stage", "2", "--data", str(data), "--output", str(out), *common, *extra]


def test_init_from_a_blip2_checkpoint_re_bridges_its_q_former_to_another_llm(tmp_path, tiny_dirs, images, monkeypatch):
    tiny_checkpoint(tmp_path / "blip2", "blip-2", "opt")
    source = Bridge.from_pretrained(tmp_path / "blip2")
    # The trained bridge's backbones, as they were before training.
    built = []
    real = train.setup_bridge
    monkeypatch.setattr(train, "setup_bridge", lambda *a: built.append(real(*a)) or built[-1])
    data = images[0].parent / "captions.jsonl"
    bridge = train.main(_train_args(tmp_path / "out", data, "--init-from", str(tmp_path / "blip2"), "--llm", tiny_dirs["llm"]))
    fresh = Bridge.from_pretrained(tmp_path / "out")
    for name in ("vision", "llm"):
        before, after = _snapshot(getattr(fresh, name)), getattr(bridge, name).state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
    # The checkpoint's vision tower and Q-Former carried over (and trained); the projection into the new LLM is new.
    assert fresh.config.vision == source.config.vision and fresh.config.llm == tiny_dirs["llm"]
    assert fresh.projection.weight.shape == (32, 32) and source.projection.weight.shape == (40, 32)
    assert torch.equal(fresh.qformer.query_tokens, bridge.qformer.query_tokens)
    assert not torch.equal(fresh.qformer.query_tokens, source.qformer.query_tokens)
    assert (fresh.qformer.query_tokens - source.qformer.query_tokens).abs().max() < 0.01  # two small steps from it
    assert fresh.config.caption_prompt == "Describe the clip."  # the new LLM answers in its chat
    captions = fresh.caption([str(p) for p in images], max_new_tokens=5)
    assert captions == bridge.eval().caption([str(p) for p in images], max_new_tokens=5)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


@pytest.mark.backbones
def test_init_from_a_blip2_checkpoint_trains_into_the_offline_smollm2(tmp_path, images):
    """The command a user runs to give SmolLM2 BLIP-2's Q-Former: it trains, and its output loads and captions."""
    tiny_checkpoint(tmp_path / "blip2", "blip-2", "opt")
    data = images[0].parent / "captions.jsonl"
    bridge = train.main(_train_args(tmp_path / "out", data, "--init-from", str(tmp_path / "blip2"), "--llm", "smollm2-135m-instruct"))
    fresh = Bridge.from_pretrained(tmp_path / "out")
    assert fresh.config.llm == "smollm2-135m-instruct" and fresh.projection.weight.shape == (576, 32)
    assert fresh.config.caption_prompt == "Describe the clip."  # SmolLM2 answers in its own chat template
    captions = fresh.caption([str(p) for p in images], max_new_tokens=5)
    assert captions == bridge.eval().caption([str(p) for p in images], max_new_tokens=5)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    """A tiny Flan-T5-style encoder-decoder with a T5-style tokenizer (eos after the text)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = blip_tokenizer("$A <eos>")
    config = T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("t5")
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_t5_llm_trains_saves_loads_and_generates(tmp_path, tiny_dirs, tiny_t5, images):
    data = images[0].parent / "captions.jsonl"
    extra = ["--vision", tiny_dirs["vision"], "--llm", tiny_t5, "--qformer-init", "random", "--num-queries", "4", "--num-frames", "1"]
    bridge = train.main(_train_args(tmp_path / "out", data, *extra))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    loaded = Bridge.from_pretrained(tmp_path / "out")
    assert loaded.llm.is_encoder_decoder
    t5 = loaded.llm.model.state_dict()
    assert all(torch.equal(t5[k], v) for k, v in bridge.llm.model.state_dict().items())  # frozen
    px = torch.stack([loaded.vision.preprocess(np.asarray(Image.open(p))) for p in images])
    batch = loaded._prompt_batch(["describe the image ."] * 4, [[]] * 4)
    ids = loaded.generate(px, **batch, max_new_tokens=5, min_new_tokens=5)
    assert ids.shape == (4, 5)  # the 5 new tokens, without the decoder's start token
    assert torch.equal(ids, bridge.eval().generate(px, **batch, max_new_tokens=5, min_new_tokens=5))
