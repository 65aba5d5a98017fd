"""train.py end to end on tiny backbones: each stage, resume, cache, re-bridging, bad data, two processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import launch_two_processes, make_tokenizer, tiny_llama
from PIL import Image

import qformer.build
import train
from qformer import Bridge
from qformer.build import from_bridge
from qformer.losses import Stage1Objective

ROOT = Path(__file__).resolve().parent.parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ["circle", "square"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine spinning OpenMP threads
    make each step several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(color, shape) -> np.ndarray:
    a = np.full((32, 32, 3), 128, np.uint8)
    if shape == "square":
        a[8:24, 8:24] = COLORS[color]
    else:
        yy, xx = np.mgrid[:32, :32]
        a[(yy - 16) ** 2 + (xx - 16) ** 2 < 64] = COLORS[color]
    return a


def _clip(path, color, frames=6):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(frames):
            a = np.zeros((32, 32, 3), np.uint8)
            a[:, 4 * t : 4 * t + 8] = COLORS[color]
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="session")
def qformer_bert(tmp_path_factory):
    """A tiny BERT with the tests' tokenizer: the Q-Former's initialisation and tokenizer."""
    return _tiny_bert(tmp_path_factory.mktemp("bert"), dropout=0.0)


@pytest.fixture(scope="session")
def qformer_bert_with_dropout(tmp_path_factory):
    """The same with BERT's dropout: training then draws random numbers at every step."""
    return _tiny_bert(tmp_path_factory.mktemp("bert-dropout"), dropout=0.1)


def _tiny_bert(path, dropout: float) -> str:
    from transformers import BertConfig, BertModel

    tok = make_tokenizer()
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        ),
        add_pooling_layer=False,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def captions(tmp_path_factory):
    """8 images (4 colours x 2 shapes) with captions, as a JSONL manifest."""
    d = tmp_path_factory.mktemp("captions")
    rows = []
    for color in COLORS:
        for shape in SHAPES:
            Image.fromarray(_image(color, shape)).save(d / f"{color}-{shape}.png")
            rows.append({"image": f"{color}-{shape}.png", "caption": f"a {color} {shape}"})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / "train.jsonl")


@pytest.fixture(scope="session")
def vqa(tmp_path_factory):
    """Short clips with questions and answers, as a CSV manifest."""
    import csv

    d = tmp_path_factory.mktemp("vqa")
    (d / "clips").mkdir()
    with open(d / "qa.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["video", "question", "answer"])
        w.writeheader()
        for color in COLORS:
            _clip(d / "clips" / f"{color}.mp4", color)
            w.writerow({"video": f"clips/{color}.mp4", "question": "what color is the square ?", "answer": color})
    return str(d / "qa.csv")


def _args(tiny_dirs, bert, out, *extra, stage="1", data=None):
    return [
        "--stage",
        stage,
        "--data",
        data,
        "--output",
        str(out),
        "--vision",
        tiny_dirs["vision"],
        "--llm",
        tiny_dirs["llm"],
        "--qformer-init",
        bert,
        "--num-queries",
        "4",
        "--num-frames",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--log-with",
        "none",
        "--lr",
        "1e-3",
        *extra,
    ]


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(out, key="loss"):
    return {m["step"]: m[key] for m in _metrics(out) if key in m}


def test_stage1_smoke_logs_three_losses_and_saves_a_bridge(tiny_dirs, qformer_bert, captions, tmp_path):
    bridge = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s1", "--max-steps", "2", data=captions))
    steps = [m for m in _metrics(tmp_path / "s1") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert {"itc", "itm", "itg", "lr"} <= set(m)
        assert m["loss"] == pytest.approx(m["itc"] + m["itm"] + m["itg"], rel=1e-5)
    loaded = Bridge.from_pretrained(tmp_path / "s1")
    assert loaded.heads is not None
    for k, v in bridge.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k


def test_cross_attention_in_every_layer_is_built_saved_and_kept_by_later_stages(tiny_dirs, qformer_bert, captions, tmp_path):
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s1", "--max-steps", "1", "--cross-attention-every", "1", data=captions))
    # A later stage keeps the bridge's own Q-Former: its flag only shapes a new one.
    bridge = train.main(
        _args(tiny_dirs, qformer_bert, tmp_path / "s2", "--max-steps", "1", "--init-from", str(tmp_path / "s1"), stage="2", data=captions)
    )
    loaded = Bridge.from_pretrained(tmp_path / "s2")
    for b in (bridge, loaded):
        assert b.config.qformer.cross_attention_every == 1
        assert [layer.cross_attn is not None for layer in b.qformer.layers] == [True, True]
    default = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "d", "--max-steps", "1", data=captions))
    assert [layer.cross_attn is not None for layer in default.qformer.layers] == [True, False]


def test_init_from_with_cross_attention_every_grows_the_q_former_from_its_trained_layers(tiny_dirs, qformer_bert, captions, tmp_path):
    from safetensors.torch import load_file

    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s1", "--max-steps", "1", data=captions))
    trained = {
        k[len("qformer.") :]: v for k, v in load_file(str(tmp_path / "s1" / "bridge.safetensors")).items() if k.startswith("qformer.")
    }
    assert "layers.1.cross_attn.query.weight" not in trained
    grow = lambda d, every: from_bridge(d, {"cross_attention_every": int(every)})  # noqa: E731
    grown = grow(tmp_path / "s1", "1")
    assert grown.config.qformer.cross_attention_every == 1
    new = grown.qformer.state_dict()
    # The new layer reads with layer 0's trained attention, adds nothing yet, and normalises as its layer did.
    for name in ("query", "key", "value"):
        for kind in ("weight", "bias"):
            assert torch.equal(new[f"layers.1.cross_attn.{name}.{kind}"], trained[f"layers.0.cross_attn.{name}.{kind}"])
    assert not new["layers.1.cross_attn.out.weight"].any() and not new["layers.1.cross_attn.out.bias"].any()
    assert torch.equal(new["layers.1.cross_attn.norm.weight"], trained["layers.1.self_attn.norm.weight"])
    for k, v in trained.items():  # everything the bridge had is kept
        assert torch.equal(new[k], v), k
    # And back: every 2nd layer again drops layer 1's cross-attention.
    grown.save_pretrained(tmp_path / "g")
    back = grow(tmp_path / "g", "2")
    assert back.qformer.layers[1].cross_attn is None
    assert all(torch.equal(v, trained[k]) for k, v in back.qformer.state_dict().items())


