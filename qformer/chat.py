"""The `qformer chat` command: visual question answering as a conversation, in the terminal or as a web page.

    qformer chat [--bridge DIR] [--image PATH | --clip PATH]       (or: python -m qformer.chat ...)
    qformer chat --web [--host 127.0.0.1] [--port 7860] [--max-sessions N ...]   (limits: qformer chat --help)

Each conversation is a `ChatSession` (qformer/session.py); the web page is qformer/web.py. With
`--num-beams NB` (more than 1) answers are decoded by beam search, as `qformer recaption --num-beams`
does: slower, and each answer arrives whole, since beam search only knows its best text at the end.

In the terminal, answers go to stdout, one per line, and everything else (status, errors, help)
to stderr, so `qformer chat --clip c.mp4 < questions.txt > answers.txt` works as a script.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields
from pathlib import Path

from adapters.video import ClipError

from .bridge import DEFAULT_BRIDGE, Bridge, bridge_or_default
from .build import add_quantization_arguments, llm_loading
from .session import ChatError, ChatSession, describe

# "owner/name" could be a Hugging Face hub id, which Bridge.from_pretrained downloads.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

DESCRIPTION = "Chat about an image or a video clip with a trained bridge, in the terminal or (--web) in a browser."

HELP = """\
Ask a question about the image or clip and press Enter; follow-up questions see the earlier turns.
  /image PATH   talk about this image (starts a new conversation)
  /clip PATH    talk about this video clip (starts a new conversation)
  /reset        forget the conversation, keep the image or clip
  /quit         leave (so does Ctrl-D); Ctrl-C stops an answer"""


def load_bridge(spec: str | None, llm_kwargs: dict | None = None) -> Bridge:
    """The bridge to chat with: `spec` (a directory or hub id), or the default demo bridge; llm_kwargs as in
    Bridge.from_pretrained."""
    try:
        spec = bridge_or_default(spec)
    except ValueError as e:
        raise SystemExit(f"qformer chat: {e}") from None
    local = Path(spec).is_dir()
    if not local and not _HUB_ID.fullmatch(spec):
        raise SystemExit(f"qformer chat: {spec}: no such bridge directory")
    try:
        return Bridge.from_pretrained(spec, llm_kwargs=llm_kwargs)
    except (OSError, ValueError) as e:  # not a bridge, weights that do not fit, an unreachable hub
        where = "" if local else " (no such local directory; tried it as a Hugging Face hub id)"
        raise SystemExit(f"qformer chat: cannot load the bridge {spec}{where}: {e}") from None


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
    parser.add_argument(
        "--num-beams",
        type=int,
        default=1,
        metavar="NB",
        help="beam search over NB beams instead of greedy decoding: slower, answers arrive whole",
    )
    add_quantization_arguments(parser)
    parser.add_argument("--web", action="store_true", help="serve the chat as a web page instead of the terminal")
    parser.add_argument("--host", default="127.0.0.1", help="web: address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="web: port (default: %(default)s)")
    from .web import Limits

    for limit in fields(Limits):
        parser.add_argument(
            "--" + limit.name.replace("_", "-"),
            type=type(limit.default),
            default=limit.default,
            metavar="N",
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
    bridge = load_bridge(args.bridge, llm_loading(args.load_in_4bit, args.load_in_8bit))
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
