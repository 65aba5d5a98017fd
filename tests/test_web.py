"""The Gradio page: end to end in Debian's headless chromium (Playwright), what the server exposes, the CLI.

The tiny bridge's answers are gibberish but deterministic, so the page must show exactly the text
Bridge.answer returns through the library for the same clip, question and history.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the web page needs gradio (pip install gradio)")

import httpx  # noqa: E402  (comes with gradio)
from conftest import free_port  # noqa: E402
from test_chat import Q1, Q2, REPO, as_read, bridge, bridge_dir, world_clips  # noqa: E402, F401  (fixtures)

from qformer import chat, world  # noqa: E402
from qformer.session import ChatSession  # noqa: E402
from qformer.web import Limits, build_app, launch  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
# Quiet: no sandbox (root in a container), no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_UPLOAD_BYTES = 256 << 10
MAX_CLIP_SECONDS = 2.5
TIMEOUT_MS = 120_000  # a busy 2-core machine runs the server, the model and the browser


def listening_addresses(port: int) -> set[str]:
    """Addresses with a socket listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                found.add(socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


@pytest.fixture(scope="module")
def served(bridge):
    """(address, app) of a page with small upload and clip limits."""
    port = free_port()
    demo = launch(bridge, port=port, block=False, limits=Limits(max_upload_bytes=MAX_UPLOAD_BYTES, max_clip_seconds=MAX_CLIP_SECONDS))
    yield f"http://127.0.0.1:{port}", demo
    demo.close()


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright's Python package (pip install playwright)")
    with sync_api.sync_playwright() as p:
        # Playwright gives each launch a fresh temporary --user-data-dir; nothing is downloaded.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """A 3 s clip (24 frames at 8 fps): over the page's 2.5 s limit."""
    frames = world.render(world.scene("test-iid", 2))
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    world.write_mp4(np.concatenate([frames, frames[:8]]), path)
    return path


def web_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    return parser.parse_args(["--web", *argv])


# ---- page helpers ------------------------------------------------------------------------------------


def open_page(browser, url: str, seen: list[str]):
    context = browser.new_context()
    context.on("request", lambda request: seen.append(request.url))
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    return page


def upload(page, path: Path) -> None:
    clear = page.locator("#upload button[aria-label='Clear']")
    if clear.count():  # a file is shown: remove it to get the drop zone back
        clear.click()
    page.locator("#upload input[type=file]").set_input_files(str(path))


def ask(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#question textarea").press("Enter")


def expect_chat(page, turns: list[tuple[str, str]]) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#chat [data-testid='user']")).to_have_text([q for q, _ in turns], timeout=TIMEOUT_MS)
    expect(page.locator("#chat [data-testid='bot']")).to_have_text([a for _, a in turns], timeout=TIMEOUT_MS)


def expect_status(page, text: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#status textarea")).to_have_value(text, timeout=TIMEOUT_MS)


# Records every text the last answer shows, to see it grow while it streams.
WATCH_ANSWERS = """() => {
  window.answerTexts = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll("#chat [data-testid='bot']");
    if (bots.length) window.answerTexts.push(bots[bots.length - 1].innerText.trim());
  }).observe(document.querySelector("#chat"), {subtree: true, childList: true, characterData: true});
}"""


# ---- the page, end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_page_answers_like_the_library_and_keeps_sessions_apart(browser, served, bridge, world_clips, long_clip, tmp_path):
    server, demo = served
    clip, other, _ = world_clips
    a1 = bridge.answer(as_read(bridge, clip), Q1)
    a2 = bridge.answer(as_read(bridge, clip), Q2, [(Q1, a1)])
    b1 = bridge.answer(as_read(bridge, other), Q1)
    assert len({a1, a2, b1}) == 3  # so a mixed-up history or clip could not pass unnoticed
    seen: list[str] = []
    a, b = open_page(browser, server, seen), open_page(browser, server, seen)

    ask(a, Q1)
    expect_status(a, "Upload an image or a clip first.")

    # Limits: the reason is shown in the page.
    upload(a, long_clip)
    expect_status(a, f"Cannot use this file. long.mp4: the clip lasts 3.0 s, longer than the limit of {MAX_CLIP_SECONDS:g} s")
    assert a.locator("#frames img").count() == 0
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(MAX_UPLOAD_BYTES + 1))
    upload(b, big)
    b.get_by_text(re.compile(r'exceed the maximum allowed size of 256(\.0)? Kb: "big.mp4"')).wait_for()

    # A world clip: its sampled frames as a strip, then the answer, streamed, exactly the library's.
    upload(a, clip)
    expect_status(a, "Loaded world0.mp4: 4 frames sampled from 2.0 s. Ask a question.")
    assert a.locator("#frames img").count() == bridge.config.num_frames
    a.evaluate(WATCH_ANSWERS)
    ask(a, Q1)
    expect_chat(a, [(Q1, a1)])
    shown = a.evaluate("window.answerTexts")
    assert any(text and a1.startswith(text) and text != a1 for text in shown), shown

    # A second browser session asks about another clip while the first follows up: each sees only its own.
    upload(b, other)
    expect_status(b, "Loaded world1.mp4: 4 frames sampled from 2.0 s. Ask a question.")
    ask(a, Q2)
    ask(b, Q1)
    expect_chat(a, [(Q1, a1), (Q2, a2)])
    expect_chat(b, [(Q1, b1)])

    # A new conversation forgets the turns (the next answer is the first one again), keeps the clip.
    a.locator("#reset").click()
    expect_chat(a, [])
    ask(a, Q1)
    expect_chat(a, [(Q1, a1)])
    expect_chat(b, [(Q1, b1)])

    # Closing a page frees its conversation's frames at once, not when it expires.
    def conversations_about(path: Path) -> int:
        held = [v for s in demo.state_holder.session_data.values() for v in s.state_data.values() if isinstance(v, ChatSession)]
        return sum(session.clip is not None and session.clip.path.endswith(path.name) for session in held)

    assert conversations_about(other) == 1
    b.context.close()
    deadline = time.monotonic() + 60
    while conversations_about(other):
        assert time.monotonic() < deadline, "the closed page's conversation still holds its frames"
        time.sleep(0.2)

    assert seen and all(url.startswith(server + "/") for url in seen), {u for u in seen if not u.startswith(server + "/")}


# ---- what the server exposes ---------------------------------------------------------------------------


def call(server: str, api: str, *data) -> str:
    """Call one of the page's events through Gradio's REST API; its server-sent events as text."""
    event = httpx.post(f"{server}/gradio_api/call/{api}", json={"data": list(data)}).json()["event_id"]
    return httpx.get(f"{server}/gradio_api/call/{api}/{event}", timeout=120).text


def test_server_reads_only_uploaded_files(server, bridge_dir, world_clips):
    from gradio.utils import get_upload_folder

    port = int(server.rsplit(":", 1)[1])
    assert listening_addresses(port) == {"127.0.0.1"}
    elsewhere = ["/etc/hosts", str(bridge_dir / "bridge_config.json"), str(world_clips[0]), f"{get_upload_folder()}/../../etc/hosts"]
    for path in elsewhere:
        assert httpx.get(f"{server}/gradio_api/file={path}").status_code == 403, path
        # An upload event naming a file the browser did not upload is refused before the page's code runs.
        events = call(server, "load", {"path": path, "meta": {"_type": "gradio.FileData"}})
        assert events.startswith("event: error") and "Loaded" not in events, (path, events)
    with open(world_clips[0], "rb") as f:
        (uploaded,) = httpx.post(f"{server}/gradio_api/upload", files={"files": f}).json()
    events = call(server, "load", {"path": uploaded, "meta": {"_type": "gradio.FileData"}})
    assert "event: complete" in events and "Loaded world0.mp4: 4 frames sampled from 2.0 s. Ask a question." in events
    assert httpx.get(f"{server}/gradio_api/file={uploaded}").content == world_clips[0].read_bytes()


def test_the_page_answers_by_beam_search_when_asked_to(bridge, world_clips):
    """`qformer chat --web --num-beams NB`: each browser session's answers are the library's under NB beams."""
    import gradio as gr

    events = {f.name: f.fn for f in build_app(bridge, num_beams=3).fns.values()}
    status, _, _, session = events["load"](str(world_clips[0]), None, gr.Request(session_hash="one"))
    assert status.startswith("Loaded world0.mp4") and session.num_beams == 3
    *_, (chat_shown, _, _, _) = events["ask"](Q1, session)
    assert session.history == [(Q1, bridge.answer(as_read(bridge, world_clips[0]), Q1, num_beams=3))]
    assert chat_shown[-1]["content"] == session.history[0][1]


@pytest.mark.slow
def test_cli_serves_the_page_on_loopback(bridge_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "qformer.chat", "--web", "--bridge", str(bridge_dir), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the page did not come up"
            time.sleep(0.5)
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_says_when_it_cannot_serve(bridge_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = web_args("--bridge", str(bridge_dir), "--port", str(port))
        with pytest.raises(SystemExit, match=f"cannot serve the page on 127.0.0.1:{port} .*choose another --port"):
            chat.main(args)


# ---- what one visitor or one request may cost ---------------------------------------------------------


def client(server: str):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=False)


def stored_session(demo, client) -> ChatSession | None:
    """The ChatSession the server keeps for a client's Gradio session."""
    session = demo.state_holder.session_data.get(client.session_hash)
    kept = [v for v in session.state_data.values() if isinstance(v, ChatSession)] if session else []
    return kept[0] if kept else None


def solid_png(path: Path, width: int, height: int) -> Path:
    """A one-colour PNG: millions of pixels in a few kilobytes."""
    from PIL import Image

    Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    return path


def test_a_session_keeps_frames_at_the_size_the_bridge_reads(served, bridge, tmp_path):
    from gradio_client import handle_file

    server, demo = served
    side = 2 * bridge.vision.image_size  # twice the encoder's input side
    visitor = client(server)
    for name, (width, height), stored in (("square.png", (6000, 6000), (side, side)), ("wide.png", (20000, 1200), (4, side))):
        path = solid_png(tmp_path / name, width, height)
        status, strip, _ = visitor.predict(handle_file(path), api_name="/load")
        assert status == f"Loaded {name}: an image. Ask a question."
        assert stored_session(demo, visitor).clip.frames.shape == (1, *stored, 3)
        assert len(strip) == 1
    # The wide image is the one the next answer is about.
    chat_shown, _, _ = visitor.predict(Q1, api_name="/ask")
    assert chat_shown[-1]["content"][0]["text"] == bridge.answer(as_read(bridge, tmp_path / "wide.png"), Q1)


def test_refusals_say_why_and_leave_the_conversation_as_it_was(served, bridge, world_clips, long_clip, tmp_path):
    import http.server
    import threading

    from gradio_client import handle_file

    server, demo = served
    clip = world_clips[0]
    a1 = bridge.answer(as_read(bridge, clip), Q1)
    visitor = client(server)
    visitor.predict(handle_file(clip), api_name="/load")
    visitor.predict(Q1, api_name="/ask")
    kept = stored_session(demo, visitor)
    frames = kept.clip.frames

    status, _, _ = visitor.predict(handle_file(long_clip), api_name="/load")
    assert status == f"Cannot use this file. long.mp4: the clip lasts 3.0 s, longer than the limit of {MAX_CLIP_SECONDS:g} s"
    broken = world_clips[2]
    status, _, _ = visitor.predict(handle_file(broken), api_name="/load")
    assert status.startswith("Cannot use this file. broken.mp4: not a decodable video or image")

    # A URL where a file is expected is refused, and nothing is fetched from it.
    fetched = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fetched.append(self.path)
            self.send_response(404)
            self.end_headers()

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder) as elsewhere:
        threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{elsewhere.server_address[1]}/photo.png"
        with pytest.raises(httpx.HTTPStatusError) as refused:
            visitor.predict(handle_file(url), api_name="/load")
        assert refused.value.response.status_code == 400
        assert refused.value.response.json() == {"detail": f"{url}: a URL is never fetched here; upload the file itself"}
        elsewhere.shutdown()
    assert fetched == []

    limit = Limits().max_question_chars
    shown, _, status = visitor.predict("what " * 101, api_name="/ask")
    assert status == f"The question has {len('what ' * 101) - 1} characters; the limit is {limit}. Shorten it."

    assert stored_session(demo, visitor) is kept and kept.clip.frames is frames and kept.history == [(Q1, a1)]
    shown, _, _ = visitor.predict(Q2, api_name="/ask")
    assert shown[-1]["content"][0]["text"] == bridge.answer(as_read(bridge, clip), Q2, [(Q1, a1)])


def test_a_conversation_has_a_number_of_turns(bridge, world_clips):
    from gradio_client import handle_file

    port = free_port()
    demo = launch(bridge, port=port, block=False, limits=Limits(max_turns=2, max_new_tokens=4))
    try:
        visitor = client(f"http://127.0.0.1:{port}")
        visitor.predict(handle_file(world_clips[0]), api_name="/load")
        for question in (Q1, Q2):
            visitor.predict(question, api_name="/ask")
        shown, _, status = visitor.predict(Q1, api_name="/ask")
        assert status == "This conversation has reached its 2 questions; start a new conversation."
        assert shown == {"__type__": "update"}  # the chat shown stays as it was
        assert [q for q, _ in stored_session(demo, visitor).history] == [Q1, Q2]
        visitor.predict(api_name="/reset")
        shown, _, _ = visitor.predict(Q1, api_name="/ask")
        assert len(shown) == 2
    finally:
        demo.close()


def test_uploads_are_bounded_per_request(server):
    part = os.urandom(MAX_UPLOAD_BYTES * 6 // 10)  # each under the limit, together over it
    refusal = "one upload may carry at most 256 KB (all its files together)"
    response = httpx.post(f"{server}/gradio_api/upload", files=[("files", ("a.mp4", part)), ("files", ("b.mp4", part))])
    assert response.status_code == 413 and refusal in response.json()["detail"], response.text

    # The same body without a declared length (chunked) is refused when it passes the limit.
    request = httpx.Request("POST", f"{server}/gradio_api/upload", files=[("files", ("a.mp4", part)), ("files", ("b.mp4", part))])
    body = request.read()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    headers = {"content-type": request.headers["content-type"]}
    response = httpx.post(f"{server}/gradio_api/upload", content=chunks, headers=headers)
    assert response.status_code == 413 and refusal in response.json()["detail"], response.text

    response = httpx.post(f"{server}/gradio_api/upload", files=[("files", ("a.mp4", part))])
    assert response.status_code == 200 and len(response.json()) == 1


def test_sessions_are_bounded_and_expire_when_idle(bridge, world_clips):
    from gradio_client import handle_file

    port = free_port()
    demo = launch(bridge, port=port, block=False, limits=Limits(max_sessions=1, session_ttl_s=2))
    try:
        first, second = client(f"http://127.0.0.1:{port}"), client(f"http://127.0.0.1:{port}")
        assert first.predict(handle_file(world_clips[0]), api_name="/load")[0].startswith("Loaded world0.mp4")
        kept = stored_session(demo, first)
        status, _, _ = second.predict(handle_file(world_clips[1]), api_name="/load")
        assert status == "The server is busy (open conversations: 1 of 1). Try again in a few minutes."
        assert stored_session(demo, second) is None
        # Two seconds without a request: the first conversation is closed, its frames freed.
        deadline = time.monotonic() + 30
        while stored_session(demo, first) is not None:
            assert time.monotonic() < deadline, "the idle session was not deleted"
            time.sleep(0.2)
        assert kept.clip is None and kept.history == []
        assert second.predict(handle_file(world_clips[1]), api_name="/load")[0].startswith("Loaded world1.mp4")
        assert first.predict(Q1, api_name="/ask")[2] == "Upload an image or a clip first."
    finally:
        demo.close()


def test_the_queue_is_bounded_and_an_abandoned_answer_stops(bridge, world_clips):
    """A beam-search answer shows nothing until it is done; it still stops when its client goes away."""
    import json
    import threading

    from gradio_client import handle_file

    port = free_port()
    server = f"http://127.0.0.1:{port}"
    # 20,000 tokens of beam search: a minute or more on this model, unless stopped.
    demo = launch(bridge, port=port, block=False, limits=Limits(max_queue=1, max_new_tokens=20_000), num_beams=2)
    try:
        visitor = client(server)
        visitor.predict(handle_file(world_clips[0]), api_name="/load")
        ask = next(d["id"] for d in visitor.config["dependencies"] if d["api_name"] == "ask")

        def join(session_hash: str) -> httpx.Response:
            body = {"data": [Q1, None], "fn_index": ask, "session_hash": session_hash, "trigger_id": None, "event_data": None}
            return httpx.post(f"{server}/gradio_api/queue/join", json=body)

        assert join(visitor.session_hash).status_code == 200
        with httpx.stream("GET", f"{server}/gradio_api/queue/data", params={"session_hash": visitor.session_hash}, timeout=60) as events:
            messages = (json.loads(line[len("data: ") :])["msg"] for line in events.iter_lines() if line.startswith("data: "))
            generating = (m for m in messages if m == "process_generating")
            next(generating), next(generating)  # "Answering.", then the answer's first idle tick: it is being generated
            assert any(t.name == "chat-generate" for t in threading.enumerate())
            # One request waits for the answer slot; the next finds the queue full.
            assert join("waiting").status_code == 200
            full = join("one-too-many")
            assert full.status_code == 503 and full.json()["detail"].startswith("Queue is full. Max size is 1"), full.text
        left = time.monotonic()  # the client has gone away
        while any(t.name == "chat-generate" for t in threading.enumerate()):
            assert time.monotonic() - left < 15, "the abandoned answer is still being generated"
            time.sleep(0.1)
    finally:
        demo.close()


def test_every_limit_is_a_flag(bridge_dir):
    assert all(getattr(web_args(), limit) == getattr(Limits(), limit) for limit in vars(Limits()))
    args = web_args("--max-sessions", "3", "--session-ttl-s", "90", "--max-upload-bytes", "1000", "--max-queue", "2")
    assert (args.max_sessions, args.session_ttl_s, args.max_upload_bytes, args.max_queue) == (3, 90.0, 1000, 2)
    with pytest.raises(SystemExit, match="qformer chat: --max-queue must be positive, got 0"):
        chat.main(web_args("--bridge", str(bridge_dir), "--max-queue", "0"))


# ---- with the trained demo bridge (turns on when demos/bridge ships) ----------------------------------


@pytest.mark.slow
@pytest.mark.backbones
@pytest.mark.skipif(not chat.DEFAULT_BRIDGE.exists(), reason="the trained demo bridge (demos/bridge) is not there yet")
def test_default_bridge_answers_in_the_page(browser, tmp_path):
    scene = world.scene("test-iid", 0)
    path = tmp_path / "world.mp4"
    world.write_mp4(world.render(scene), path)
    bridge = chat.load_bridge(None)
    answer = bridge.answer(as_read(bridge, path), Q1)
    assert world.score_answer(answer, dict(world.questions(scene))[Q1]), answer
    port = free_port()
    demo = launch(bridge, port=port, block=False)
    try:
        page = open_page(browser, f"http://127.0.0.1:{port}", [])
        upload(page, path)
        expect_status(page, f"Loaded world.mp4: {bridge.config.num_frames} frames sampled from 2.0 s. Ask a question.")
        ask(page, Q1)
        expect_chat(page, [(Q1, answer)])
    finally:
        demo.close()