def test_a_scorer_learns_low_rank_attention_updates_alone_and_is_saved_small_beside_its_bridge(tiny_dirs, qformer_bert, captions, tmp_path):
    """--train attention from a generative bridge: low-rank updates of the attention weights (B at zero at
    first) learn with the queries and heads; every other weight stays the bridge's, bit for bit. scorer/
    then holds those alone, and the bridge scores with them as the trained scorer does."""
    from safetensors import safe_open

    from qformer.bridge import SCORER_DIR, WEIGHTS_NAME, save_scorer

    gen = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "gen", "--max-steps", "1", stage="2", data=captions))
    assert gen.heads is None and gen.config.qformer.attention_rank == 0
    args = ["--max-steps", "2", "--init-from", str(tmp_path / "gen"), "--train", "attention", "--attention-rank", "2"]
    scorer = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "scorer", *args, "--stage1-losses", "itc,itm", data=captions))
    assert scorer.config.qformer.attention_rank == 2
    own, trained = gen.qformer.state_dict(), scorer.qformer.state_dict()
    updates = {k for k in trained if k.endswith((".lora_a", ".lora_b"))}
    # query, key, value, out of both layers' self-attention and of layer 0's cross-attention, two factors each
    assert len(updates) == 2 * 4 * 3 and all(trained[k].shape[0 if k.endswith(".lora_a") else 1] == 2 for k in updates)
    changed = {k for k, v in trained.items() if k in updates or not torch.equal(v, own[k])}
    assert changed - updates <= {"query_tokens", "temporal_embed", "vision_norm.weight", "vision_norm.bias"}
    assert all(trained[k].any() for k in updates if k.endswith(".lora_b"))  # they learnt: B started at zero

    save_scorer(scorer, tmp_path / "gen", dtype=torch.float16)
    with safe_open(str(tmp_path / "gen" / SCORER_DIR / WEIGHTS_NAME), "pt") as f:
        held = set(f.keys())
    assert held == {f"qformer.{k}" for k in changed} | {f"heads.{k}" for k in scorer.heads.state_dict()}
    loaded = Bridge.from_pretrained(tmp_path / "gen", vision=gen.vision, llm=gen.llm)
    assert loaded.scorer.qformer.config.attention_rank == 2
    clips = [np.random.default_rng(i).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8) for i in range(3)]
    texts = ["a red circle moves left", "a blue square grows", "a green diamond"]
    assert loaded.scorer.match(clips, texts) == pytest.approx(scorer.match(clips, texts), abs=2e-3)  # half-precision file

    # Trained further in any other way, a scorer's Q-Former takes its updates into its weights.
    merged = from_bridge(tmp_path / "scorer", {"attention_rank": 0})
    assert not any(k.endswith((".lora_a", ".lora_b")) for k in merged.qformer.state_dict())
    features = scorer.scorer.clip_features(clips)
    torch.testing.assert_close(merged.scorer.embed_features(features), scorer.scorer.embed_features(features), atol=1e-5, rtol=1e-5)


def test_a_scorer_saved_beside_a_later_stage_keeps_only_what_it_learnt(tiny_dirs, qformer_bert, captions, tmp_path):
    """A scorer trained on one stage of a bridge and saved beside the next (init: the stage it learnt on)
    holds the same few weights as beside its own start; the bridge it sits beside gives it all the rest."""
    from safetensors import safe_open

    from qformer.bridge import SCORER_DIR, WEIGHTS_NAME, save_scorer

    gen = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "gen", "--max-steps", "1", stage="2", data=captions))
    later = ["--max-steps", "1", "--init-from", str(tmp_path / "gen")]
    nxt = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "next", *later, stage="2", data=captions))
    args = ["--max-steps", "2", "--init-from", str(tmp_path / "gen"), "--train", "attention", "--attention-rank", "2"]
    scorer = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "scorer", *args, "--stage1-losses", "itc,itm", data=captions))
    trained, nxt_state = scorer.qformer.state_dict(), nxt.qformer.state_dict()
    assert any(not torch.equal(v, gen.qformer.state_dict()[k]) for k, v in nxt_state.items())  # the next stage moved on

    save_scorer(scorer, tmp_path / "gen")
    save_scorer(scorer, tmp_path / "next", init=tmp_path / "gen")
    held = {}
    for d in ("gen", "next"):
        with safe_open(str(tmp_path / d / SCORER_DIR / WEIGHTS_NAME), "pt") as f:
            held[d] = set(f.keys())
    assert held["next"] == held["gen"]  # against "next" itself, every frozen weight would differ
    assert {k for k in held["next"] if k.startswith("qformer.")} < {f"qformer.{k}" for k in trained}

    loaded = Bridge.from_pretrained(tmp_path / "next", vision=nxt.vision, llm=nxt.llm).scorer.qformer.state_dict()
    for k, v in loaded.items():
        torch.testing.assert_close(v, trained[k] if f"qformer.{k}" in held["next"] else nxt_state[k], atol=0, rtol=0)


def test_a_scorer_at_attention_rank_0_learns_the_attention_weights_themselves(tiny_dirs, qformer_bert, captions, tmp_path):
    gen = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "gen", "--max-steps", "1", stage="2", data=captions))
    args = ["--max-steps", "2", "--init-from", str(tmp_path / "gen"), "--train", "attention", "--attention-rank", "0"]
    scorer = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "scorer", *args, "--stage1-losses", "itc,itm", data=captions))
    own, trained = gen.qformer.state_dict(), scorer.qformer.state_dict()
    assert scorer.config.qformer.attention_rank == 0 and own.keys() == trained.keys()
    changed = {k for k, v in trained.items() if not torch.equal(v, own[k])}
    attention = {k for k in own if "_attn." in k}
    assert attention and attention <= changed  # every attention weight learnt (the heads' gradients reach them all)
    assert changed - attention <= {"query_tokens", "temporal_embed", "vision_norm.weight", "vision_norm.bias"}


def test_attention_rank_goes_with_train_attention(tiny_dirs, qformer_bert, captions, tmp_path):
    with pytest.raises(SystemExit, match="--attention-rank 4: give a rank of 0 or more, with --train attention"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "x", "--attention-rank", "4", data=captions))


