"""The chat as a Gradio page: upload an image or a clip, see the sampled frames, ask and follow up.

A thin layer over `ChatSession` (and so over `Bridge.answer`): each browser session gets its own
ChatSession in a `gr.State`, so histories never mix, and the page shows exactly the answers the
library returns.

What the server exposes, and why it is safe to run on a laptop:
- it listens on 127.0.0.1 unless given another host;
- every request's cost is bounded by `Limits`, each refusal says why in the page and leaves the
  conversation as it was: one upload request carries at most `max_upload_bytes` (all its files
  together); a clip longer than `max_clip_seconds` is refused from its header, before decoding; a
  session keeps only the frames the bridge reads (twice the vision encoder's input side, not a
  photo's full resolution); questions, turns and answers have a length; at most `max_sessions`
  conversations are open and at most `max_queue` requests wait, beyond which the page says it is
  busy; a conversation idle for `session_ttl_s` is closed and its frames freed (at once when its
  page is closed); an answer whose page has gone away stops generating;
- the only files it reads for the page are the ones the browser uploaded: Gradio accepts an
  upload event only for a file in its own upload folder, no `allowed_paths` are given, so no
  other path a browser names is served or opened, and a URL given where a file is expected is
  refused, never fetched;
- no analytics, share links, run history in the browser, monitoring or MCP endpoints.

Gradio is imported when a page is built, so that `qformer chat` can list these limits as flags
without loading it. No `from __future__ import annotations` here: Gradio reads the handlers'
annotations (`gr.Request`) at run time, where `gr` is a name inside `build_app` only.
"""

import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.video import IMAGE_EXTENSIONS, MAX_PIXELS, VIDEO_EXTENSIONS, ClipError

from .bridge import Bridge
from .config import MAX_NEW_TOKENS
from .session import ChatSession, describe

if TYPE_CHECKING:
    import gradio as gr


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Limits:
    """What one visitor or one request may cost the server; each is a flag of `qformer chat --web`."""

    max_upload_bytes: int = _limit(64 << 20, "bytes one upload request may carry, all its files together")
    max_clip_seconds: float = _limit(60.0, "longest clip, read from its header before decoding")
    max_pixels: int = _limit(MAX_PIXELS, "largest frame, width times height, read from its header")
    max_question_chars: int = _limit(500, "longest question, in characters")
    max_turns: int = _limit(20, "questions in one conversation; then the page asks for a new one")
    max_new_tokens: int = _limit(MAX_NEW_TOKENS, "longest answer, in tokens")
    max_sessions: int = _limit(32, "conversations open at once; one more is told the page is busy")
    session_ttl_s: float = _limit(1800.0, "seconds without a request after which a conversation is closed and freed")
    max_queue: int = _limit(16, "requests waiting for their turn; one more is told the page is busy")

    def __post_init__(self):
        for limit in fields(self):
            if not getattr(self, limit.name) > 0:
                raise ValueError(f"{limit.name} must be positive, got {getattr(self, limit.name)!r}")


# Uploaded files and the frame strips are deleted an hour after they were written (checked hourly,
# and all of them when the server stops); a session keeps its decoded frames, not the file.
CACHE_LIFETIME_S = 3600
# An answer that shows no new text for this long (beam search, the opening caption) still hands
# control back to Gradio, which then notices a page that has gone away and stops the answer.
IDLE_TICK_S = 0.5
# Room for the multipart envelope around an upload's files (boundaries and part headers, about
# 200 bytes a file), so that a file of exactly max_upload_bytes still fits in its request.
_FORM_OVERHEAD_BYTES = 4 << 10

UPLOAD_FIRST = "Upload an image or a clip first."

Message = dict[str, str]


