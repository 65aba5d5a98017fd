"""Visual question answering as a conversation: the terminal chat and the session the web page shares.

    qformer chat [--bridge DIR] [--image PATH | --clip PATH]       (or: python -m qformer.chat ...)
    qformer chat --web [--host 127.0.0.1] [--port 7860] [--max-sessions N ...]   (limits: qformer chat --help)

A `ChatSession` is one conversation: the current image or clip and the (question, answer) turns
about it. Every answer comes from `Bridge.answer`, streamed through transformers'
`TextIteratorStreamer`; the earlier turns go back in as `history`, which the LLM sees in its own
chat template. Nothing here knows about models beyond that call. With `--num-beams NB` (more than 1)
answers are decoded by beam search, as `qformer recaption --num-beams` does: slower, and each answer
arrives whole, since beam search only knows its best text at the end.

In the terminal, answers go to stdout, one per line, and everything else (status, errors, help)
to stderr, so `qformer chat --clip c.mp4 < questions.txt > answers.txt` works as a script.
"""
from __future__ import annotations

import argparse
import queue
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import torch

from adapters.video import MAX_PIXELS, Clip, ClipError, decode_side, read_clip

from .bridge import DEFAULT_BRIDGE, Bridge, bridge_or_default
from .config import MAX_NEW_TOKENS

# The trained demo bridge, shipped in the repository next to the package.

# "owner/name" could be a Hugging Face hub id, which Bridge.from_pretrained downloads.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

DESCRIPTION = "Chat about an image or a video clip with a trained bridge, in the terminal or (--web) in a browser."

HELP = """\
Ask a question about the image or clip and press Enter; follow-up questions see the earlier turns.
  /image PATH   talk about this image (starts a new conversation)
  /clip PATH    talk about this video clip (starts a new conversation)
  /reset        forget the conversation, keep the image or clip
  /quit         leave (so does Ctrl-D); Ctrl-C stops an answer"""


class ChatError(ValueError):
    """Something the user asked for that cannot be done now; the message says why."""