def test_stage2_and_instructed_smoke(tiny_dirs, qformer_bert, captions, vqa, tmp_path):
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s1", "--max-steps", "1", data=captions))
    train.main(
        _args(tiny_dirs, qformer_bert, tmp_path / "s2", "--max-steps", "2", "--init-from", str(tmp_path / "s1"), stage="2", data=captions)
    )
    assert sorted(_losses(tmp_path / "s2")) == [1, 2]
    bridge = train.main(
        _args(
            tiny_dirs,
            qformer_bert,
            tmp_path / "vqa",
            "--max-steps",
            "2",
            "--instruct",
            "--init-from",
            str(tmp_path / "s2"),
            stage="2",
            data=vqa,
        )
    )
    assert bridge.config.instruct and bridge.qformer_tokenizer is not None
    loaded = Bridge.from_pretrained(tmp_path / "vqa")
    assert isinstance(loaded.answer(str(Path(vqa).parent / "clips" / "red.mp4"), "what color is the square ?", max_new_tokens=3), str)


def test_caption_first_puts_a_question_row_s_caption_before_the_question(tiny_bridge):
    from types import SimpleNamespace

    prompt = tiny_bridge.config.caption_prompt
    batch = {
        "captions": ["a red square", "a blue circle", None],
        "questions": [None, "what color is the circle ?", "what color is the square ?"],
        "answers": [None, "blue", "red"],
    }
    args = SimpleNamespace(max_answer_tokens=64)
    text = lambda: train.model_inputs(batch, tiny_bridge, 2, None, args, None)["text"]  # noqa: E731
    questions = [prompt, "what color is the circle ?", "what color is the square ?"]
    answers = ["a red square", "blue", "red"]
    plain = tiny_bridge.answer_batch(questions, answers)
    assert all(torch.equal(v, plain[k]) for k, v in text().items())  # the row's caption is no context by default
    tiny_bridge.config.caption_first = True
    first = tiny_bridge.answer_batch(questions, answers, [[], [(prompt, "a blue circle")], []])
    assert all(torch.equal(v, first[k]) for k, v in text().items())
    assert not torch.equal(first["input_ids"][1], plain["input_ids"][1])
    # Stage 1 reads a question row as its question and answer, whatever caption it carries.
    qtok, acc = make_tokenizer(), SimpleNamespace(device="cpu", num_processes=1, process_index=0)
    got = train.model_inputs(batch, tiny_bridge, 1, qtok, SimpleNamespace(max_text_len=64, seed=0), acc)["text"]["input_ids"]
    texts = ["a red square", "what color is the circle ? blue", "what color is the square ? red"]
    assert torch.equal(got, qtok(texts, padding=True, return_tensors="pt")["input_ids"])


def test_a_caption_first_bridge_trains_and_keeps_answering_that_way(tiny_dirs, qformer_bert, captions, tmp_path, capsys):
    rows = [json.loads(line) for line in Path(captions).read_text().splitlines()]
    qa = [
        {
            "image": str(Path(captions).parent / r["image"]),
            "caption": r["caption"],
            "question": "what color is the shape ?",
            "answer": r["caption"].split()[1],
        }
        for r in rows
    ]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    with pytest.raises(SystemExit, match="--caption-first is for stage 2"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "x", "--caption-first", data=captions))
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s1", "--max-steps", "1", data=captions))
    train.main(
        _args(
            tiny_dirs,
            qformer_bert,
            tmp_path / "first",
            "--max-steps",
            "2",
            "--caption-first",
            "--init-from",
            str(tmp_path / "s1"),
            stage="2",
            data=str(tmp_path / "qa.jsonl"),
        )
    )
    assert sorted(_losses(tmp_path / "first")) == [1, 2]
    assert Bridge.from_pretrained(tmp_path / "first").config.caption_first
    # Later stages keep it without being told again.
    bridge = train.main(
        _args(
            tiny_dirs,
            qformer_bert,
            tmp_path / "more",
            "--max-steps",
            "1",
            "--init-from",
            str(tmp_path / "first"),
            stage="2",
            data=str(tmp_path / "qa.jsonl"),
        )
    )
    assert bridge.config.caption_first


@pytest.fixture(scope="session")
def steerable_llm(tmp_path_factory):
    """A tiny LLM with larger weights than tiny_dirs': at 0.02 init its logits barely leave uniform whatever the
    prompt, so no soft prompt could make it overfit."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    return tiny_llama(tok, tmp_path_factory.mktemp("steerable"), initializer_range=0.2)


def test_overfitting_a_handful_of_samples_lowers_each_stage_loss(tiny_dirs, steerable_llm, qformer_bert, captions, tmp_path):
    dirs = tiny_dirs | {"llm": steerable_llm}
    fast = ("--max-steps", "20", "--lr", "3e-3", "--batch-size", "8", "--warmup-ratio", "0")
    train.main(_args(dirs, qformer_bert, tmp_path / "s1", *fast, data=captions))
    s1 = _metrics(tmp_path / "s1")
    assert s1[-1]["loss"] < 0.8 * s1[0]["loss"]
    assert s1[-1]["itg"] < 0.7 * s1[0]["itg"]
    train.main(_args(dirs, qformer_bert, tmp_path / "s2", *fast, "--init-from", str(tmp_path / "s1"), stage="2", data=captions))
    s2 = _losses(tmp_path / "s2")
    assert s2[20] < 0.6 * s2[1]


@pytest.mark.parametrize("stage", ["1", "2"])
def test_a_killed_run_resumes_with_the_uninterrupted_losses(tiny_dirs, qformer_bert_with_dropout, captions, tmp_path, monkeypatch, stage):
    # 8 samples in batches of 3: three batches an epoch, so 7 steps cross two epoch boundaries. The Q-Former's
    # dropout draws random numbers at every step, and the DataLoader draws a seed each time it is iterated,
    # which a resumed run does at another point: the resumed steps must still draw what the uninterrupted run drew.
    qformer_bert = qformer_bert_with_dropout
    common = ("--max-steps", "7", "--batch-size", "3", "--save-every", "2", "--eval-every", "100")
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "full", *common, stage=stage, data=captions))

    real_save = train.save_checkpoint

    def save_then_die(accelerator, out, progress, keep):
        real_save(accelerator, out, progress, keep)
        if progress.step == 4:
            # Killed after step 4's checkpoint, with step 5's metrics already written: resuming redoes step 5.
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")
            raise KeyboardInterrupt("killed after step 4")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "cut", *common, stage=stage, data=captions))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    with pytest.raises(SystemExit, match="already holds a run's checkpoints: pass --resume"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "cut", *common, stage=stage, data=captions))
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "cut", *common, "--resume", stage=stage, data=captions))

    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [m["step"] for m in _metrics(tmp_path / "cut")] == list(range(1, 8))  # each step logged once
    assert sorted(full) == list(range(1, 8))
    for step in range(5, 8):
        assert cut[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    assert [p.name for p in sorted((tmp_path / "cut" / "checkpoints").iterdir())] == ["step-00000006", "step-00000007"]
    # Every checkpoint is a bridge of its own, the last one the same as the output.
    last = Bridge.from_pretrained(tmp_path / "cut" / "checkpoints" / "step-00000007").trainable_state_dict()
    final = Bridge.from_pretrained(tmp_path / "cut").trainable_state_dict()
    assert all(torch.equal(last[k], final[k]) for k in final)


@pytest.fixture(scope="session")
def two_step_run(tiny_dirs, qformer_bert, captions, tmp_path_factory):
    """The arguments and output of a stage-1 run of two steps with a checkpoint after each."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = _args(tiny_dirs, qformer_bert, out, "--max-steps", "2", "--save-every", "1", data=captions)
    train.main(args)
    return args, out


