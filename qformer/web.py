"""The chat as a Gradio page: upload an image or a clip, see the sampled frames, ask and follow up.

A thin layer over `ChatSession` (and so over `Bridge.answer`): each browser session gets its own
ChatSession in a `gr.State`, so histories never mix, and the page shows exactly the answers the
library returns.

What the server exposes, and why it is safe to run on a laptop:
- it listens on 127.0.0.1 unless given another host;
- uploads larger than `max_upload_bytes` are refused by Gradio before they are stored, and clips
  longer than `max_clip_seconds` are refused when they are read, before the model sees them; the
  page states both limits and shows the reason when a file is refused;
- the only files it reads for the page are the ones the browser uploaded: Gradio accepts an
  upload event only for a file in its own upload folder, and no `allowed_paths` are given, so no
  other path a browser names is served or opened;
- no analytics, share links, run history in the browser, monitoring or MCP endpoints.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from adapters.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ClipError

from .bridge import Bridge
from .chat import ChatError, ChatSession, describe

MAX_UPLOAD_BYTES = 64 << 20
MAX_CLIP_SECONDS = 60.0
# Uploaded files and the frame strips are deleted an hour after they were written (checked hourly,
# and all of them when the server stops); a session keeps its decoded frames, not the file.
CACHE_LIFETIME_S = 3600

Message = dict[str, str]


def _messages(history: list[tuple[str, str]]) -> list[Message]:
    """Turns as the Chatbot's messages."""
    return [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def build_app(
    bridge: Bridge, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_clip_seconds: float = MAX_CLIP_SECONDS, num_beams: int = 1,
) -> gr.Blocks:
    size = f"{max_upload_bytes / 2**20:.3g} MB" if max_upload_bytes >= 2**20 else f"{max_upload_bytes / 2**10:.3g} KB"
    limits = f"files up to {size}, clips up to {max_clip_seconds:g} s"

    def load(path: str | None, session: ChatSession | None):
        """A new upload starts a new conversation about it; a refused one leaves the page unchanged."""
        if path is None:  # the file was removed from the page
            return None, "Upload an image or a clip.", [], []
        session = session or ChatSession(bridge, num_beams=num_beams)
        name = Path(path).name
        try:
            clip = session.load(path, max_duration_s=max_clip_seconds)
        except (ClipError, ChatError) as e:
            # The message names the server's copy of the file; the user knows it by its own name.
            return session, f"Cannot use this file. {str(e).replace(path, name)}", gr.skip(), gr.skip()
        strip = [(frame, f"{t:.2f} s") for frame, t in zip(clip.frames, clip.timestamps)]
        return session, f"Loaded {describe(clip, name)}. Ask a question.", strip, []

    def ask(question: str, session: ChatSession | None) -> Iterator[tuple]:
        """Stream the answer into the chat; the finished turn is shown as the session keeps it."""
        question = question.strip()
        if not question:
            yield gr.skip(), gr.skip(), gr.skip()
            return
        if session is None or session.clip is None:
            yield gr.skip(), gr.skip(), "Upload an image or a clip first."
            return
        partial = ""
        yield _messages(session.history + [(question, partial)]), "", gr.skip()
        for text in session.stream(question):
            partial += text
            yield _messages(session.history + [(question, partial)]), gr.skip(), gr.skip()
        yield _messages(session.history), gr.skip(), gr.skip()

    def reset(session: ChatSession | None) -> list[Message]:
        if session is not None:
            session.reset()
        return []

    with gr.Blocks(title="Q-Former chat", analytics_enabled=False, delete_cache=(CACHE_LIFETIME_S, CACHE_LIFETIME_S)) as demo:
        session = gr.State(None)  # one ChatSession per browser session, made at its first upload
        gr.Markdown("# Ask about an image or a clip")
        with gr.Row():
            upload = gr.File(
                label=f"Image or clip ({limits})", file_types=sorted(IMAGE_EXTENSIONS | VIDEO_EXTENSIONS),
                type="filepath", height=120, elem_id="upload",
            )
            status = gr.Textbox(label="Status", value="Upload an image or a clip.", interactive=False, lines=2, elem_id="status")
        frames = gr.Gallery(
            label="Frames the bridge sees", columns=bridge.config.num_frames, rows=1, height=180,
            object_fit="contain", allow_preview=False, elem_id="frames",
        )
        # Plain text: an answer is shown exactly as generated, never rendered as Markdown or HTML.
        chat = gr.Chatbot(label="Chat", render_markdown=False, feedback_options=None, buttons=["copy", "copy_all"], elem_id="chat")
        question = gr.Textbox(label="Question", placeholder="what color is the background?", elem_id="question")
        with gr.Row():
            send = gr.Button("Ask", variant="primary", elem_id="ask")
            new_conversation = gr.Button("New conversation", elem_id="reset")

        upload.change(load, [upload, session], [session, status, frames, chat], api_name="load")
        # Enter and the button share one queue: two listeners would each run a generation at once.
        question.submit(ask, [question, session], [chat, question, status], api_name="ask", concurrency_id="ask")
        send.click(ask, [question, session], [chat, question, status], api_name=False, concurrency_id="ask")
        new_conversation.click(reset, [session], [chat], api_name="reset")
        # The Chatbot's own clear button empties the display; the session must forget the turns too.
        chat.clear(reset, [session], [chat], api_name=False)
    return demo


def launch(
    bridge: Bridge,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_clip_seconds: float = MAX_CLIP_SECONDS,
    num_beams: int = 1,
) -> gr.Blocks:
    """Serve the page; with block=False return at once (close it with `.close()`)."""
    demo = build_app(bridge, max_upload_bytes, max_clip_seconds, num_beams)
    # One model on the CPU: running two generations at once only splits the cores between them.
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, max_file_size=max_upload_bytes,
        share=False, ssr_mode=False, footer_links=[], run_history=False, enable_monitoring=False, mcp_server=False, pwa=False,
    )
    return demo
