"""The chat session and the terminal chat: multi-turn answers equal Bridge.answer's, streamed; errors are messages."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import qformer.bridge
from adapters import video
from adapters.video import Clip, ClipError, decode_side, read_clip
from qformer import Bridge, chat, world
from qformer.session import ChatError, ChatSession

REPO = Path(__file__).resolve().parent.parent
Q1, Q2, Q3 = "what color is the background?", "how many objects are there?", "what shape is the red object?"


def as_read(bridge: Bridge, path) -> Clip:
    """`path` as a ChatSession reads it: the frames the bridge samples, decoded at twice the encoder's input side."""
    return read_clip(path, num_frames=bridge.config.num_frames, max_side=decode_side(bridge.vision))


@pytest.fixture(scope="module")
def bridge_dir(tiny_dirs, tmp_path_factory) -> Path:
    """A saved tiny bridge: random, so its answers are gibberish, but deterministic (greedy)."""
    torch.manual_seed(0)
    bridge = Bridge(tiny_config(tiny_dirs))
    # A random Q-Former's cross-attention averages small values, so every clip would get the same
    # gibberish; amplifying the path from the frames to the LLM makes answers depend on the clip,
    # so the tests can tell a mixed-up clip from the right one.
    with torch.no_grad():
        for layer in bridge.qformer.layers:
            if layer.cross_attn is not None:
                layer.cross_attn.value.weight.mul_(5)
                layer.cross_attn.out.weight.mul_(5)
        bridge.projection.weight.mul_(5)
    path = tmp_path_factory.mktemp("chat") / "bridge"
    bridge.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bridge(bridge_dir) -> Bridge:
    return Bridge.from_pretrained(bridge_dir).eval()