def _copy_of_run(two_step_run, tmp_path) -> tuple[list[str], Path]:
    """The run's arguments, pointed at a copy of its output that a test may spoil."""
    args, out = two_step_run
    shutil.copytree(out, tmp_path / "out")
    return [str(tmp_path / "out") if a == str(out) else a for a in args], tmp_path / "out"


def _damaged_resume(two_step_run, tmp_path, monkeypatch, damage) -> tuple[str, Path]:
    """train.py's error resuming a copy of the run whose step-2 checkpoint `damage(directory)` spoils,
    and that checkpoint; loading a backbone or the run's resumed state fails the test, so the error is
    shown to come first."""
    args, out = _copy_of_run(two_step_run, tmp_path)
    checkpoint = out / "checkpoints" / "step-00000002"
    damage(checkpoint)

    def too_late(*a, **kw):
        raise AssertionError("a model loaded before the checkpoint was checked")

    monkeypatch.setattr(qformer.build, "load_vision", too_late)
    monkeypatch.setattr(qformer.build, "load_llm", too_late)
    monkeypatch.setattr(train.Accelerator, "load_state", too_late)
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--resume", str(checkpoint)])
    return str(e.value), checkpoint


def test_resuming_from_a_checkpoint_with_a_file_missing_names_it_before_any_model_loads(two_step_run, tmp_path, monkeypatch):
    error, d = _damaged_resume(two_step_run, tmp_path, monkeypatch, lambda d: (d / "optimizer.bin").unlink())
    assert error == f"train.py: error: {d}/optimizer.bin: missing, so {d} is not a complete checkpoint"
    error, d = _damaged_resume(two_step_run, tmp_path / "2", monkeypatch, shutil.rmtree)
    assert error == f"train.py: error: {d}: no such checkpoint directory"


def test_resuming_from_a_truncated_weights_file_names_it_before_any_model_loads(two_step_run, tmp_path, monkeypatch):
    def truncate(d):
        data = (d / "bridge.safetensors").read_bytes()
        (d / "bridge.safetensors").write_bytes(data[: len(data) // 2])

    error, d = _damaged_resume(two_step_run, tmp_path, monkeypatch, truncate)
    assert error.startswith(f"train.py: error: {d}/bridge.safetensors: tensor ")
    assert error.endswith(" bytes of data")


def test_resuming_from_a_corrupt_progress_file_names_it_before_any_model_loads(two_step_run, tmp_path, monkeypatch):
    error, d = _damaged_resume(two_step_run, tmp_path, monkeypatch, lambda d: (d / "progress.json").write_text('{"step": 2, "ep'))
    assert error.startswith(f"train.py: error: {d}/progress.json: cannot be read as JSON (Unterminated string")
    error, d = _damaged_resume(
        two_step_run,
        tmp_path / "2",
        monkeypatch,
        lambda d: (d / "progress.json").write_text(json.dumps({"step": -2, "epoch": 0, "batches_in_epoch": 2, "bad_samples": []})),
    )
    assert error == f"train.py: error: {d}/progress.json: step is -2, not a count (an integer, 0 or more)"


def test_resuming_from_a_corrupt_rng_file_names_it_before_any_model_loads_and_never_unpickles_it(two_step_run, tmp_path, monkeypatch):
    error, d = _damaged_resume(two_step_run, tmp_path, monkeypatch, lambda d: (d / "random_states_0.pkl").write_bytes(b"\x00" * 64))
    assert error.startswith(f"train.py: error: {d}/random_states_0.pkl: cannot be loaded (")
    planted = tmp_path / "planted"

    class Planted:
        def __reduce__(self):
            return (open, (str(planted), "w"))

    error, d = _damaged_resume(
        two_step_run, tmp_path / "2", monkeypatch, lambda d: torch.save({"random_state": Planted()}, d / "random_states_0.pkl")
    )
    assert error.startswith(f"train.py: error: {d}/random_states_0.pkl: cannot be loaded (Weights only load failed")
    assert not planted.exists()


def test_rng_states_that_accelerate_fails_to_restore_stop_the_resumed_run(two_step_run, tmp_path, monkeypatch):
    """Accelerate catches any error restoring the RNG states and goes on: the run would not repeat the
    interrupted one while saying it resumed it."""
    import accelerate.checkpointing

    args, out = _copy_of_run(two_step_run, tmp_path)
    checkpoint = out / "checkpoints" / "step-00000001"
    real_load = accelerate.checkpointing.load

    def load_failing_on_rng(path, *a, **kw):
        if Path(path).name == "random_states_0.pkl":
            raise OSError("disk read error")
        return real_load(path, *a, **kw)

    monkeypatch.setattr(accelerate.checkpointing, "load", load_failing_on_rng)
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--resume", str(checkpoint)])
    assert str(e.value) == (
        f"train.py: error: {checkpoint}/random_states_0.pkl: its RNG states were not restored, so the run would not resume exactly"
    )


def test_backbones_are_bitwise_unchanged_and_only_trainable_parts_reach_the_optimizer(
    tiny_dirs, qformer_bert, captions, tmp_path, monkeypatch
):
    seen = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, **kw):
        params = list(params)
        seen.extend(params)
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    bridge = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s2", "--max-steps", "3", stage="2", data=captions))
    fresh = Bridge.from_pretrained(tmp_path / "s2")
    for name in ("vision", "llm"):
        before, after = getattr(fresh, name).state_dict(), getattr(bridge, name).state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), name
    backbone_ids = {id(p) for p in bridge.vision.parameters()} | {id(p) for p in bridge.llm.parameters()}
    assert seen and not any(id(p) in backbone_ids for p in seen)
    assert all(p.requires_grad for p in seen)
    # Stage 2 without instructions: the Q-Former's text side idles, so it is not handed to the optimizer.
    assert id(bridge.qformer.embeddings.word.weight) not in {id(p) for p in seen}
    assert id(bridge.projection.weight) in {id(p) for p in seen}


