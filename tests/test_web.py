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

from qformer import chat, world  # noqa: E402
from qformer.web import build_app, launch  # noqa: E402

from test_chat import Q1, Q2, REPO, bridge, bridge_dir, world_clips  # noqa: E402, F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
# Quiet: no sandbox (root in a container), no GPU, nothing fetched in the background.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MAX_UPLOAD_BYTES = 256 << 10
MAX_CLIP_SECONDS = 2.5
TIMEOUT_MS = 120_000  # a busy 2-core machine runs the server, the model and the browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def server(bridge):
    port = free_port()
    demo = launch(bridge, port=port, block=False, max_upload_bytes=MAX_UPLOAD_BYTES, max_clip_seconds=MAX_CLIP_SECONDS)
    yield f"http://127.0.0.1:{port}"
    demo.close()


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
def test_page_answers_like_the_library_and_keeps_sessions_apart(browser, server, bridge, world_clips, long_clip, tmp_path):
    clip, other, _ = world_clips
    a1 = bridge.answer(str(clip), Q1)
    a2 = bridge.answer(str(clip), Q2, [(Q1, a1)])
    b1 = bridge.answer(str(other), Q1)
    assert len({a1, a2, b1}) == 3  # so a mixed-up history or clip could not pass unnoticed
    seen: list[str] = []
    a, b = open_page(browser, server, seen), open_page(browser, server, seen)

    ask(a, Q1)
    expect_status(a, "Upload an image or a clip first.")

    # Limits: the reason is shown in the page.
    upload(a, long_clip)
    expect_status(a, f"Cannot use this file. long.mp4: the clip lasts 3.0 s; the limit here is {MAX_CLIP_SECONDS:g} s")
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
    events = {f.name: f.fn for f in build_app(bridge, num_beams=3).fns.values()}
    session, status, _, _ = events["load"](str(world_clips[0]), None)
    assert status.startswith("Loaded world0.mp4") and session.num_beams == 3
    *_, (chat_shown, _, _) = events["ask"](Q1, session)
    assert session.history == [(Q1, bridge.answer(str(world_clips[0]), Q1, num_beams=3))]
    assert chat_shown[-1]["content"] == session.history[0][1]


@pytest.mark.slow
def test_cli_serves_the_page_on_loopback(bridge_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "qformer.chat", "--web", "--bridge", str(bridge_dir), "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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
        args = argparse.Namespace(bridge=str(bridge_dir), image=None, clip=None, web=True, host="127.0.0.1", port=port,
                                  num_beams=1)
        with pytest.raises(SystemExit, match=f"cannot serve the page on 127.0.0.1:{port} .*choose another --port"):
            chat.main(args)


# ---- with the trained demo bridge (turns on when demos/bridge ships) ----------------------------------


@pytest.mark.slow
@pytest.mark.backbones
@pytest.mark.skipif(not chat.DEFAULT_BRIDGE.exists(), reason="the trained demo bridge (demos/bridge) is not there yet")
def test_default_bridge_answers_in_the_page(browser, tmp_path):
    scene = world.scene("test-iid", 0)
    path = tmp_path / "world.mp4"
    world.write_mp4(world.render(scene), path)
    bridge = chat.load_bridge(None)
    answer = bridge.answer(str(path), Q1)
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