@pytest.fixture(scope="module")
def world_clips(tmp_path_factory) -> list[Path]:
    """Two world clips (test-iid scenes 0 and 1) written as MP4, plus a truncated copy of the first."""
    root = tmp_path_factory.mktemp("clips")
    paths = []
    for index in range(2):
        paths.append(root / f"world{index}.mp4")
        world.write_mp4(world.render(world.scene("test-iid", index)), paths[-1])
    data = paths[0].read_bytes()
    (root / "broken.mp4").write_bytes(data[: len(data) // 2])
    return paths + [root / "broken.mp4"]


def test_multi_turn_answers_are_the_librarys(bridge, world_clips):
    session = ChatSession(bridge)
    session.load(world_clips[0])
    chunks = list(session.stream(Q1))
    a1 = bridge.answer(as_read(bridge, world_clips[0]), Q1)
    assert a1 and "".join(chunks) == a1
    assert a1 != bridge.answer(as_read(bridge, world_clips[1]), Q1)  # the answer depends on the clip
    assert len(chunks) > 1  # streamed, not delivered at once
    a2 = "".join(session.stream(Q2))
    assert a2 == bridge.answer(as_read(bridge, world_clips[0]), Q2, [(Q1, a1)])
    assert session.history == [(Q1, a1), (Q2, a2)]
    # The follow-up really saw the first turn, in the LLM's own chat template.
    assert a2 != bridge.answer(as_read(bridge, world_clips[0]), Q2)
    ids, _ = bridge.llm.chat_prompt(Q2, [(Q1, a1)])
    assert bridge.llm.tokenizer.decode(ids).count("<|user|>") == 2


def test_a_caption_first_bridge_streams_its_answer_and_not_its_caption(bridge, world_clips):
    bridge.config.caption_first = True
    try:
        session = ChatSession(bridge)
        session.load(world_clips[0])
        answer = bridge.answer(as_read(bridge, world_clips[0]), Q1)
        assert "".join(session.stream(Q1)) == answer
        assert session.history == [(Q1, answer)]
    finally:
        bridge.config.caption_first = False


def test_a_caption_first_chat_captions_each_clip_once(bridge, world_clips, monkeypatch):
    """Every turn's answer is the library's (which captions before each call), with one caption per clip."""
    prompt = bridge.config.caption_prompt
    bridge.config.caption_first = True
    try:
        clip0, clip1 = str(world_clips[0]), str(world_clips[1])
        expected = {
            (clip0, 1): bridge.answer(as_read(bridge, clip0), Q1),
            (clip0, 2): bridge.answer(as_read(bridge, clip0), Q2, [(Q1, bridge.answer(as_read(bridge, clip0), Q1))]),
            (clip1, 1): bridge.answer(as_read(bridge, clip1), Q1),
        }
        calls = []
        generate = Bridge.generate
        monkeypatch.setattr(Bridge, "generate", lambda self, *a, **k: calls.append(1) or generate(self, *a, **k))
        session = ChatSession(bridge)
        session.load(clip0)
        a1 = "".join(session.stream(Q1))
        a2 = "".join(session.stream(Q2))
        assert (a1, a2) == (expected[clip0, 1], expected[clip0, 2])
        assert len(calls) == 3  # the caption, then two answers
        session.reset()  # the same clip: its caption still holds
        assert "".join(session.stream(Q1)) == a1 and len(calls) == 4
        session.load(clip1)  # another clip is captioned anew
        assert "".join(session.stream(Q1)) == expected[clip1, 1] and len(calls) == 6
        assert session.opening[1][0][0] == prompt and session.history == [(Q1, expected[clip1, 1])]
    finally:
        bridge.config.caption_first = False


def test_beam_search_answers_are_the_librarys_and_arrive_whole(bridge, world_clips):
    clip = str(world_clips[0])
    read = as_read(bridge, clip)
    session = ChatSession(bridge, num_beams=3)
    session.load(clip)
    chunks = list(session.stream(Q1))
    a1 = bridge.answer(read, Q1, num_beams=3)
    assert chunks == [a1]
    a2 = "".join(session.stream(Q2))
    assert a2 == bridge.answer(read, Q2, [(Q1, a1)], num_beams=3)
    assert session.history == [(Q1, a1), (Q2, a2)]
    # A caption-first bridge's opening caption is decoded by the same beam search (as Bridge.ask does).
    bridge.config.caption_first = True
    try:
        session = ChatSession(bridge, num_beams=3)
        session.load(clip)
        assert "".join(session.stream(Q1)) == bridge.answer(read, Q1, num_beams=3)
        assert session.opening[1] == [(bridge.config.caption_prompt, bridge.caption(read, num_beams=3)[0])]
    finally:
        bridge.config.caption_first = False
    with pytest.raises(ValueError, match="num_beams must be 1 .greedy. or more, not 0"):
        ChatSession(bridge, num_beams=0)


def test_reset_and_new_clips_start_new_conversations(bridge, world_clips):
    session = ChatSession(bridge, max_new_tokens=8)
    session.load(world_clips[0])
    first = "".join(session.stream(Q1))
    "".join(session.stream(Q2))
    session.reset()
    assert session.history == []
    assert "".join(session.stream(Q1)) == first
    # A file that cannot be used leaves the conversation as it was.
    for bad in (world_clips[2], world_clips[0].parent / "missing.png"):
        with pytest.raises(ClipError, match=bad.name):
            session.load(bad)
    with pytest.raises(ClipError, match="world1.mp4: the clip lasts 2.0 s, longer than the limit of 1.5 s"):
        session.load(world_clips[1], max_duration_s=1.5)
    assert session.history == [(Q1, first)] and session.clip.path == str(world_clips[0])
    session.load(world_clips[1])
    assert session.history == [] and len(session.clip.frames) == bridge.config.num_frames
    assert "".join(session.stream(Q1)) == bridge.answer(as_read(bridge, world_clips[1]), Q1, max_new_tokens=8)


def test_a_long_clip_is_refused_before_decoding(bridge, tmp_path):
    from test_video import write_hour

    path = write_hour(tmp_path / "hour.mp4")
    session = ChatSession(bridge)
    before = video.frames_decoded
    with pytest.raises(ClipError, match="hour.mp4: the clip lasts 3600.0 s, longer than the limit of 60 s"):
        session.load(path, max_duration_s=60)
    assert video.frames_decoded == before and session.clip is None


def test_a_session_keeps_frames_at_twice_the_encoders_input(bridge, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (6000, 3000), (200, 30, 30)).save(path)
    side = 2 * bridge.vision.image_size
    assert ChatSession(bridge).load(path).frames.shape == (1, side // 2, side, 3)


def test_closing_an_answer_that_shows_nothing_yet_stops_it(bridge, world_clips):
    """Beam search yields its answer only at the end; with idle_s the stream can be closed before that."""
    session = ChatSession(bridge, max_new_tokens=20_000, num_beams=2)  # a minute or more, unless stopped
    session.load(world_clips[0])
    answering = session.stream(Q1, idle_s=0.1)
    assert next(answering) == ""  # 0.1 s without text
    start = time.monotonic()
    answering.close()
    assert time.monotonic() - start < 5
    assert not any(t.name == "chat-generate" for t in threading.enumerate())
    assert session.history == []


def test_questions_need_a_clip_and_text(bridge, world_clips):
    session = ChatSession(bridge)
    with pytest.raises(ChatError, match="no image or clip"):
        next(session.stream(Q1))
    session.load(world_clips[0])
    with pytest.raises(ChatError, match="empty question"):
        next(session.stream("  "))


def test_closing_a_stream_stops_generation_and_keeps_no_turn(bridge, world_clips, monkeypatch):
    full = bridge.answer(as_read(bridge, world_clips[0]), Q1, max_new_tokens=100)
    returned = []
    library_answer = bridge.answer

    def recorded_answer(*args, **kwargs):
        returned.append(library_answer(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(bridge, "answer", recorded_answer)
    session = ChatSession(bridge, max_new_tokens=100)
    session.load(world_clips[0])
    answering = session.stream(Q1)
    next(answering)
    answering.close()  # what Ctrl-C or a closed page does
    assert not any(t.name == "chat-generate" for t in threading.enumerate())
    assert len(returned[0].split()) < len(full.split())  # generation stopped early
    assert session.history == []
    assert "".join(session.stream(Q1)) == full


def test_an_answer_outliving_its_conversation_is_not_kept(bridge, world_clips):
    session = ChatSession(bridge, max_new_tokens=8)
    session.load(world_clips[0])
    answering = session.stream(Q1)
    next(answering)
    session.reset()  # e.g. "New conversation" clicked while the answer streams
    list(answering)
    assert session.history == []


@pytest.mark.slow
def test_terminal_chat_through_stdin(bridge, bridge_dir, world_clips):
    clip, other, broken = world_clips
    lines = [Q1, Q2, "/image bad/path.png", f"/clip {broken}", "/nonsense", "", Q3, "/reset", Q1, f"/clip {other}", Q2, "/quit", Q3]
    run = subprocess.run(
        [sys.executable, "-m", "qformer.chat", "--bridge", str(bridge_dir), "--clip", str(clip)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    a1 = bridge.answer(as_read(bridge, clip), Q1)
    a2 = bridge.answer(as_read(bridge, clip), Q2, [(Q1, a1)])
    a3 = bridge.answer(as_read(bridge, clip), Q3, [(Q1, a1), (Q2, a2)])  # the failed loads kept the conversation
    b2 = bridge.answer(as_read(bridge, other), Q2)  # a new clip starts a new conversation
    # stdout holds the answers only, one per line; the reset question got the first answer again;
    # nothing after /quit was answered.
    assert run.stdout.splitlines() == [a1, a2, a3, a1, b2]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == "error: bad/path.png: no such file"
    assert errors[1].startswith(f"error: {broken}: not a decodable video or image")
    assert errors[2] == "error: unknown command /nonsense"
    assert len(errors) == 3
    assert "conversation cleared" in run.stderr
    assert f"loaded {other}: 4 frames sampled from 2.0 s" in run.stderr


def _args(**given) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    return parser.parse_args([f"--{k}={v}" if v is not True else f"--{k}" for k, v in given.items()])


def test_arguments_and_defaults():
    args = _args()
    assert (args.bridge, args.image, args.clip, args.web, args.host, args.port, args.num_beams) == (
        None,
        None,
        None,
        False,
        "127.0.0.1",
        7860,
        1,
    )
    assert chat.DEFAULT_BRIDGE == REPO / "demos" / "bridge"
    with pytest.raises(SystemExit):
        _args(image="a.png", clip="b.mp4")


def test_startup_errors_are_messages(bridge_dir, world_clips, monkeypatch, tmp_path):
    monkeypatch.setattr(qformer.bridge, "DEFAULT_BRIDGE", tmp_path / "demos" / "bridge")
    with pytest.raises(SystemExit, match="the default bridge .* is not there; pass --bridge DIR"):
        chat.main(_args())
    with pytest.raises(SystemExit, match="nowhere/at/all: no such bridge directory"):
        chat.main(_args(bridge=tmp_path / "nowhere/at/all"))
    with pytest.raises(SystemExit, match="not a bridge directory"):
        chat.main(_args(bridge=tmp_path))
    with pytest.raises(SystemExit, match="--image and --clip are for the terminal chat"):
        chat.main(_args(bridge=bridge_dir, clip=world_clips[0], web=True))
    with pytest.raises(SystemExit, match="--num-beams must be at least 1, got 0"):
        chat.main(_args(bridge=bridge_dir, **{"num-beams": 0}))
    with pytest.raises(SystemExit, match="broken.mp4: not a decodable video"):
        chat.main(_args(bridge=bridge_dir, clip=world_clips[2]))


# ---- with the trained demo bridge (turns on when demos/bridge ships) ----------------------------------


@pytest.mark.slow
@pytest.mark.backbones
@pytest.mark.skipif(not chat.DEFAULT_BRIDGE.exists(), reason="the trained demo bridge (demos/bridge) is not there yet")
def test_default_bridge_answers_world_questions(tmp_path):
    """The chat gives exactly the library's answers (so bench/quality.py's VQA accuracy), and they are right."""
    bridge = chat.load_bridge(None)
    session = ChatSession(bridge)
    right = total = 0
    for index in range(4):
        scene = world.scene("test-iid", index)
        path = tmp_path / f"world{index}.mp4"
        world.write_mp4(world.render(scene), path)
        session.load(path)
        for question, expected in world.questions(scene):
            session.reset()  # each question on its own, as the benchmark asks them
            answer = "".join(session.stream(question))
            assert answer == bridge.answer(as_read(bridge, path), question)
            if question == Q1:
                assert world.score_answer(answer, expected), (path, question, answer, expected)
            right += world.score_answer(answer, expected)
            total += 1
    print(f"VQA accuracy through the chat: {right}/{total}")