@pytest.mark.parametrize("stage", ["1", "2"])
def test_cached_features_give_the_same_losses(tiny_dirs, qformer_bert, captions, vqa, tmp_path, stage):
    data = captions if stage == "1" else vqa
    common = ("--max-steps", "3", "--batch-size", "2")
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "plain", *common, stage=stage, data=data))
    train.main(
        _args(tiny_dirs, qformer_bert, tmp_path / "cached", *common, "--cache-features", str(tmp_path / "cache"), stage=stage, data=data)
    )
    shards = list((tmp_path / "cache").glob("shard-*.safetensors"))
    assert shards and not list((tmp_path / "cache").glob(".tmp-*"))
    # A second run reads the cache and encodes nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    train.main(
        _args(tiny_dirs, qformer_bert, tmp_path / "again", *common, "--cache-features", str(tmp_path / "cache"), stage=stage, data=data)
    )
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard-*.safetensors")} == mtimes
    plain, cached, again = _losses(tmp_path / "plain"), _losses(tmp_path / "cached"), _losses(tmp_path / "again")
    for step in plain:
        assert cached[step] == pytest.approx(plain[step], rel=1e-4), step
        assert again[step] == cached[step]


def test_rebridging_to_an_llm_of_another_width_and_tokenizer(tiny_dirs, qformer_bert, captions, tmp_path):
    # Another LLM: 48 wide, and a tokenizer whose ids are shuffled with respect to the first one's.
    tok = make_tokenizer()
    vocab = tok.get_vocab()
    rng = np.random.default_rng(0)
    order = list(rng.permutation(len(vocab) - 6) + 6)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted((t for t in vocab if vocab[t] >= 6), key=lambda t: vocab[t])
    shuffled = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get)[:6])} | {w: int(o) for w, o in zip(words, order)}
    raw = Tokenizer(models.WordLevel(shuffled, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    other_tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    torch.manual_seed(1)
    tiny_llama(other_tok, tmp_path / "llm2", hidden_size=48, intermediate_size=96)

    first = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s2", "--max-steps", "2", stage="2", data=captions))
    args = _args(
        tiny_dirs,
        qformer_bert,
        tmp_path / "proj",
        "--max-steps",
        "2",
        "--init-from",
        str(tmp_path / "s2"),
        "--train",
        "projection",
        stage="2",
        data=captions,
    )
    args[args.index("--llm") + 1] = str(tmp_path / "llm2")
    rebridged = train.main(args)
    assert rebridged.config.llm_width == 48 and rebridged.projection.weight.shape == (48, 32)
    # The projection alone learned: the Q-Former is the one trained for the first LLM.
    for k, v in first.qformer.state_dict().items():
        assert torch.equal(v, rebridged.qformer.state_dict()[k]), k
    loaded = Bridge.from_pretrained(tmp_path / "proj")
    assert loaded.config.llm == str(tmp_path / "llm2")
    assert isinstance(loaded.caption(np.zeros((32, 32, 3), np.uint8), max_new_tokens=3)[0], str)
    # Then everything, starting from the projection-only bridge (same LLM now: its projection is kept).
    args = _args(
        tiny_dirs, qformer_bert, tmp_path / "both", "--max-steps", "1", "--init-from", str(tmp_path / "proj"), stage="2", data=captions
    )
    args[args.index("--llm") + 1] = str(tmp_path / "llm2")
    both = train.main(args)
    assert not torch.equal(both.qformer.query_tokens, rebridged.qformer.query_tokens)


def test_tubelets_are_chosen_for_a_new_qformer_and_kept_by_init_from(tiny_dirs, qformer_bert, captions, tmp_path):
    plain = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "plain", "--max-steps", "1", stage="1", data=captions))
    assert plain.config.qformer.tubelet_frames == 0
    # The tiny CLIP's patches carry their positions: no grid positions are added to them.
    assert not plain.config.qformer.grid_positions
    tube = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "tube", "--max-steps", "1", "--tubelets", stage="1", data=captions))
    assert tube.config.qformer.tubelet_frames == 2 == tube.config.num_frames  # _args: --num-frames 2
    kept = train.main(
        _args(
            tiny_dirs, qformer_bert, tmp_path / "kept", "--max-steps", "1", "--init-from", str(tmp_path / "tube"), stage="2", data=captions
        )
    )
    assert kept.config.qformer.tubelet_frames == 2 and Bridge.from_pretrained(tmp_path / "kept").config.qformer.tubelet_frames == 2
    with pytest.raises(SystemExit, match="tubelets change its input"):
        train.main(
            _args(
                tiny_dirs,
                qformer_bert,
                tmp_path / "no",
                "--max-steps",
                "1",
                "--init-from",
                str(tmp_path / "plain"),
                "--tubelets",
                stage="2",
                data=captions,
            )
        )