def _messages(history: list[tuple[str, str]]) -> list[Message]:
    """Turns as the Chatbot's messages."""
    return [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def _size(n: int) -> str:
    return f"{n / 2**20:.3g} MB" if n >= 2**20 else f"{n / 2**10:.3g} KB"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def build_app(bridge: Bridge, limits: Limits | None = None, num_beams: int = 1) -> "gr.Blocks":
    """The page over `bridge`, within `limits` (default: Limits())."""
    import gradio as gr

    limits = limits or Limits()

    # Open conversations by Gradio session, to bound their number and free them when a page closes.
    sessions: dict[str, ChatSession] = {}
    sessions_lock = threading.Lock()
    busy = f"The server is busy (open conversations: {limits.max_sessions} of {limits.max_sessions}). Try again in a few minutes."

    def forget(session: ChatSession | None) -> None:
        """A conversation is over (expired, or its file removed): free its frames and its place."""
        if session is None:
            return
        with sessions_lock:
            for key in [key for key, open_session in sessions.items() if open_session is session]:
                del sessions[key]
        session.close()

    def page_closed(request: gr.Request) -> None:
        # Gradio keeps a closed page's state for an hour in case it reopens; its frames go now.
        with sessions_lock:
            session = sessions.pop(request.session_hash, None)
        if session is not None:
            session.close()

    def load(path: str | None, session: ChatSession | None, request: gr.Request):
        """A new upload starts a new conversation about it; a refused one leaves the page unchanged."""
        if path is None:  # the file was removed from the page
            forget(session)
            return "Upload an image or a clip.", [], [], None
        name = Path(path).name
        with sessions_lock:
            if session is None and len(sessions) >= limits.max_sessions:
                return busy, gr.skip(), gr.skip(), gr.skip()
            target = session or ChatSession(bridge, max_new_tokens=limits.max_new_tokens, num_beams=num_beams)
            sessions[request.session_hash] = target  # its place is held while the file is read
        try:
            clip = target.load(path, max_duration_s=limits.max_clip_seconds, max_pixels=limits.max_pixels)
        except ClipError as e:
            if session is None:
                forget(target)
            # The message names the server's copy of the file; the user knows it by its own name.
            return f"Cannot use this file. {str(e).replace(path, name)}", gr.skip(), gr.skip(), gr.skip()
        strip = [(frame, f"{t:.2f} s") for frame, t in zip(clip.frames, clip.timestamps)]
        return f"Loaded {describe(clip, name)}. Ask a question.", strip, [], target

    def ask(question: str, session: ChatSession | None) -> Iterator[tuple]:
        """Stream the answer into the chat; the finished turn is shown as the session keeps it.

        The session is an output of every step, so that Gradio counts its idle time from the last one.
        """
        question = question.strip()
        if not question:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if session is None or session.clip is None:
            yield gr.skip(), gr.skip(), UPLOAD_FIRST, gr.skip()
            return
        if len(question) > limits.max_question_chars:
            yield (
                gr.skip(),
                gr.skip(),
                (f"The question has {len(question)} characters; the limit is {limits.max_question_chars}. Shorten it."),
                session,
            )
            return
        if len(session.history) >= limits.max_turns:
            yield (
                gr.skip(),
                gr.skip(),
                (f"This conversation has reached its {limits.max_turns} questions; start a new conversation."),
                session,
            )
            return
        partial = ""
        yield _messages(session.history + [(question, partial)]), "", "Answering.", session
        # closing(): when Gradio closes this generator (the page went away), the answer stops at once.
        with closing(session.stream(question, idle_s=IDLE_TICK_S)) as answer:
            for text in answer:
                partial += text
                yield _messages(session.history + [(question, partial)]), gr.skip(), gr.skip(), session
        yield _messages(session.history), gr.skip(), "Ask a follow-up question, or start a new conversation.", session

    def reset(session: ChatSession | None):
        if session is not None:
            session.reset()
        return [], session

    page_limits = (
        f"Limits: files up to {_size(limits.max_upload_bytes)}, clips up to {limits.max_clip_seconds:g} s, questions up to "
        f"{limits.max_question_chars} characters, {limits.max_turns} questions a conversation; a conversation closes after "
        f"{_duration(limits.session_ttl_s)} without a question."
    )
    with gr.Blocks(title="Q-Former chat", analytics_enabled=False, delete_cache=(CACHE_LIFETIME_S, CACHE_LIFETIME_S)) as demo:
        # One ChatSession per browser session, made at its first upload; Gradio deletes it after
        # session_ttl_s without an event that outputs it, and `forget` frees it then.
        session = gr.State(None, time_to_live=limits.session_ttl_s, delete_callback=forget)
        gr.Markdown("# Ask about an image or a clip")
        gr.Markdown(page_limits, elem_id="limits")
        with gr.Row():
            upload = gr.File(
                label=f"Image or clip (files up to {_size(limits.max_upload_bytes)}, clips up to {limits.max_clip_seconds:g} s)",
                file_types=sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS),
                type="filepath",
                height=120,
                elem_id="upload",
            )
            status = gr.Textbox(label="Status", value="Upload an image or a clip.", interactive=False, lines=2, elem_id="status")
        # PNG: lossless, and no size limit (WebP, Gradio's default, refuses frames wider than 16383 px).
        frames = gr.Gallery(
            label="Frames the bridge sees",
            columns=bridge.config.num_frames,
            rows=1,
            height=180,
            object_fit="contain",
            allow_preview=False,
            format="png",
            elem_id="frames",
        )
        # Plain text: an answer is shown exactly as generated, never rendered as Markdown or HTML.
        chat = gr.Chatbot(label="Chat", render_markdown=False, feedback_options=None, buttons=["copy", "copy_all"], elem_id="chat")
        question = gr.Textbox(
            label="Question",
            placeholder="what color is the background?",
            max_length=limits.max_question_chars,
            elem_id="question",
        )
        with gr.Row():
            send = gr.Button("Ask", variant="primary", elem_id="ask")
            new_conversation = gr.Button("New conversation", elem_id="reset")

        upload.change(load, [upload, session], [status, frames, chat, session], api_name="load")
        # Enter and the button share one queue: two listeners would each run a generation at once.
        question.submit(ask, [question, session], [chat, question, status, session], api_name="ask", concurrency_id="ask")
        send.click(ask, [question, session], [chat, question, status, session], api_name=False, concurrency_id="ask")
        new_conversation.click(reset, [session], [chat, session], api_name="reset")
        # The Chatbot's own clear button empties the display; the session must forget the turns too.
        chat.clear(reset, [session], [chat, session], api_name=False)
        demo.unload(page_closed)
    # One model on the CPU: running two generations at once only splits the cores between them.
    # Beyond max_queue waiting requests Gradio answers 503, which the page shows as
    # "This application is currently busy. Please try again."
    demo.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    return demo