class ChatSession:
    """One conversation: the current image or clip and the turns about it."""

    def __init__(self, bridge: Bridge, max_new_tokens: int = MAX_NEW_TOKENS, num_beams: int = 1):
        if num_beams < 1:
            raise ValueError(f"num_beams must be 1 (greedy) or more, not {num_beams}")
        self.bridge = bridge
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.clip: Clip | None = None
        self.history: list[tuple[str, str]] = []
        # A caption-first bridge's opening turn (its caption) with the clip it is about: the bridge would
        # caption the clip again for every turn, and greedy decoding gives the same caption each time.
        self.opening: tuple[Clip | None, list[tuple[str, str]]] = (None, [])

    def load(self, path: str | Path, max_duration_s: float | None = None, max_pixels: int = MAX_PIXELS) -> Clip:
        """Make the image or clip at `path` the subject of a new conversation.

        Decoded once here (the frames the bridge samples), at twice the vision encoder's input side:
        the session keeps only what the bridge reads, not a photo's full resolution, and a bad file
        is reported when it is named rather than at the next question. A clip longer than
        `max_duration_s` (from its header, before decoding) or frames larger than `max_pixels` are
        refused (ClipError). On an error the session is unchanged.
        """
        clip = read_clip(
            path, num_frames=self.bridge.config.num_frames, max_pixels=max_pixels,
            max_side=decode_side(self.bridge.vision), max_duration_s=max_duration_s,
        )
        # Earlier turns were about another picture; carrying them over would mislead the LLM.
        self.clip, self.history = clip, []
        return clip

    def reset(self) -> None:
        # A new list rather than clear(): an answer still streaming belongs to the old conversation.
        self.history = []

    def close(self) -> None:
        """Drop the image or clip and the turns, so their memory is freed now (a page that was closed)."""
        self.clip, self.history, self.opening = None, [], (None, [])

    def stream(self, question: str, idle_s: float | None = None) -> Iterator[str]:
        """Answer `question` with the turns so far, yielding the text as it is generated.

        When the answer is complete it is appended to `history`, exactly as `Bridge.answer`
        returned it. Closing the iterator early (Ctrl-C, a closed page) stops generation. Under beam
        search the answer is yielded in one piece when it is complete. With `idle_s`, an empty
        string is yielded after each `idle_s` seconds without new text (beam search, the opening
        caption), so a caller that acts only between items, as a web server does, can close the
        stream then.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        question = question.strip()
        if not question:
            raise ChatError("empty question")
        if self.clip is None:
            raise ChatError("no image or clip yet: load one first")
        clip, history = self.clip, self.history
        stop = threading.Event()

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(self.bridge.llm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=idle_s)
        until_stopped = StoppingCriteriaList([StopWhenAsked()])
        outcome: dict[str, object] = {}

        def generate() -> None:
            try:
                turns = list(history)
                if self.bridge.captions_before(question, turns):
                    if self.opening[0] is not clip:  # keyed by the clip: another may have been loaded meanwhile
                        prompt = self.bridge.config.caption_prompt
                        caption = self.bridge.answer(
                            clip, prompt, max_new_tokens=MAX_NEW_TOKENS, num_beams=self.num_beams, stopping_criteria=until_stopped,
                        )
                        if stop.is_set():  # a caption cut short must not open later answers; nobody waits for this one
                            return
                        self.opening = (clip, [(prompt, caption)])
                    turns = self.opening[1] + turns
                # generate() refuses a streamer with beams; then the finished answer goes through it whole.
                decode = {"streamer": streamer} if self.num_beams == 1 else {"num_beams": self.num_beams}
                outcome["answer"] = self.bridge.answer(
                    clip, question, turns, max_new_tokens=self.max_new_tokens, stopping_criteria=until_stopped, **decode,
                )
                if self.num_beams > 1:
                    streamer.on_finalized_text(outcome["answer"], stream_end=True)
            except BaseException as e:  # handed to the caller's thread below
                outcome["error"] = e
                streamer.end()  # generate() never will now; without it the loop below waits forever

        worker = threading.Thread(target=generate, name="chat-generate", daemon=True)
        worker.start()
        try:
            started = False
            while True:
                try:
                    text = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:  # nothing new for idle_s seconds
                    yield ""
                    continue
                if not started:
                    # Bridge.answer strips the answer; strip the stream's start the same way.
                    text = text.lstrip()
                    started = bool(text)
                if text:
                    yield text
        finally:
            stop.set()  # a no-op after a complete answer; ends generation early otherwise
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        # Loading another clip or /reset during generation started a new conversation.
        if self.history is history:
            history.append((question, outcome["answer"]))


def load_bridge(spec: str | None) -> Bridge:
    """The bridge to chat with: `spec` (a directory or hub id), or the default demo bridge."""
    try:
        spec = bridge_or_default(spec)
    except ValueError as e:
        raise SystemExit(f"qformer chat: {e}") from None
    local = Path(spec).is_dir()
    if not local and not _HUB_ID.fullmatch(spec):
        raise SystemExit(f"qformer chat: {spec}: no such bridge directory")
    try:
        return Bridge.from_pretrained(spec)
    except (OSError, ValueError) as e:  # not a bridge, weights that do not fit, an unreachable hub
        where = "" if local else " (no such local directory; tried it as a Hugging Face hub id)"
        raise SystemExit(f"qformer chat: cannot load the bridge {spec}{where}: {e}") from None


def describe(clip: Clip, name: str) -> str:
    if clip.duration_s == 0:
        return f"{name}: an image"
    return f"{name}: {len(clip.frames)} frames sampled from {clip.duration_s:.1f} s"


def say(text: str) -> None:
    """Status, help and errors: stderr, so that stdout carries the answers alone."""
    print(text, file=sys.stderr, flush=True)


def terminal(session: ChatSession) -> None:
    """The read-answer loop on stdin/stdout; returns at /quit or end of input."""
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and recall for input())
    say(HELP)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            return
        except KeyboardInterrupt:
            say("")
            return
        if not line:
            continue
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            say("conversation cleared")
        elif command in ("/image", "/clip"):
            if not argument:
                say(f"error: {command} needs a path")
                continue
            try:
                say("loaded " + describe(session.load(argument), argument))
            except ClipError as e:
                say(f"error: {e}")
        elif command.startswith("/"):
            say(f"error: unknown command {command}\n{HELP}")
        else:
            try:
                for text in session.stream(line):
                    print(text, end="", flush=True)
                print(flush=True)
            except ChatError as e:
                say(f"error: {e}")
            except KeyboardInterrupt:
                print(flush=True)
                say("(answer stopped; it is not kept in the conversation)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bridge", metavar="DIR", help=f"trained bridge directory (default: {DEFAULT_BRIDGE})")
    first = parser.add_mutually_exclusive_group()
    first.add_argument("--image", metavar="PATH", help="start with this image")
    first.add_argument("--clip", metavar="PATH", help="start with this video clip")
    parser.add_argument("--num-beams", type=int, default=1, metavar="NB",
                        help="beam search over NB beams instead of greedy decoding: slower, answers arrive whole")
    parser.add_argument("--web", action="store_true", help="serve the chat as a web page instead of the terminal")
    parser.add_argument("--host", default="127.0.0.1", help="web: address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="web: port (default: %(default)s)")
    from .web import Limits

    for limit in fields(Limits):
        parser.add_argument(
            "--" + limit.name.replace("_", "-"), type=type(limit.default), default=limit.default, metavar="N",
            help=f"web: {limit.metadata['help']} (default: %(default)s)",
        )


def main(args: argparse.Namespace) -> None:
    if args.web and (args.image or args.clip):
        raise SystemExit("qformer chat: --image and --clip are for the terminal chat; in the web page, upload the file")
    if args.num_beams < 1:
        raise SystemExit(f"qformer chat: --num-beams must be at least 1, got {args.num_beams}")
    if args.web:
        from .web import Limits, launch

        try:
            limits = Limits(**{limit.name: getattr(args, limit.name) for limit in fields(Limits)})
        except ValueError as e:  # names the limit, as its flag is named
            raise SystemExit(f"qformer chat: --{str(e).replace('_', '-')}") from None
    bridge = load_bridge(args.bridge)
    if args.web:
        try:
            launch(bridge, host=args.host, port=args.port, limits=limits, num_beams=args.num_beams)
        except OSError:  # Gradio says only that it found no free port
            raise SystemExit(
                f"qformer chat: cannot serve the page on {args.host}:{args.port} (the port is in use, or the host is "
                "not an address of this machine); choose another --port or --host"
            ) from None
        return
    session = ChatSession(bridge, num_beams=args.num_beams)
    first = args.image or args.clip
    if first:
        try:
            say("loaded " + describe(session.load(first), first))
        except ClipError as e:
            raise SystemExit(f"qformer chat: {e}") from None
    terminal(session)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="qformer chat", description=DESCRIPTION)
    add_arguments(parser)
    main(parser.parse_args())