def test_lora_adapters_learn_while_the_llm_stays_frozen_and_carry_over(tiny_dirs, qformer_bert, captions, tmp_path):
    bridge = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "lora", "--max-steps", "3", "--lora", "2", stage="2", data=captions))
    untouched = Bridge.from_pretrained(tmp_path / "lora")  # the same backbones, freshly loaded
    lora = {k: v for k, v in bridge.trainable_state_dict().items() if "lora_" in k}
    assert lora and bridge.config.lora.r == 2
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # peft starts B at zero: it learned
    base = {k: v for k, v in bridge.llm.state_dict().items() if "lora_" not in k}
    fresh = untouched.llm.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in base.items())
    assert all(torch.equal(v, untouched.trainable_state_dict()[k]) for k, v in lora.items())
    # Continuing with the projection alone keeps the adapters as they are, and frozen.
    more = train.main(
        _args(
            tiny_dirs,
            qformer_bert,
            tmp_path / "proj",
            "--max-steps",
            "1",
            "--init-from",
            str(tmp_path / "lora"),
            "--train",
            "projection",
            stage="2",
            data=captions,
        )
    )
    assert all(torch.equal(v, more.trainable_state_dict()[k]) for k, v in lora.items())
    assert not any(p.requires_grad for n, p in more.llm.named_parameters())


def test_lora_is_refused_in_stage_1(tiny_dirs, qformer_bert, captions, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--lora RANK is for stage 2"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s1", "--lora", "2", data=captions))


def test_lora_modules_choose_what_is_adapted_and_are_saved(tiny_dirs, qformer_bert, captions, tmp_path):
    def adapted(bridge):  # e.g. "...layers.0.mlp.down_proj.lora_A.default.weight" -> "down_proj"
        return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in bridge.trainable_state_dict() if "lora_" in k}

    every = train.main(
        _args(
            tiny_dirs,
            qformer_bert,
            tmp_path / "all",
            "--max-steps",
            "1",
            "--lora",
            "2",
            "--lora-modules",
            "all-linear",
            stage="2",
            data=captions,
        )
    )
    # The tiny Llama's seven linear layers of each block; never the output head.
    assert adapted(every) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    again = Bridge.from_pretrained(tmp_path / "all")
    assert again.config.lora.target_modules == "all-linear" and adapted(again) == adapted(every)
    some = train.main(
        _args(
            tiny_dirs,
            qformer_bert,
            tmp_path / "some",
            "--max-steps",
            "1",
            "--lora",
            "2",
            "--lora-modules",
            "o_proj, down_proj",
            stage="2",
            data=captions,
        )
    )
    assert adapted(some) == {"o_proj", "down_proj"} and some.config.lora.target_modules == ["o_proj", "down_proj"]
    plain = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "plain", "--max-steps", "1", "--lora", "2", stage="2", data=captions))
    assert adapted(plain) == {"q_proj", "v_proj"}
    with pytest.raises(SystemExit, match="together with --lora RANK"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "no", "--lora-modules", "all-linear", stage="2", data=captions))


def test_the_cheap_loss_path_gives_the_forward_loss(tiny_bridge):
    bridge = tiny_bridge.eval()
    batch = bridge.answer_batch(["describe the clip .", "what color is the square ?", "how many ?"], ["a red square", "blue", "two"])
    features = torch.randn(3, 2, 17, 24)
    full = bridge(features=features, **batch)
    cheap = bridge(features=features, return_logits=False, **batch)
    assert cheap.logits is None and full.logits.shape[:2] == batch["input_ids"].shape
    assert torch.allclose(cheap.loss, full.loss, atol=1e-6)
    # Left padding puts every answer at the end; the end-of-turn token is a target, the prompt is not.
    tok = bridge.llm.tokenizer
    labels = batch["labels"][1]
    assert tok.convert_ids_to_tokens(labels[labels != -100].tolist()) == ["blue", "<eos>"]
    assert batch["attention_mask"][2, 0] == 0 and (batch["input_ids"][:, -1] == tok.eos_token_id).all()


def test_unreadable_samples_are_reported_and_skipped_and_too_many_stop_the_run(tiny_dirs, qformer_bert, captions, tmp_path):
    root = Path(captions).parent
    rows = [json.loads(line) for line in Path(captions).read_text().splitlines()]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps(r | {"image": str(root / r["image"])}) + "\n" for r in rows)
        + json.dumps({"image": "broken.png", "caption": "a red square"})
        + "\n"
    )
    # Two epochs: the broken file is met twice and reported once.
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "ok", "--epochs", "2", "--max-bad-fraction", "0.2", data=str(manifest)))
    bad = [json.loads(line) for line in (tmp_path / "ok" / "bad_samples.jsonl").read_text().splitlines()]
    assert [b["sample"] for b in bad] == [str(tmp_path / "broken.png")]
    assert [m["step"] for m in _metrics(tmp_path / "ok")] == list(range(1, 7))
    assert "broken.png" in bad[0]["error"]
    assert (tmp_path / "ok" / "bridge.safetensors").exists()
    with pytest.raises(SystemExit, match=r"1 of 9 samples are unreadable, more than --max-bad-fraction 0.01; see .*bad_samples.jsonl"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "stop", "--max-steps", "3", data=str(manifest)))


def test_configuration_errors_fail_before_any_compute_saying_what_to_change(tiny_dirs, qformer_bert, captions, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "x", stage="3", data=captions))
    assert "argument --stage: invalid choice: '3'" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "text": "a red square"}) + "\n")
    with pytest.raises(SystemExit, match="needs a 'caption' column, or 'question' and 'answer' columns; it has columns"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "x", data=str(tmp_path / "m.jsonl")))
    with pytest.raises(SystemExit, match="--train projection is for stage 2"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "x", "--train", "projection", data=captions))
    with pytest.raises(SystemExit, match="--cross-attention-every 0: give 1 "):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "x", "--cross-attention-every", "0", data=captions))
    # A vision encoder whose features the Q-Former cannot read.
    train.main(_args(tiny_dirs, qformer_bert, tmp_path / "b", "--max-steps", "1", data=captions))
    with pytest.raises(SystemExit, match="--vision .*: the Q-Former in .* was trained on .* features; drop --vision"):
        args = _args(tiny_dirs, qformer_bert, tmp_path / "x", "--init-from", str(tmp_path / "b"), data=captions)
        args[args.index("--vision") + 1] = tiny_dirs["vit"]
        train.main(args)
    # A Q-Former tokenizer larger than the Q-Former's vocabulary.
    big = tmp_path / "bigtok"
    tok = make_tokenizer()
    tok.add_tokens([f"extra{i}" for i in range(100)])
    tok.save_pretrained(big)
    n = len(make_tokenizer())
    with pytest.raises(SystemExit, match=f"the Q-Former tokenizer has {n + 100} tokens but the Q-Former only {n} word embeddings"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "x", "--qformer-tokenizer", str(big), data=captions))
    assert not (tmp_path / "x").exists()