class _RequestGuard:
    """ASGI middleware in front of Gradio: refuses, saying why, what Gradio would accept.

    - A body over `max_bytes` is answered 413. Gradio checks each uploaded file against its size
      limit, not the request, so many files just under the limit would pass one by one. The declared
      length is checked before anything is read; a body sent without one (chunked) is counted as it
      arrives and refused at the limit.
    - A JSON request naming a file by an http(s) URL is answered 400: Gradio would download it,
      from whatever address an API client gives. The page itself names only uploaded files.
    """

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int, max_upload_bytes: int):
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, 413, self._too_large(f"{int(declared)} bytes"))
        received = 0
        responded = False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._TooLarge()
            return message

        async def tracked(message):
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        try:
            if headers.get(b"content-type", b"").startswith(b"application/json"):
                body = await self._body(counted)
                if url := next(_remote_paths(_json(body)), None):
                    reason = f"{url}: a URL is never fetched here; upload the file itself"
                    return await self._refuse(scope, receive, send, 400, reason)
                counted = _replay(body, receive)
            await self.app(scope, counted, tracked)
        except self._TooLarge:
            if not responded:
                await self._refuse(scope, receive, send, 413, self._too_large(f"more than {self.max_bytes} bytes"))

    def _too_large(self, carried: str) -> str:
        return f"This request carries {carried}; one upload may carry at most {_size(self.max_upload_bytes)} (all its files together)."

    @staticmethod
    async def _body(receive) -> bytes:
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, reason: str) -> None:
        from fastapi.responses import JSONResponse

        await JSONResponse({"detail": reason}, status_code=status)(scope, receive, send)


def _json(body: bytes):
    import json

    try:
        return json.loads(body)
    except ValueError:  # not JSON after all: Gradio answers it
        return None


def _remote_paths(data) -> Iterator[str]:
    """The http(s) paths of the files (Gradio's FileData) named anywhere in a JSON payload."""
    from gradio_client.utils import is_file_obj_with_meta, is_http_url_like

    if isinstance(data, dict):
        if is_file_obj_with_meta(data) and is_http_url_like(str(data["path"])):
            yield data["path"]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            yield from _remote_paths(item)


def _replay(body: bytes, receive):
    """An ASGI receive that hands the app the body already read, then the connection's own messages."""
    sent = False

    async def replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


def launch(
    bridge: Bridge,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    limits: Limits | None = None,
    num_beams: int = 1,
) -> "gr.Blocks":
    """Serve the page; with block=False return at once (close it with `.close()`)."""
    from starlette.middleware import Middleware

    limits = limits or Limits()

    demo = build_app(bridge, limits, num_beams)
    guard = Middleware(
        _RequestGuard,
        max_bytes=limits.max_upload_bytes + _FORM_OVERHEAD_BYTES,
        max_upload_bytes=limits.max_upload_bytes,
    )
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        max_file_size=limits.max_upload_bytes,
        app_kwargs={"middleware": [guard]},
        share=False,
        ssr_mode=False,
        footer_links=[],
        run_history=False,
        enable_monitoring=False,
        mcp_server=False,
        pwa=False,
    )
    return demo