def test_evaluation_logs_mean_losses(tiny_dirs, qformer_bert, captions, vqa, tmp_path):
    train.main(
        _args(
            tiny_dirs, qformer_bert, tmp_path / "e", "--max-steps", "2", "--eval-every", "1", "--eval-data", vqa, stage="2", data=captions
        )
    )
    evals = [m for m in _metrics(tmp_path / "e") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [1, 2]
    assert all(math.isfinite(m["eval_loss"]) for m in evals)


@pytest.mark.slow
def test_two_processes_train_and_rank0_writes_one_checkpoint(tiny_dirs, qformer_bert, captions, tmp_path):
    out = tmp_path / "ddp"
    # ACCELERATE_USE_CPU makes the two processes a gloo process group on the CPU.
    cmd = [
        *launch_two_processes(),
        str(ROOT / "train.py"),
        *_args(
            tiny_dirs,
            qformer_bert,
            out,
            "--max-steps",
            "3",
            "--save-every",
            "3",
            "--batch-size",
            "2",
            "--cache-features",
            str(tmp_path / "cache"),
            data=captions,
        ),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]  # one line per step: rank 0 alone writes metrics
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    assert Bridge.from_pretrained(out).heads is not None
    # Each process encoded its half of the clips into shards of its own; both read all of them.
    from qformer.data import FeatureCache

    shards = list((tmp_path / "cache").glob("shard-*.safetensors"))
    assert len(shards) == 2 and len(FeatureCache(tmp_path / "cache", "any")) == 8


def test_gradient_accumulation_counts_optimizer_steps(tiny_dirs, qformer_bert, captions, tmp_path):
    # 8 samples, batches of 3: 3 batches an epoch, grouped 2 + 1, so 2 optimizer steps an epoch.
    train.main(
        _args(
            tiny_dirs, qformer_bert, tmp_path / "acc", "--batch-size", "3", "--grad-accum", "2", "--epochs", "2", stage="2", data=captions
        )
    )
    steps = [m for m in _metrics(tmp_path / "acc") if "loss" in m]
    assert [(m["step"], m["epoch"]) for m in steps] == [(1, 0), (2, 0), (3, 1), (4, 1)]


@pytest.mark.backbones
@pytest.mark.slow
def test_stage1_then_stage2_on_the_offline_backbones(captions, tmp_path):
    """MiniLM-initialised Q-Former, EfficientNet-Lite0 at 128 px, SmolLM2-135M: one step of each stage."""
    common = [
        "--data",
        captions,
        "--vision-resolution",
        "128",
        "--num-frames",
        "1",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--num-workers",
        "0",
        "--log-with",
        "none",
    ]
    train.main(["--stage", "1", "--output", str(tmp_path / "s1"), *common])
    bridge = train.main(["--stage", "2", "--init-from", str(tmp_path / "s1"), "--output", str(tmp_path / "s2"), *common])
    assert bridge.config.llm == "smollm2-135m-instruct" and bridge.config.qformer.hidden_size == 384
    for out in ("s1", "s2"):
        assert all(math.isfinite(m["loss"]) for m in _metrics(tmp_path / out))
    assert Bridge.from_pretrained(tmp_path / "s2").heads is None  # left behind: they fit the stage-1 Q-Former
    assert bridge.config.qformer.grid_positions and bridge.config.qformer.grid_side == 0
    # At another resolution the grid changes (the final map, stride 32: 4 x 4 at 128 px, 8 x 8 at 256) and
    # positions go on counting on the 4 x 4 grid they were learnt on, through any later stage.
    finer = train.main(
        ["--stage", "2", "--init-from", str(tmp_path / "s2"), "--output", str(tmp_path / "s3"), *common, "--vision-resolution", "256"]
    )
    assert finer.config.vision_resolution == 256 and finer.config.qformer.grid_side == 4
    assert Bridge.from_pretrained(tmp_path / "s3").config.qformer.grid_side == 4
    assert (
        train.main(
            ["--stage", "2", "--init-from", str(tmp_path / "s3"), "--output", str(tmp_path / "s4"), *common, "--vision-resolution", "192"]
        ).config.qformer.grid_side
        == 4
    )


def objective_config():
    """A tiny Q-Former config for the stage-1 objective alone."""
    from qformer import QFormerConfig

    return QFormerConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        num_queries=4,
        vision_width=24,
        vocab_size=50,
        max_text_len=16,
        dropout=0.0,
        embed_dim=16,
    )


def test_identical_captions_are_never_each_other_s_negatives():
    """Templated captions repeat within a batch: such pairs share the ITC target and ITM labels them a match."""
    from qformer.model import QFormer, QFormerHeads

    torch.manual_seed(0)
    cfg = objective_config()
    objective = Stage1Objective(QFormer(cfg), QFormerHeads(cfg), label_smoothing=0.0)
    seen = {}
    objective.heads.itm.register_forward_hook(lambda m, args, out: seen.update(itm=out.mean(1)))
    objective.heads.vision_proj.register_forward_hook(lambda m, args, out: seen.setdefault("clip", out))
    objective.heads.text_proj.register_forward_hook(lambda m, args, out: seen.setdefault("text", out))
    features = torch.randn(3, 1, 5, 24)
    text = torch.tensor([[1, 7, 8, 9, 2]] * 3)  # one caption for all three clips
    losses = objective(features, text, torch.ones_like(text), generator=torch.Generator().manual_seed(0))

    # Every ITM pair, the drawn "negatives" included, is a match.
    assert losses["itm"].item() == pytest.approx(F.cross_entropy(seen["itm"], torch.ones(9, dtype=torch.long)).item(), abs=1e-6)
    # ITC: each clip's target is spread evenly over the three identical texts.
    clip, text_feat = F.normalize(seen["clip"], dim=-1), F.normalize(seen["text"], dim=-1)
    sim = torch.einsum("iqe,je->ijq", clip, text_feat).amax(-1) / objective.heads.temperature
    even = torch.full((3, 3), 1 / 3)
    assert losses["itc"].item() == pytest.approx(((F.cross_entropy(sim, even) + F.cross_entropy(sim.t(), even)) / 2).item(), abs=1e-5)


def test_stage_1_trains_on_the_chosen_losses_only(tiny_dirs, qformer_bert, captions, tmp_path):
    from qformer.model import QFormer, QFormerHeads

    torch.manual_seed(0)
    cfg = objective_config()
    objective = Stage1Objective(QFormer(cfg), QFormerHeads(cfg), losses=("itm", "itg"))
    features, text = torch.randn(3, 1, 5, 24), torch.tensor([[1, 7, 8, 2], [1, 9, 10, 2], [1, 11, 12, 2]])
    losses = objective(features, text, torch.ones_like(text), generator=torch.Generator().manual_seed(0))
    assert losses["loss"].item() == pytest.approx((losses["itm"] + losses["itg"]).item(), rel=1e-6)
    assert losses["itc"].item() > 0  # still reported
    losses["loss"].backward()
    # ITC's own heads get no gradient: only its similarities (to draw ITM's negatives) are used.
    assert objective.heads.text_proj.weight.grad is None and objective.heads.temperature.grad is None
    with pytest.raises(ValueError, match="choose among itc, itm, itg"):
        Stage1Objective(QFormer(cfg), QFormerHeads(cfg), losses=("itc", "mlm"))

    bridge = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s1", "--max-steps", "1", "--stage1-losses", "itg, itm", data=captions))
    m = [m for m in _metrics(tmp_path / "s1") if "loss" in m][-1]
    assert m["loss"] == pytest.approx(m["itm"] + m["itg"], rel=1e-5) and bridge.heads is not None
    with pytest.raises(SystemExit, match="choose among itc, itm, itg"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "bad", "--stage1-losses", "itc,contrast", data=captions))
    with pytest.raises(SystemExit, match="--stage1-losses is for stage 1"):
        train.main(_args(tiny_dirs, qformer_bert, tmp_path / "s2", "--stage1-losses", "itg", stage="2", data=captions))


def test_frame_sampling_is_kept_by_the_bridge_and_keys_the_feature_cache(tiny_dirs, qformer_bert, vqa, tmp_path, capsys):
    """--frame-sampling ends: the bridge records it, reads clips from their first frame to their last, and the
    feature cache keeps those features apart from the segment centres' of the same clips."""
    from qformer.session import ChatSession

    cache = ["--cache-features", str(tmp_path / "cache"), "--max-steps", "1"]
    centres = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "centres", *cache, stage="2", data=vqa))
    assert centres.config.frame_sampling == "centres"
    assert "4 samples encoded" in capsys.readouterr().out
    ends = train.main(_args(tiny_dirs, qformer_bert, tmp_path / "ends", *cache, "--frame-sampling", "ends", stage="2", data=vqa))
    assert "4 samples encoded" in capsys.readouterr().out  # not the centres' features again
    assert ends.config.frame_sampling == Bridge.from_pretrained(tmp_path / "ends").config.frame_sampling == "ends"
    clip = str(Path(vqa).parent / "clips" / "red.mp4")  # 6 frames at 6 fps, 2 read
    assert ChatSession(ends).load(clip).timestamps == pytest.approx([0.0, 5 / 6], abs=2e-3)
    assert ChatSession(centres).load(clip).timestamps == pytest.approx([1 / 6, 4 / 6], abs=2e-3)


def test_given_negatives_are_itm_negatives_and_extra_itc_texts():
    """A manifest's `negatives`: ITM classifies each clip with one of its own given negatives (a non-match),
    besides the in-batch ones; ITC compares each clip with all of them as extra texts."""
    from qformer.model import QFormer, QFormerHeads

    torch.manual_seed(0)
    cfg = objective_config()
    objective = Stage1Objective(QFormer(cfg), QFormerHeads(cfg), label_smoothing=0.0)
    seen = {}
    objective.heads.itm.register_forward_hook(lambda m, args, out: seen.update(itm=out.mean(1)))
    features = torch.randn(2, 1, 5, 24)
    text = torch.tensor([[1, 7, 8, 2], [1, 9, 10, 2]])
    # Clip 0 has two given negatives (one longer than the captions), clip 1 none.
    negatives = torch.tensor([[1, 7, 11, 2, 0], [1, 12, 8, 13, 2]])
    negative_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    given = dict(negative_ids=negatives, negative_mask=negative_mask, negative_owner=torch.tensor([0, 0]))
    losses = objective(features, text, torch.ones_like(text), torch.Generator().manual_seed(0), **given)
    # 3B in-batch pairs (each clip with its text, a wrong text, a wrong clip), then clip 0 with a given negative.
    labels = torch.tensor([1, 1, 0, 0, 0, 0, 0])
    assert seen["itm"].shape == (7, 2)
    assert losses["itm"].item() == pytest.approx(F.cross_entropy(seen["itm"], labels).item(), abs=1e-6)

    # ITC: each clip against the two captions and the two negatives; each text against the two clips.
    with torch.no_grad():
        q = objective.qformer(features, text, torch.ones_like(text), mode="unimodal")
        clip = F.normalize(objective.heads.vision_proj(q[:, :4]), dim=-1)
        texts = torch.cat([q[:, 4], objective.qformer(None, negatives, negative_mask)[:, 0]])
        sim = torch.einsum("iqe,je->ijq", clip, F.normalize(objective.heads.text_proj(texts), dim=-1)).amax(-1)
        sim = sim / objective.heads.temperature
    expected = (F.cross_entropy(sim, torch.tensor([0, 1])) + F.cross_entropy(sim[:, :2].t(), torch.tensor([0, 1]))) / 2
    assert losses["itc"].item() == pytest.approx(expected.item(), abs=1e-5)
    # Without negatives the same batch has 3B ITM pairs and ITC over the batch alone.
    losses = objective(features, text, torch.ones_like(text), torch.Generator().manual_seed(0))
    assert seen["itm"].shape == (6, 2)
    expected = (F.cross_entropy(sim[:, :2], torch.tensor([0, 1])) + F.cross_entropy(sim[:, :2].t(), torch.tensor([0, 1]))) / 2
    assert losses["itc"].item() == pytest.approx(expected.item(), abs=1e-5)
